"""gpt.graphstep: the training step captured in a CUDA graph, against eager ``train_step``; the
evaluation forward (``GraphedEval``) against eager ``evaluate``.

On a GPU the capture is real (impl auto: the Triton kernels). On a CPU, which has no graphs, a
"replay" runs the eager step again on the static buffers: that checks everything around the graph
-- the warm-up count, each step's batch and lr reaching the step through the buffers (a stale
buffer trains on the capture's batch again and the weights part), the fallback for another batch
shape, the metrics -- and the refusals.
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt import GPT2Model, GPTConfig, TrainConfig
from gpt.graphstep import GraphedEval, GraphedTrainStep, graph_refusal, use_float_lr
from gpt.train import main
from gpt.step import build_optimizer, evaluate, evaluate_seed_protocol, train_step

from conftest import DEVICE
from graphed_ddp import CFG, micro_batches

WARMUP = 2
LRS = [2.0**-k for k in (7, 8, 8, 9, 10, 9, 11, 12, 10)]  # exact in fp32: the lr tensor holds what eager uses

PLAN = [micro_batches(100 + i, rows=2 if i == 6 else 3) for i in range(len(LRS))]  # step 6: another shape


def train(dtype: str, graphed: bool):
    torch.manual_seed(0)
    model = GPT2Model(CFG, impl="auto").to(DEVICE)
    opt = build_optimizer(model, TrainConfig(), DEVICE)
    stepper = GraphedTrainStep(model, opt, device=DEVICE, dtype=dtype, grad_clip=1.0, warmup=WARMUP) if graphed else None
    metrics, captured = [], []
    for micro, lr in zip(PLAN, LRS):
        if graphed:
            m = stepper(micro, lr)
            captured.append(stepper.captured)
        else:
            m = train_step(model, opt, micro, device=DEVICE, dtype=dtype, grad_clip=1.0, lr=lr)
        metrics.append(m.clone())  # a replay's metrics tensor is overwritten by the next replay
    return model, torch.stack(metrics), stepper, captured


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_graphed_steps_match_eager_steps(dtype):
    eager, eager_metrics, _, _ = train(dtype, graphed=False)
    graphed, graphed_metrics, stepper, captured = train(dtype, graphed=True)
    assert captured == [False] * WARMUP + [True] * (len(LRS) - WARMUP)
    assert stepper.eager_steps == WARMUP + 1  # the warm-up, and step 6 (another shape) ran eagerly
    # The same ops on the same values: equal to rounding (fp32 sums may be grouped differently on a GPU).
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == "fp32" else dict(atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(graphed_metrics, eager_metrics, **tol)
    assert graphed_metrics[:, 2].tolist() == eager_metrics[:, 2].tolist()  # targets counted
    for (name, p), q in zip(graphed.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, **tol, msg=lambda m, name=name: f"{name}: {m}")
    assert all(p.grad is None for p in graphed.parameters())  # no gradient held between steps


def test_a_stale_batch_would_show():
    """The comparison above can fail: training every step after the warm-up on the capture's batch
    (what a replay reading stale buffers would do) ends elsewhere."""
    eager, _, _, _ = train("fp32", graphed=False)
    torch.manual_seed(0)
    stale = GPT2Model(CFG, impl="auto").to(DEVICE)
    opt = build_optimizer(stale, TrainConfig(), DEVICE)
    for i, lr in enumerate(LRS):
        train_step(stale, opt, PLAN[min(i, WARMUP)], device=DEVICE, dtype="fp32", grad_clip=1.0, lr=lr)
    assert not all(torch.allclose(p, q, atol=1e-6, rtol=1e-5) for p, q in zip(stale.parameters(), eager.parameters()))


def test_a_graphed_runs_checkpoint_resumes_eagerly_and_graphed(tmp_path):
    """The optimizer state of a graphed run (lr a device tensor, capturable) saves and loads as our
    checkpoints do (weights-only, to the CPU), is made plain again as ``TrainState.restore`` does,
    and the next step is the same whether the resumed run replays a graph or steps eagerly."""
    from gpt.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = GPT2Model(CFG, impl="auto").to(DEVICE)
    opt = build_optimizer(model, TrainConfig(), DEVICE)
    stepper = GraphedTrainStep(model, opt, device=DEVICE, dtype="fp32", grad_clip=1.0, warmup=1)
    for i in range(3):
        stepper(PLAN[i], LRS[i])
    assert stepper.captured
    save_checkpoint({"model_state_dict": model.state_dict(), "config": CFG.to_dict(),
                     "optimizer": opt.state_dict()}, tmp_path / "last.pt")
    after = {}
    for graphed in (False, True):
        ck = load_checkpoint(tmp_path / "last.pt")  # per resume: a loaded optimizer steps the loaded tensors
        resumed = GPT2Model(CFG, impl="auto").to(DEVICE)
        resumed.load_state_dict(ck["model_state_dict"])
        ropt = build_optimizer(resumed, TrainConfig(), DEVICE)
        ropt.load_state_dict(ck["optimizer"])
        use_float_lr(ropt)  # as TrainState.restore does
        assert all(isinstance(g["lr"], float) and not g["capturable"] for g in ropt.param_groups)
        if graphed:
            GraphedTrainStep(resumed, ropt, device=DEVICE, dtype="fp32", grad_clip=1.0, warmup=1)(PLAN[3], LRS[3])
        else:
            train_step(resumed, ropt, PLAN[3], device=DEVICE, dtype="fp32", grad_clip=1.0, lr=LRS[3])
        after[graphed] = resumed
    stepper(PLAN[3], LRS[3])  # the run that never stopped
    for p, q, r in zip(model.parameters(), after[False].parameters(), after[True].parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r, p, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("args,message", [
    ((torch.device("cpu"), "fp32", False), "--cuda-graph needs a CUDA device, got cpu"),
    ((torch.device("cuda"), "fp16", False), "--cuda-graph cannot capture fp16's loss scaler"),
    ((torch.device("cuda"), "bf16", True), "--cuda-graph and --compile do not combine"),
])
def test_what_cannot_be_captured_is_refused(args, message):
    assert graph_refusal(*args).startswith(message)
    assert graph_refusal(torch.device("cuda"), "bf16", False) is None  # what can (torchrun too)


def test_a_capture_needs_a_warm_up():
    model = GPT2Model(CFG, impl="torch")
    with pytest.raises(ValueError, match="needs warmup >= 1 eager steps, got 0"):
        GraphedTrainStep(model, build_optimizer(model, TrainConfig(), torch.device("cpu")), device="cpu",
                         dtype="fp32", warmup=0)


EVAL_TOKENS = np.random.default_rng(3).integers(0, CFG.vocab_size, 16 * 11 + 5)  # 12 windows, the last partial


def eval_model(config: GPTConfig = CFG, seed: int = 0) -> GPT2Model:
    torch.manual_seed(seed)
    return GPT2Model(config, impl="auto").to(DEVICE)


def assert_same_scores(got: dict, want: dict) -> None:
    """Equal counts and hits; the loss to fp32 rounding (padding rows add zeros to its sums)."""
    assert (got["tokens"], got["accuracy"]) == (want["tokens"], want["accuracy"])
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-6)


@pytest.fixture
def replays(monkeypatch):
    """The labels ("step" or "eval") of the CUDA-graph replays that follow, in order."""
    import gpt.graphstep

    seen = []
    replay = gpt.graphstep.Captured.replay

    def counted(self):
        seen.append("eval" if self.fn.__qualname__.startswith("GraphedEval") else "step")
        return replay(self)

    monkeypatch.setattr(gpt.graphstep.Captured, "replay", counted)
    return seen


def test_graphed_evaluation_scores_as_eager_does(replays):
    """Batches of 5 windows: 5, 5, then a last batch of 2 (its last window partial), padded to 5. The
    first pass warms up and captures, the second replays every batch; both score as eager does, and
    after the weights change (loaded in place, as the test pass loads the best checkpoint) the
    replays see the new ones. Another length gets a graph of its own."""
    model, other = eval_model(seed=0), eval_model(seed=1)
    run = GraphedEval(model, device=DEVICE, dtype="fp32", batch_size=5)
    for expected_replays in (2, 3):  # the first pass: batch 1 eager, batch 2 captured and replayed, batch 3 replayed
        eager = evaluate(model, EVAL_TOKENS, 16, 5, DEVICE, "fp32")
        replays.clear()
        assert_same_scores(evaluate(model, EVAL_TOKENS, 16, 5, DEVICE, "fp32", forward=run), eager)
        assert replays == ["eval"] * expected_replays
    model.load_state_dict(other.state_dict())
    fresh = evaluate(model, EVAL_TOKENS, 16, 5, DEVICE, "fp32")
    assert fresh["loss"] != pytest.approx(eager["loss"], rel=1e-3)  # the new weights do score differently
    assert_same_scores(evaluate(model, EVAL_TOKENS, 16, 5, DEVICE, "fp32", forward=run), fresh)
    short = evaluate(model, EVAL_TOKENS, 8, 5, DEVICE, "fp32")
    for _ in range(2):
        assert_same_scores(evaluate(model, EVAL_TOKENS, 8, 5, DEVICE, "fp32", forward=run), short)
    assert sorted(run.graphs) == [8, 16]  # one graph per length, partial batches included


def test_graphed_evaluation_of_the_seed_protocol(replays):
    """The seed protocol's rows (x a strided view of 255 tokens a story) through the graph: 7 stories
    in batches of 3, 3, 1, twice, as eager scores them."""
    config = GPTConfig(vocab_size=50257, max_seq_length=256, num_layers=1, num_heads=2, d_model=32, d_ff=64,
                       dropout=0.0)
    model = eval_model(config)
    rng = np.random.default_rng(4)
    stories = [np.append(rng.integers(0, 50000, n), 50256) for n in (40, 300, 7, 120, 255, 90, 12)]
    tokens = np.concatenate(stories)
    eager = evaluate_seed_protocol(model, tokens, 3, DEVICE, "fp32")
    run = GraphedEval(model, device=DEVICE, dtype="fp32", batch_size=3)
    for _ in range(2):
        got = evaluate_seed_protocol(model, tokens, 3, DEVICE, "fp32", forward=run)
        assert got["rows"] == eager["rows"] == 7
        assert_same_scores(got, eager)
    assert list(run.graphs) == [255] and replays == ["eval"] * (2 + 3)


def test_graphed_evaluation_falls_back_to_eager_where_a_replay_would_differ(replays):
    """A batch wider than the buffers, other dtypes, a model in training mode or gradients on: each
    runs eagerly and leaves the graphs as they were (and a training-mode forward with dropout on
    would score differently from the eval-mode capture)."""
    model = eval_model().eval()
    run = GraphedEval(model, device=DEVICE, dtype="fp32", batch_size=2)
    x = torch.randint(0, CFG.vocab_size, (3, 16))
    y = torch.randint(0, CFG.vocab_size, (3, 16))
    with torch.no_grad():
        for _ in range(3):
            run(x[:2], y[:2])
        assert list(run.graphs) == [16]
        captured = run.graphs[16]
        wide = run(x, y)  # 3 rows > 2
        torch.testing.assert_close(wide[2], torch.tensor(48.0, dtype=torch.float64, device=DEVICE))
        assert run(x[:2].int(), y[:2].int())[2] == 32  # int32 tokens: not the buffers' int64
        model.train()
        run(x[:2], y[:2])
        model.eval()
    run(x[:2], y[:2])  # gradients on
    assert run.graphs == {16: captured} and run.buffers[16][0].dtype == torch.int64
    assert replays == ["eval"] * 2  # the capture's and the third call's: none of the fallbacks replayed


@pytest.mark.skipif(DEVICE.type != "cuda", reason="a real CUDA graph: its replays' random draws")
@pytest.mark.parametrize("dropout,attn_dropout", [(0.3, 0.0), (0.0, 0.3)], ids=["add_layer_norm", "attention"])
def test_a_captured_training_forward_draws_new_dropout_masks_every_replay(dropout, attn_dropout):
    """The dropout kernels take their seed from torch's generator inside the call, so a CUDA graph
    that captured a training forward draws new masks on every replay (a seed fixed at capture would
    train on one mask forever): two replays differ from each other, and with dropout off (eval)
    the replays agree with the eager forward."""
    cfg = GPTConfig(**{**CFG.to_dict(), "dropout": dropout, "attn_dropout": attn_dropout})
    torch.manual_seed(0)
    model = GPT2Model(cfg, impl="triton").to(DEVICE)
    x = torch.randint(0, cfg.vocab_size, (3, 16), device=DEVICE)
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            model.hidden_states(x)  # compile and autotune outside the capture
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                model.hidden_states(x)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = model.hidden_states(x)
            replays = []
            for _ in range(2):
                graph.replay()
                replays.append(out.clone())
            if training:
                assert not torch.equal(replays[0], replays[1])
            else:
                assert torch.equal(replays[0], replays[1])
                torch.testing.assert_close(replays[0], model.hidden_states(x), atol=1e-5, rtol=1e-5)


def test_a_graphed_eval_refuses_an_empty_batch_size():
    with pytest.raises(ValueError, match="batch_size >= 1, got 0"):
        GraphedEval(eval_model(), device=DEVICE, dtype="fp32", batch_size=0)


def run_args(base_args):
    """The tests' training arguments without their --no-cuda-graph."""
    return [a for a in base_args if a != "--no-cuda-graph"]


