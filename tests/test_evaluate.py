"""evaluate.py: a model's perplexity and accuracy on a TinyStories split, as train.py's test pass
computes them -- from one of our checkpoints (its run's data and split by default) or a
transformers directory (data given) -- and one-line errors."""

import json

import pytest

from gpt.evaluation import main
from gpt.checkpoint import load_model
from gpt.hf import export_hf
from gpt.train import main as train_main
from gpt.trainer import BEST_NAME


@pytest.fixture(scope="module")
def trained(base_args, tmp_path_factory):
    """A 3-step tiny run: (its directory, its history)."""
    out = tmp_path_factory.mktemp("evaluated") / "run"
    assert train_main([*base_args, "--max-steps", "3", "--eval-interval", "0", "--out-dir", str(out)]) == 0
    return out, json.loads((out / "training_history.json").read_text())


def scores(capsys, *args) -> tuple[dict, str]:
    """evaluate.py's JSON and its stdout for ``args``."""
    path = args[args.index("--json") + 1]
    assert main(list(args)) == 0, capsys.readouterr().err
    return json.loads(open(path).read()), capsys.readouterr().out


def test_a_runs_checkpoint_scores_as_its_final_test_pass(trained, tmp_path, capsys):
    out, history = trained
    got, stdout = scores(capsys, "--model", str(out / BEST_NAME), "--dtype", "fp32", "--json", str(tmp_path / "s.json"))
    assert got["tokens"] == history["test_tokens"]  # the run's split, found from the checkpoint alone
    assert got["perplexity"] == pytest.approx(history["final_perplexity"], rel=1e-5)
    assert got["accuracy"] == pytest.approx(history["test_accuracy"], abs=1e-9)
    assert stdout.startswith(f"test perplexity {got['perplexity']:.2f} | ")


def test_a_transformers_directory_with_the_data_given_scores_the_same(trained, base_args, tmp_path, capsys):
    out, history = trained
    export_hf(load_model(out / BEST_NAME), tmp_path / "hf")
    data = {flag: base_args[base_args.index(flag) + 1] for flag in ("--data", "--tokenizer", "--cache-dir", "--num-stories")}
    got, _ = scores(capsys, "--model", str(tmp_path / "hf"), *[x for kv in data.items() for x in kv], "--dtype", "fp32",
                    "--json", str(tmp_path / "s.json"))
    assert got["perplexity"] == pytest.approx(history["final_perplexity"], rel=1e-5)
    assert got["tokens"] == history["test_tokens"]


def test_the_validation_split_capped(trained, tmp_path, capsys):
    out, _ = trained
    got, stdout = scores(capsys, "--model", str(out / BEST_NAME), "--split", "val", "--max-tokens", "100",
                         "--dtype", "fp32", "--json", str(tmp_path / "s.json"))
    assert got["split"] == "val" and got["tokens"] == 100
    assert stdout.startswith("val perplexity ")


def test_a_graphed_forward_scores_as_the_eager_one(trained, tmp_path, capsys, monkeypatch):
    """evaluate.py replays its forward from a graph wherever it can (on a CPU: the stand-in, the
    refusal lifted): the same scores as --no-cuda-graph, with every batch but the first replayed.
    (This model's context is too short for the seed protocol: test_graphstep.py replays that.)"""
    import gpt.evaluation
    import gpt.graphstep

    out, _ = trained
    monkeypatch.setattr(gpt.evaluation, "graph_refusal", lambda device: None)
    replays = []
    replay = gpt.graphstep.Captured.replay
    monkeypatch.setattr(gpt.graphstep.Captured, "replay", lambda self: replays.append(1) or replay(self))
    common = ["--model", str(out / BEST_NAME), "--dtype", "fp32", "--batch-size", "3"]
    eager, _ = scores(capsys, *common, "--no-cuda-graph", "--json", str(tmp_path / "eager.json"))
    assert not replays
    graphed, _ = scores(capsys, *common, "--json", str(tmp_path / "graphed.json"))
    assert len(replays) == -(-eager["tokens"] // (32 * 3)) - 1 > 0  # every batch of 3 windows of 32 but the first
    assert graphed["perplexity"] == pytest.approx(eager["perplexity"], rel=1e-6)
    assert (graphed["tokens"], graphed["accuracy"]) == (eager["tokens"], eager["accuracy"])


def test_cuda_graph_on_a_cpu_is_one_line(trained, capsys):
    out, _ = trained
    assert main(["--model", str(out / BEST_NAME), "--device", "cpu", "--cuda-graph"]) == 1
    assert capsys.readouterr().err.strip() == "evaluate.py: error: --cuda-graph needs a CUDA device, got cpu"


@pytest.mark.parametrize("extra,message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--data", "{tmp}/nope.jsonl"], "data source {tmp}/nope.jsonl does not exist"),
])
def test_bad_input_is_one_line(trained, tmp_path, capsys, extra, message):
    out, _ = trained
    extra = [x.format(tmp=tmp_path) for x in extra]
    assert main(["--model", str(out / BEST_NAME), *extra]) == 1
    assert capsys.readouterr().err.strip() == "evaluate.py: error: " + message.format(tmp=tmp_path)


def test_progress_bars_on_stderr_unless_hidden(trained, capsys):
    """Each pass has a progress bar on stderr (train.py's kind), named after the split; the
    results on stdout are the same with --no-progress, which leaves stderr empty."""
    out, _ = trained
    model = ["--model", str(out / BEST_NAME), "--dtype", "fp32", "--max-tokens", "300"]
    assert main(model) == 0
    shown = capsys.readouterr()
    assert "test: " in shown.err and "batch/s" in shown.err
    assert main(model + ["--no-progress", "--split", "val"]) == 0
    hidden = capsys.readouterr()
    assert hidden.err == "" and hidden.out.startswith("val perplexity")
    assert main(model + ["--no-progress"]) == 0
    assert capsys.readouterr().out == shown.out


def test_running_out_of_memory_is_one_line(trained, capsys, monkeypatch):
    """An allocation that fails mid-pass (the CPU cap of ``gpt.hardware.host_memory_capped``; CUDA's
    likewise) is one line naming --batch-size, exit 1; another RuntimeError stays a traceback."""
    out, _ = trained

    def failing(error):
        def evaluate(*args, **kwargs):
            raise error
        return evaluate

    monkeypatch.setattr("gpt.step.evaluate", failing(RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)")))
    assert main(["--model", str(out / BEST_NAME)]) == 1
    assert capsys.readouterr().err.strip() == (
        "evaluate.py: error: out of memory on the CPU (an allocation of 1,024 MiB failed; a run may use the memory "
        "the machine had free when it started): lower --batch-size")
    monkeypatch.setattr("gpt.step.evaluate", failing(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["--model", str(out / BEST_NAME)])


def test_a_missing_model_is_one_line(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "none.pt")]) == 1
    assert capsys.readouterr().err.strip() == f"evaluate.py: error: {tmp_path / 'none.pt'}: no such checkpoint file or model directory"
