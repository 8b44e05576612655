"""The training loop end to end on a CPU, with a 1-layer d_model-32 model on 150 shared-sample stories."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpt.trainer as trainer_mod
from gpt.checkpoint import load_checkpoint
from gpt.config import GPTConfig
from gpt.model import GPT2Model, LMLoss
from gpt.train import main
from gpt.trainer import BEST_NAME, CURVES_NAME, HISTORY_NAME, LAST_NAME, SEED_PROMPTS

ROOT = Path(__file__).resolve().parents[1]
SEED_KEYS = {"train_losses", "val_losses", "train_accuracies", "val_accuracies", "final_perplexity",
             "generated_texts"}


@pytest.fixture(scope="module")
def base_args(tmp_path_factory, stories_dir, tokenizer_dir):
    cache = tmp_path_factory.mktemp("cache")
    return ["--preset", "tiny", "--data", str(stories_dir / "tinystories-sample.jsonl"),
            "--tokenizer", str(tokenizer_dir), "--cache-dir", str(cache), "--num-stories", "150",
            "--num-layers", "1", "--d-model", "32", "--num-heads", "2", "--d-ff", "64",
            "--max-seq-length", "32", "--batch-size", "4", "--eval-tokens", "512", "--sample-length", "8",
            "--no-progress", "--log-interval", "5"]


def run_main(args, capsys):
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def history(out_dir: Path) -> dict:
    return json.loads((out_dir / HISTORY_NAME).read_text())


def test_outputs_loss_and_exact_resume(base_args, tmp_path, capsys):
    # Warmup of 30 steps, then flat: the schedule does not depend on --max-steps, so a 10-step run
    # continued to 20 must retrace the 20-step run.
    common = base_args + ["--eval-interval", "10", "--warmup-steps", "30", "--min-lr-ratio", "1",
                          "--lr", "1e-2", "--grad-accum", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    rc, out, err = run_main(common + ["--max-steps", "20", "--out-dir", str(straight)], capsys)
    assert rc == 0, err
    assert "tokens per optimizer step: 4 seqs x 32 tokens x 2 accumulation = 256" in out

    for name in (BEST_NAME, LAST_NAME, HISTORY_NAME, CURVES_NAME):
        assert (straight / name).stat().st_size > 0, name
    h = history(straight)
    assert SEED_KEYS <= set(h)
    assert set(h["generated_texts"]) == set(SEED_PROMPTS)
    assert all(t.startswith(p) for p, t in h["generated_texts"].items())
    assert h["steps"] == 20 and h["tokens_seen"] == 20 * 256 and h["val_steps"] == [10, 20]
    assert math.isclose(h["final_perplexity"], math.exp(h["test_loss"]), rel_tol=1e-9)
    assert 0 < h["test_accuracy"] < 1 and h["tokens_per_sec"] > 0
    assert h["environment"]["torch"] == torch.__version__
    # Loss decreases: validation between evaluations, training from first to last log.
    assert h["val_losses"][1] < h["val_losses"][0] - 0.1
    assert h["train_log"]["losses"][-1] < h["train_log"]["losses"][0] - 0.1

    ck = torch.load(straight / BEST_NAME, weights_only=True)
    model = GPT2Model(GPTConfig.from_dict(ck["config"]), impl="torch")
    model.load_state_dict(ck["model_state_dict"])
    assert ck["step"] == 20 and ck["best_val_loss"] == min(h["val_losses"])

    rc, _, err = run_main(common + ["--max-steps", "10", "--out-dir", str(split)], capsys)
    assert rc == 0, err
    assert torch.load(split / LAST_NAME, weights_only=True)["step"] == 10
    rc, out, err = run_main(common + ["--max-steps", "20", "--out-dir", str(split), "--resume"], capsys)
    assert rc == 0, err
    assert "resuming at step 10" in out
    hs = history(split)
    assert hs["val_losses"] == h["val_losses"]  # bitwise: same data, optimizer, RNG
    assert hs["train_log"]["losses"] == h["train_log"]["losses"]
    a = torch.load(straight / LAST_NAME, weights_only=True)["model_state_dict"]
    b = torch.load(split / LAST_NAME, weights_only=True)["model_state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping(base_args, tmp_path, capsys, monkeypatch):
    losses = iter([5.0, 4.0, 4.5, 4.2, 3.0])  # best, best, worse, worse -> stop after the 4th
    real = trainer_mod.evaluate

    def scripted(*args, **kwargs):
        m = real(*args, **kwargs)
        return {**m, "loss": next(losses, 4.0)}

    monkeypatch.setattr(trainer_mod, "evaluate", scripted)
    out_dir = tmp_path / "es"
    rc, out, err = run_main(base_args + ["--max-steps", "50", "--eval-interval", "2", "--patience", "2",
                                         "--out-dir", str(out_dir)], capsys)
    assert rc == 0, err
    assert "early stop" in out
    h = history(out_dir)
    assert h["val_steps"] == [2, 4, 6, 8] and h["steps"] == 8
    assert load_checkpoint(out_dir / BEST_NAME)["step"] == 4  # the best evaluation's weights


def test_nan_loss_stops_and_keeps_last_good_checkpoint(base_args, tmp_path, capsys, monkeypatch):
    real_forward = GPT2Model.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, **kw):
        out = real_forward(self, idx, targets, **kw)
        if targets is None or not self.training:
            return out
        calls["n"] += 1
        return LMLoss(out.loss * float("nan"), out.correct, out.count) if calls["n"] > 12 else out

    monkeypatch.setattr(GPT2Model, "forward", poisoned)
    out_dir = tmp_path / "nan"
    rc, _, err = run_main(base_args + ["--max-steps", "40", "--eval-interval", "10",
                                       "--out-dir", str(out_dir)], capsys)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "nan" in lines[0] and "step 15" in lines[0], err
    ck = load_checkpoint(out_dir / LAST_NAME)
    assert ck["step"] == 10
    assert all(torch.isfinite(v).all() for v in ck["model_state_dict"].values())
    assert not (out_dir / HISTORY_NAME).exists()


@pytest.mark.parametrize("case", ["missing_data", "empty_data", "batch_size_0", "accum_0", "resume_without_ckpt",
                                  "corrupt_ckpt", "triton_missing", "bad_device"])
def test_bad_input_one_line_exit_1(case, base_args, tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    old = {BEST_NAME: b"earlier best", HISTORY_NAME: b'{"earlier": 1}'}
    for name, data in old.items():
        (out_dir / name).write_bytes(data)
    args = base_args + ["--max-steps", "2", "--out-dir", str(out_dir)]
    if case == "missing_data":
        args += ["--data", str(tmp_path / "nope.jsonl")]
    elif case == "empty_data":
        (tmp_path / "empty.txt").write_text("")
        args += ["--data", str(tmp_path / "empty.txt")]
    elif case == "batch_size_0":
        args += ["--batch-size", "0"]
    elif case == "accum_0":
        args += ["--grad-accum", "0"]
    elif case == "resume_without_ckpt":
        args += ["--resume"]
    elif case == "corrupt_ckpt":
        old[LAST_NAME] = b"\x00not a checkpoint"
        (out_dir / LAST_NAME).write_bytes(old[LAST_NAME])
        args += ["--resume"]
    elif case == "triton_missing":
        monkeypatch.setitem(sys.modules, "kernels", None)  # `import kernels` raises ImportError
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        args += ["--impl", "triton"]
    elif case == "bad_device":
        args += ["--device", "tpu"]
    rc, _, err = run_main(args, capsys)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == old


def _cli(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, **kw)


def test_ctrl_c_writes_resumable_checkpoint(base_args, tmp_path):
    out_dir = tmp_path / "int"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-u", "train.py", *base_args, "--max-steps", "100000", "--log-interval", "1",
                             "--eval-interval", "0", "--out-dir", str(out_dir)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # the second header line comes just before the first step
            if line.startswith("tokens per optimizer step"):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted at step") and "--resume" in lines[0], err
    step = int(lines[0].split()[3].rstrip(":"))
    ck = load_checkpoint(out_dir / LAST_NAME)
    assert ck["step"] == step and ck["batches"][0]["drawn"] == step  # a step boundary: grad_accum 1


def test_torchrun_two_ranks_match_single_process_accumulation(base_args, tmp_path, capsys):
    args = base_args + ["--max-steps", "3", "--eval-interval", "0", "--log-interval", "1", "--grad-accum", "2",
                        "--lr", "1e-2", "--warmup-steps", "0"]
    ddp = _cli([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py", *args,
                "--out-dir", str(tmp_path / "ddp")])
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert "2 process(es)" in ddp.stdout and ddp.stdout.count("test perplexity") == 1  # rank 0 prints
    rc, _, err = run_main(args + ["--out-dir", str(tmp_path / "one")], capsys)
    assert rc == 0, err
    a, b = history(tmp_path / "ddp"), history(tmp_path / "one")
    # Rank r draws global batches r, r + 2, ...: the same data as micro-steps of one process. Only the
    # order of the gradient sums differs (all-reduce vs accumulation), so equal to float rounding.
    assert a["train_log"]["losses"] == pytest.approx(b["train_log"]["losses"], rel=1e-5, abs=0)
    assert a["val_losses"] == pytest.approx(b["val_losses"], rel=1e-5, abs=0)
    assert a["train_log"]["losses"][-1] != b["train_log"]["losses"][0]  # training moved the loss


def test_grad_accum_must_divide_by_world_size(base_args, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc, _, err = run_main(base_args + ["--grad-accum", "3", "--out-dir", str(tmp_path / "o")], capsys)
    assert rc == 1 and "divisible by the number of processes (2)" in err