def test_cli_refuses_cuda_graph_on_a_cpu_in_one_line(base_args, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*base_args, "--device", "cpu", "--cuda-graph", "--max-steps", "2", "--out-dir", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: --cuda-graph needs a CUDA device, got cpu"
    assert not out.exists()


def test_train_py_with_cuda_graph_follows_the_eager_run(base_args, tmp_path, history, capsys, monkeypatch, replays):
    """train.py --cuda-graph: 3 eager steps, a capture, replays; validation and the test pass from
    their own graph after one eager batch. The logged losses, validation losses and the final test
    figures match the eager run's (no dropout, so both draw nothing). On a CPU the Trainer runs the
    stand-in (the refusal of a CPU lifted): logging, validation, checkpoints and the test pass
    around replays whose output tensors each replay overwrites."""
    import gpt.trainer

    if DEVICE.type != "cuda":
        monkeypatch.setattr(gpt.trainer, "graph_refusal", lambda *args: None)
    runs = {}
    for name, extra in (("eager", ["--no-cuda-graph"]), ("graph", ["--cuda-graph"])):
        out = tmp_path / name
        args = [*run_args(base_args), "--max-steps", "20", "--eval-interval", "10", "--log-interval", "4", "--dropout", "0",
                "--dtype", "fp32", "--device", DEVICE.type, "--eval-batch-size", "4", "--out-dir", str(out), *extra]
        assert main(args) == 0, capsys.readouterr().err[-2000:]
        runs[name] = history(out)
        test_targets = int(re.search(r"\(([\d,]+) test tokens\)", capsys.readouterr().out)[1].replace(",", ""))
        # Batches of 4 windows of 32: two validation passes of 512 targets, then the whole test split
        # (this context is too short for the seed protocol); every batch but the first replays.
        eval_batches = 2 * 4 + math.ceil(math.ceil(test_targets / 32) / 4)
        assert replays.count("step") == (0 if name == "eager" else 20 - 3)  # every step after the warm-up
        assert replays.count("eval") == (0 if name == "eager" else eval_batches - 1)
    eager, graph = runs["eager"], runs["graph"]
    assert graph["train_log"]["steps"] == eager["train_log"]["steps"]
    for key in ("train_losses", "val_losses"):
        assert graph[key] == pytest.approx(eager[key], rel=1e-4), key
    for key in ("losses", "accuracies"):
        assert graph["train_log"][key] == pytest.approx(eager["train_log"][key], rel=1e-4), key
    assert graph["final_perplexity"] == pytest.approx(eager["final_perplexity"], rel=1e-4)


@pytest.mark.parametrize("refusal", [None, "--cuda-graph needs a CUDA device, got cpu"], ids=["capturable", "not"])
def test_the_step_is_captured_by_default_where_it_can_be(base_args, tmp_path, capsys, monkeypatch, refusal,
                                                         replays):
    """Without --cuda-graph / --no-cuda-graph a run captures its step wherever ``graph_refusal`` has
    nothing against it (on a CPU, the stand-in with the refusal lifted), and runs eagerly, without a
    word, where it has; the start line says which."""
    import gpt.trainer

    monkeypatch.setattr(gpt.trainer, "graph_refusal", lambda *args: refusal)
    args = [*run_args(base_args), "--max-steps", "6", "--eval-interval", "0", "--device", DEVICE.type,
            "--out-dir", str(tmp_path / "run")]
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    start = capsys.readouterr().out.splitlines()[0]
    assert replays.count("step") == (6 - 3 if refusal is None else 0)
    assert ("eval" in replays) == (refusal is None)  # the test pass's
    assert ("CUDA graph" in start) == (refusal is None), start


ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def torchrun_worker(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    return subprocess.run([*TORCHRUN, str(ROOT / "tests" / "graphed_ddp.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_graphed_steps_under_torchrun_average_the_ranks_gradients(tmp_path):
    """Two ranks (gloo), each with ``GraphedTrainStep(process_group=...)`` on micro-batches of its own:
    the weights every rank ends with are those of one process stepping on both ranks' micro-batches
    together (the mean of the ranks' mean gradients), through the warm-up, the capture, replays and an
    eager step of another shape. Without the all-reduce each rank would follow its own data (the
    last check)."""
    import graphed_ddp as worker

    done = torchrun_worker("step", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(r["captured"] for r in ranks)
    assert [r["eager_steps"] for r in ranks] == [worker.WARMUP + 1] * 2  # the warm-up, and the other shape
    assert [r["replays"] for r in ranks] == [2 * (len(worker.LRS) - worker.WARMUP - 1)] * 2  # two graphs a step

    torch.manual_seed(0)
    model = GPT2Model(worker.CFG, impl="auto").to(DEVICE)
    opt = build_optimizer(model, TrainConfig(), DEVICE)
    metrics = torch.stack([train_step(model, opt, worker.rank_batches(step, 0) + worker.rank_batches(step, 1),
                                      device=DEVICE, dtype="fp32", grad_clip=1.0, lr=lr).cpu()
                           for step, lr in enumerate(worker.LRS)])
    torch.testing.assert_close(ranks[0]["metrics"] + ranks[1]["metrics"], metrics, atol=1e-6, rtol=1e-5)
    for name, p in model.state_dict().items():
        for r in ranks:
            got, want = r["weights"][name], p.cpu()
            if name.endswith("c_attn.bias"):  # the key bias: its gradient is 0 in exact arithmetic (softmax
                keys = slice(worker.CFG.d_model, 2 * worker.CFG.d_model)  # ignores a constant added to a row's
                got, want = got.clone(), want.clone()  # scores), so it learns Adam-normalized rounding noise,
                got[keys] = want[keys] = 0  # which another order of the sums changes
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    torch.manual_seed(0)
    alone = GPT2Model(worker.CFG, impl="auto").to(DEVICE)
    opt = build_optimizer(alone, TrainConfig(), DEVICE)
    for step, lr in enumerate(worker.LRS):
        train_step(alone, opt, worker.rank_batches(step, 0), device=DEVICE, dtype="fp32", grad_clip=1.0, lr=lr)
    assert not all(torch.allclose(ranks[0]["weights"][name], p.cpu(), atol=1e-6, rtol=1e-5)
                   for name, p in alone.state_dict().items())
