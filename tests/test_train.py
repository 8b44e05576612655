"""The training loop end to end on a CPU, in process: a 1-layer d_model-32 model on 150 shared-sample stories.

The command-line behaviours that need a real process (the refusal, one-flag resume from another
directory, Ctrl-C, torchrun with a killed worker) are in test_train_cli.py.
"""

import math
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gpt.checkpoint
import gpt.curves
import gpt.hardware
import gpt.train as train_mod
import gpt.trainer as trainer_mod
from gpt.checkpoint import load_checkpoint
from gpt.config import PRESETS, GPTConfig, TrainConfig
from gpt.data import EOS_ID, SEED_IGNORE_INDEX, story_rows
from gpt.model import GPT2Model, LMLoss
from gpt.step import (build_optimizer, evaluate_seed_protocol, lr_at, merge_factor, merge_micro_batches,
                      train_step)
from gpt.train import build_parser, field_comments, main
from gpt.trainer import BEST_NAME, CURVES_NAME, HISTORY_NAME, LAST_NAME, SEED_PROMPTS

from conftest import FullDisk

SEED_KEYS = {"train_losses", "val_losses", "train_accuracies", "val_accuracies", "final_perplexity",
             "generated_texts"}


def run_main(args, capsys):
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_outputs_loss_and_one_flag_exact_resume(base_args, tmp_path, capsys, history, monkeypatch):
    # Warmup of 30 steps, then flat: the schedule does not depend on --max-steps, so a 10-step run
    # continued to 20 must retrace the 20-step run.
    # On the CPU also on a GPU host: exact resume equality needs deterministic kernels (CUDA's
    # embedding backward adds with atomics), and the start line checked below names the device.
    common = base_args + ["--eval-interval", "10", "--warmup-steps", "30", "--min-lr-ratio", "1",
                          "--lr", "1e-2", "--grad-accum", "2", "--device", "cpu"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    titles = []
    real_plot = gpt.curves.plot_curves
    monkeypatch.setattr(gpt.curves, "plot_curves", lambda h, p, title, tps: (titles.append(title), real_plot(h, p, title, tps)))
    rc, out, err = run_main(common + ["--max-steps", "20", "--out-dir", str(straight)], capsys)
    assert rc == 0, err
    start = out.splitlines()[0]
    for part in ("train: preset tiny (", "1.62M parameters",
                 "256 tokens/step (4 seqs x 32 tokens x 2 accumulation, run as 1 x 8 seqs a process)",
                 "| 20 steps |", "cpu fp32, impl torch, 1 process", "validation every 10 steps (8 seqs a forward)",
                 f"{LAST_NAME} every 100 steps", f"new run in {straight}"):
        assert part in start, (part, start)
    assert "speed after 3 steps:" in out and "ETA" in out
    for prompt in SEED_PROMPTS:  # the samples are printed, not only stored
        assert f"--- {prompt!r}\n{prompt}" in out

    for name in (BEST_NAME, LAST_NAME, HISTORY_NAME, CURVES_NAME):
        assert (straight / name).stat().st_size > 0, name
    h = history(straight)
    assert SEED_KEYS <= set(h)
    assert set(h["generated_texts"]) == set(SEED_PROMPTS)
    assert all(t.startswith(p) for p, t in h["generated_texts"].items())
    assert h["steps"] == 20 and h["tokens_seen"] == 20 * 256 and h["val_steps"] == [10, 20]
    assert math.isclose(h["final_perplexity"], math.exp(h["test_loss"]), rel_tol=1e-9)
    assert 0 < h["test_accuracy"] < 1 and h["environment"]["torch"] == torch.__version__
    assert h["tokens_per_sec"] > 0 and h["tokens_per_sec_with_startup"] > 0
    assert h["tokens_per_sec_measured_over"].startswith("steps 2-20 of this session")
    assert h["train_seconds"] > h["first_step_seconds"] > 0 and h["setup_seconds"] > 0
    # Context 32 < 255: the seed's protocol cannot run, and the history says why.
    assert h["seed_protocol_test"]["perplexity"] is None and "255" in h["seed_protocol_test"]["reason"]
    # One train-loss definition: the value at each evaluation is the logged one at that step.
    log = h["train_log"]
    assert h["train_losses"] == [log["losses"][log["steps"].index(s)] for s in h["val_steps"]]
    assert f"train loss {h['train_losses'][-1]:.4f}" in out
    assert titles == [f"tiny preset, 1.62M parameters, 20 steps: test perplexity {h['final_perplexity']:.2f}"]
    # Loss decreases: validation between evaluations, training from first to last log.
    assert h["val_losses"][1] < h["val_losses"][0] - 0.1
    assert log["losses"][-1] < log["losses"][0] - 0.1

    ck = torch.load(straight / BEST_NAME, weights_only=True)
    model = GPT2Model(GPTConfig.from_dict(ck["config"]), impl="torch")
    model.load_state_dict(ck["model_state_dict"])
    assert ck["step"] == 20 and ck["best_val_loss"] == min(h["val_losses"])

    rc, _, err = run_main(common + ["--max-steps", "10", "--out-dir", str(split)], capsys)
    assert rc == 0, err
    assert torch.load(split / LAST_NAME, weights_only=True)["step"] == 10
    # One flag (+ the longer run): data, tokenizer, preset and every override come from the checkpoint.
    monkeypatch.delenv("GPT2_TOKENIZER_DIR", raising=False)
    drawn = []  # initial weights drawn by the resumed run: none, the checkpoint has them all
    real_normal = torch.nn.init.normal_
    monkeypatch.setattr(torch.nn.init, "normal_", lambda t, *a, **k: (drawn.append(t.shape), real_normal(t, *a, **k))[1])
    rc, out, err = run_main(["--resume", "--out-dir", str(split), "--max-steps", "20", "--no-progress"], capsys)
    assert rc == 0, err
    assert drawn == []
    assert f"resuming at step 10 of {split / LAST_NAME}" in out and "from this command: --max-steps" in out
    hs = history(split)
    assert hs["val_losses"] == h["val_losses"]  # bitwise: same data, optimizer, RNG
    assert hs["train_log"]["losses"] == log["losses"]
    assert hs["run_options"]["out_dir"] == str(split) and hs["train_config"] == h["train_config"]
    a = torch.load(straight / LAST_NAME, weights_only=True)["model_state_dict"]
    b = torch.load(split / LAST_NAME, weights_only=True)["model_state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_keeps_the_run_and_rejects_contradictions(base_args, tmp_path, capsys):
    out_dir = tmp_path / "r"
    rc, _, err = run_main(base_args + ["--max-steps", "2", "--eval-interval", "0", "--out-dir", str(out_dir)], capsys)
    assert rc == 0, err
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    for flags, words in ((["--lr", "0.5"], "--lr 0.5 contradicts"), (["--preset", "seed"], "--preset seed contradicts"),
                         (["--d-model", "64"], "--d-model 64 contradicts"), (["--seed", "7"], "--seed 7 contradicts"),
                         (["--overwrite"], "choose one")):
        rc, _, err = run_main(["--resume", "--out-dir", str(out_dir), *flags], capsys)
        lines = err.strip().splitlines()
        assert rc == 1 and len(lines) == 1 and words in lines[0], err
    # The same values as the run (a torchrun restart repeats its whole command line) are fine.
    rc, out, err = run_main(base_args + ["--resume", "auto", "--out-dir", str(out_dir), "--max-steps", "3",
                                         "--eval-interval", "0", "--show-config"], capsys)
    assert rc == 0, err
    assert "# the run in" in out and "--max-steps 3" in out and "--d-model 32" in out
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before  # --show-config writes nothing


def test_overwrite_replaces_the_run_as_a_whole(base_args, tmp_path, capsys, history):
    out_dir = tmp_path / "o"
    args = base_args + ["--eval-interval", "0", "--out-dir", str(out_dir)]
    rc, _, err = run_main(args + ["--max-steps", "4"], capsys)
    assert rc == 0, err
    rc, _, err = run_main(args + ["--max-steps", "2"], capsys)
    assert rc == 1 and "--resume" in err and "--overwrite" in err and history(out_dir)["steps"] == 4
    (out_dir / "notes.txt").write_text("mine")
    rc, _, err = run_main(args + ["--max-steps", "2", "--overwrite"], capsys)
    assert rc == 0, err
    assert history(out_dir)["steps"] == 2 and load_checkpoint(out_dir / LAST_NAME)["step"] == 2
    assert load_checkpoint(out_dir / BEST_NAME)["step"] == 2
    assert (out_dir / "notes.txt").read_text() == "mine"  # only the run's own files go


def test_early_stopping_and_steps_from_epochs(base_args, tmp_path, capsys, monkeypatch, history):
    losses = iter([5.0, 4.0, 4.5, 4.2, 3.0])  # best, best, worse, worse -> stop after the 4th
    real = trainer_mod.evaluate

    def scripted(*args, **kwargs):
        m = real(*args, **kwargs)
        return {**m, "loss": next(losses, 4.0)}

    monkeypatch.setattr(trainer_mod, "evaluate", scripted)
    out_dir = tmp_path / "es"
    rc, out, err = run_main(base_args + ["--max-steps", "0", "--epochs", "0.3", "--eval-interval", "2",
                                         "--patience", "2", "--out-dir", str(out_dir)], capsys)
    assert rc == 0, err
    # 0.3 epochs of the train split, 128 tokens a step: said at the start.
    train_tokens = load_checkpoint(out_dir / LAST_NAME)["data"]["tokens"]["train"]
    steps = math.ceil(0.3 * train_tokens / 128)
    assert f"| {steps} steps (--max-steps 0: 0.3 epochs of {train_tokens:,} train tokens) |" in out
    assert "early stop" in out
    h = history(out_dir)
    assert h["val_steps"] == [2, 4, 6, 8] and h["steps"] == 8 and h["max_steps"] == steps
    assert load_checkpoint(out_dir / BEST_NAME)["step"] == 4  # the best evaluation's weights


def test_checkpoint_interval(base_args, tmp_path, capsys, monkeypatch):
    saved = []
    real = gpt.checkpoint.save_checkpoint  # (the trainer's writer thread calls it)
    monkeypatch.setattr(gpt.checkpoint, "save_checkpoint", lambda ck, path: (saved.append((path.name, ck["step"])), real(ck, path)))
    rc, _, err = run_main(base_args + ["--max-steps", "7", "--eval-interval", "0", "--checkpoint-interval", "3",
                                       "--out-dir", str(tmp_path / "ci")], capsys)
    assert rc == 0, err
    assert saved == [(LAST_NAME, 3), (LAST_NAME, 6), (BEST_NAME, 7), (LAST_NAME, 7)]
    ck = load_checkpoint(tmp_path / "ci" / LAST_NAME)
    assert ck["history"]["train_log"]["steps"] == [3, 5, 6, 7]  # a checkpoint step is also a log step


@pytest.mark.parametrize("amx,dtype", [(True, "bf16"), (False, "fp32")], ids=["amx", "no-amx"])
def test_a_cpu_run_defaults_to_bf16_with_amx_else_fp32(base_args, tmp_path, capsys, history, monkeypatch, amx, dtype):
    """Without --dtype a CPU run autocasts to bf16 where the CPU has AMX (1.45x the fp32 tokens/s of
    the tiny preset on this project's Xeon, same perplexity: gpt/hardware.py), else stays fp32; its
    samples are decoded in that dtype too (a cast copy of the best model)."""
    import gpt.generate
    import gpt.hardware

    monkeypatch.setattr(gpt.hardware, "cpu_has_amx", lambda: amx)
    decoded_in = []

    class Decoder(gpt.generate.Decoder):
        def __init__(self, *args, **kwargs):
            decoded_in.append(kwargs.get("dtype"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gpt.generate, "Decoder", Decoder)
    i = base_args.index("--dtype")
    args = base_args[:i] + base_args[i + 2:]  # no --dtype
    out = tmp_path / "run"
    rc, stdout, err = run_main(args + ["--max-steps", "2", "--eval-interval", "0", "--device", "cpu", "--out-dir", str(out)],
                               capsys)
    assert rc == 0, err
    assert f"| cpu {dtype}, impl " in stdout.splitlines()[0]
    assert history(out)["run_options"]["dtype"] == dtype
    assert decoded_in == [dtype] and len(history(out)["generated_texts"]) == 4
    assert gpt.hardware.default_dtype("cpu", "triton") == "fp32"  # the interpreter's bf16 dots are wrong
    assert gpt.hardware.default_dtype("cuda", "triton") == "bf16"


@pytest.mark.parametrize("preset", ["seed", "tiny"])
def test_a_long_cpu_run_of_a_gpu_preset_suggests_the_tiny_one(base_args, tmp_path, capsys, monkeypatch, preset):
    """``python train.py`` on a CPU (the seed preset: days there): its ETA line says that
    ``--preset tiny`` trains in minutes; a tiny run's line does not, however long its ETA."""
    monkeypatch.setattr(trainer_mod, "CPU_HINT_AFTER_SECONDS", 0)  # any ETA counts as long
    args = base_args + ["--preset", preset, "--grad-accum", "1", "--max-steps", "5", "--eval-interval", "0",
                        "--device", "cpu", "--out-dir", str(tmp_path / "run")]
    rc, out, err = run_main(args, capsys)
    assert rc == 0, err
    eta = next(line for line in out.splitlines() if line.startswith("speed after 3 steps"))
    assert eta.endswith("; on a CPU, `--preset tiny` trains a smaller model in minutes") == (preset == "seed"), eta


def test_evaluation_takes_a_steps_sequences_per_forward_and_scores_the_same_at_any_batch(
        base_args, tmp_path, capsys, history, monkeypatch):
    """Validation and test passes run batch_size x grad_accum windows a forward unless
    --eval-batch-size says otherwise; the figures do not depend on it (fp32, same windows). On the
    CPU on every machine: a GPU run's fp32 products are TF32, rounded differently per GEMM shape."""
    import gpt.trainer

    seen = []
    real = gpt.trainer.evaluate
    monkeypatch.setattr(gpt.trainer, "evaluate", lambda model, tokens, context, batch_size, *a, **k:
                        seen.append(batch_size) or real(model, tokens, context, batch_size, *a, **k))
    runs = {}
    for name, extra in (("default", []), ("one", ["--eval-batch-size", "1"])):
        seen.clear()
        out = tmp_path / name
        rc, _, err = run_main([*base_args, "--max-steps", "4", "--eval-interval", "2", "--grad-accum", "3",
                               "--dropout", "0", "--device", "cpu", "--out-dir", str(out), *extra], capsys)
        assert rc == 0, err
        assert seen == [4 * 3 if name == "default" else 1] * 3  # two validations, the test pass
        runs[name] = history(out)
    default, one = runs["default"], runs["one"]
    assert one["val_losses"] == pytest.approx(default["val_losses"], rel=1e-6)
    assert one["final_perplexity"] == pytest.approx(default["final_perplexity"], rel=1e-6)
    assert one["test_accuracy"] == default["test_accuracy"]
    assert 0 < one["validation_seconds"] <= one["eval_seconds"]


def test_a_gpu_validates_in_forwards_of_at_least_65536_tokens(base_args, tmp_path, capsys, monkeypatch):
    """Without --eval-batch-size a run's validation and test forwards take a step's sequences, and on
    CUDA at least EVAL_FORWARD_TOKENS tokens' worth of windows (``default_eval_batch``; the scores do
    not depend on it, as the test above shows); the trainer asks it with its own step, context and
    device, and an explicit --eval-batch-size wins."""
    import gpt.trainer
    from gpt.step import EVAL_FORWARD_TOKENS, default_eval_batch

    assert EVAL_FORWARD_TOKENS == 65536
    assert default_eval_batch(32, 256, torch.device("cpu")) == 32
    assert default_eval_batch(32, 256, torch.device("cuda")) == 256
    assert default_eval_batch(32, 1000, "cuda") == 66  # rounded up: at least 65,536 tokens
    assert default_eval_batch(512, 256, "cuda") == 512  # a larger step keeps its own
    assert default_eval_batch(32, 256, "cuda", max_tokens=20_000) == 79  # no more than a capped pass needs
    assert default_eval_batch(32, 256, "cuda", max_tokens=4096) == 32
    asked, seen = [], []
    real = gpt.trainer.evaluate
    monkeypatch.setattr(gpt.trainer, "default_eval_batch", lambda *a: asked.append(a) or 5)
    monkeypatch.setattr(gpt.trainer, "evaluate", lambda model, tokens, context, batch_size, *a, **k:
                        seen.append(batch_size) or real(model, tokens, context, batch_size, *a, **k))
    for extra, want in (([], 5), (["--eval-batch-size", "2"], 2)):
        asked.clear()
        seen.clear()
        rc, _, err = run_main([*base_args, "--max-steps", "2", "--eval-interval", "0", "--grad-accum", "3",
                               "--device", "cpu", "--out-dir", str(tmp_path / str(want)), *extra], capsys)
        assert rc == 0, err
        assert seen == [want] * 2  # the final validation and the test pass
        assert asked == ([(4 * 3, 32, torch.device("cpu"), 512)] if not extra else [])  # base_args: --eval-tokens 512


def test_tf32_is_switched_on_for_a_cuda_run_only_and_back_after_it():
    """train.py's runs multiply fp32 matrices in TF32 on CUDA; the process-wide switches are restored
    after the run, after a failed one too (tests/conftest.py checks that every test leaves them so)."""
    from gpt.hardware import tf32_matmuls

    def switches():
        return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    torch.backends.cuda.matmul.allow_tf32 = False
    before = switches()
    with tf32_matmuls("cpu"):
        assert switches() == before
    with pytest.raises(RuntimeError, match="the run failed"):
        with tf32_matmuls(torch.device("cuda")):  # a device object: no GPU needed to flip the switches
            assert switches() == (True, True)
            raise RuntimeError("the run failed")
    assert switches() == before


@pytest.mark.skipif(gpt.hardware._glibc() is None, reason="glibc's allocator settings")
def test_a_cpu_run_keeps_freed_memory_for_its_next_tensors_and_gives_it_back_after(base_args, tmp_path, monkeypatch):
    """In a CPU run glibc maps no large tensor afresh (it serves them from memory it keeps, whose pages
    need no faulting in again), in train.py's run itself too; outside the run, and in a CUDA run's
    host memory, glibc maps a tensor larger than all its free memory afresh, as by default, and the
    freed memory the run kept goes back to the kernel when the run ends."""
    import ctypes

    from gpt.hardware import host_memory_kept

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = gpt.hardware._glibc()
    libc.mallinfo2.restype = Mallinfo2

    def mapped_afresh() -> bool:
        """Whether glibc maps a tensor 64 MiB larger than all the free memory it holds separately
        (free memory it holds serves any smaller request even with mmap on: a run that ends with
        a large free block below a live one leaves it there). Its pages are never touched."""
        before = libc.mallinfo2()  # (blocks other tests hold stay mapped: count the change)
        held = torch.empty(before.fordblks + (64 << 20), dtype=torch.uint8)
        mapped = libc.mallinfo2().hblkhd - before.hblkhd
        assert held.numel() > 64 << 20 and mapped in (0, pytest.approx(held.numel(), abs=1 << 20))
        return mapped > 0

    def resident() -> int:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    assert mapped_afresh()
    with host_memory_kept(torch.device("cuda")):  # a device object: no GPU needed
        assert mapped_afresh()
    with host_memory_kept("cpu"):
        assert not mapped_afresh()
        freed = torch.empty(256 << 20, dtype=torch.uint8).fill_(1)  # a large block ...
        live = torch.empty(1 << 20, dtype=torch.uint8).fill_(1)  # ... below a live one
        del freed
        kept = resident()
    assert mapped_afresh()
    assert kept - resident() > 192 << 20  # the freed block's pages went back
    del live

    seen = []
    real = train_mod._train
    monkeypatch.setattr(train_mod, "_train", lambda *a: (seen.append(mapped_afresh()), real(*a))[1])
    assert main(base_args + ["--max-steps", "1", "--out-dir", str(tmp_path / "run")]) == 0
    assert seen == [False]
    assert mapped_afresh()


def test_a_full_disk_stops_the_run_in_one_line_and_it_resumes(base_args, tmp_path, capsys, monkeypatch):
    """The disk fills after the first last.pt: the next write fails, the run exits 1 with one line
    naming the file and the cause, and the last.pt before it is intact and resumable."""
    out = tmp_path / "full"
    real = gpt.checkpoint._Recorded.__init__
    writes = []

    def recorded(self, f):  # the first write has the disk's room, every later one none
        writes.append(1)
        real(self, f if len(writes) == 1 else FullDisk(f, 0))

    monkeypatch.setattr(gpt.checkpoint._Recorded, "__init__", recorded)
    rc, _, err = run_main(base_args + ["--max-steps", "6", "--eval-interval", "0", "--checkpoint-interval", "2",
                                       "--out-dir", str(out)], capsys)
    assert rc == 1
    assert err.strip().splitlines()[-1] == (f"error: cannot write {out / LAST_NAME}: No space left on device; "
                                            f"the previous {LAST_NAME} is untouched")
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == [LAST_NAME]
    assert load_checkpoint(out / LAST_NAME)["step"] == 2
    monkeypatch.setattr(gpt.checkpoint._Recorded, "__init__", real)  # room again
    rc, _, err = run_main(["--resume", "--out-dir", str(out), "--no-progress"], capsys)
    assert rc == 0, err
    assert load_checkpoint(out / LAST_NAME)["step"] == 6


def test_out_of_memory_is_one_line_and_keeps_the_checkpoints(base_args, tmp_path, capsys, monkeypatch):
    """A GPU out of memory mid-run (here: raised at step 7, after last.pt at step 5): one line naming
    the flags that shrink a forward, exit 1, last.pt kept for --resume."""
    out_dir = tmp_path / "run"
    real_step = trainer_mod.train_step
    calls = {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 79.19 GiB of which 1.06 GiB is free.")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "train_step", step)
    rc, _, err = run_main(base_args + ["--max-steps", "10", "--eval-interval", "0", "--checkpoint-interval", "5",
                                       "--out-dir", str(out_dir)], capsys)
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: CUDA out of memory: lower --batch-size, --forward-tokens"), lines[0]
    assert load_checkpoint(out_dir / LAST_NAME)["step"] == 5


@pytest.mark.skipif(gpt.hardware.memory_available() is None, reason="Linux's MemAvailable")
def test_a_cpu_run_larger_than_the_free_memory_is_one_line(base_args, tmp_path):
    """A CPU run that needs more memory than the machine has free stops at the allocation that
    crosses its cap, with one line and exit 1, instead of meeting the kernel's OOM killer (no
    message) or swapping. The child process is told that 256 MiB are free; its step of 16,384 x 32
    tokens needs more than 1 GB (64 MiB a (16,384, 32, 32) activation)."""
    code = ("import sys, gpt.hardware as h; h.memory_available = lambda: 256 << 20; "
            "from gpt.train import main; sys.exit(main(sys.argv[1:]))")
    out_dir = tmp_path / "run"
    args = base_args + ["--device", "cpu", "--max-steps", "2", "--batch-size", "16384", "--out-dir", str(out_dir)]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert re.match(r"error: out of memory on the CPU \(an allocation of \d+ MiB failed; a run may use the memory "
                    r"the machine had free when it started\): lower --batch-size", lines[0]), lines[0]
    assert not (out_dir / LAST_NAME).exists()


# Run in a fresh process: in a longer one (the tests) freed heap memory that glibc keeps can serve
# an allocation without growing the process, so it would not meet the cap.
CAPPED_ALLOCATIONS = """
import resource, torch, pytest
import gpt.hardware as h
h.memory_available = lambda: 256 << 20
with h.host_memory_capped("cpu", processes=2):  # 90% of 256 MiB, shared by 2 ranks: ~115 MiB to grow by
    held = h._proc_kib("/proc/self/status", "VmData")
    assert resource.getrlimit(resource.RLIMIT_DATA)[0] == pytest.approx(held + 0.9 * (128 << 20), abs=16 << 20)
    with pytest.raises(RuntimeError) as failed:
        torch.empty(256 << 20, dtype=torch.uint8)
    assert h.is_out_of_memory(failed.value)
    assert h.out_of_memory_line(failed.value).startswith("out of memory on the CPU (an allocation of 256 MiB failed")
    small = torch.empty(16 << 20, dtype=torch.uint8).fill_(7)  # what fits still does
    assert small[-1] == 7
    assert not h.is_out_of_memory(RuntimeError("could not create a primitive"))  # oneDNN, far from the cap
    near = torch.empty(72 << 20, dtype=torch.uint8)  # now within 64 MiB of it
    assert h.is_out_of_memory(RuntimeError("could not create a primitive"))
"""


@pytest.mark.skipif(gpt.hardware.memory_available() is None, reason="Linux's MemAvailable")
def test_host_memory_cap_is_the_free_memory_for_the_block_only():
    """Inside the block an allocation beyond what was free fails as torch's allocator error
    (recognised as out of memory, as is oneDNN's failure near the cap), and ranks on one machine
    share what is free (in a child process: ``CAPPED_ALLOCATIONS``); after it, the previous limit
    is back. A lower limit already set stays, and a GPU run's host memory is not capped."""
    import resource

    from gpt.hardware import host_memory_capped, is_out_of_memory, out_of_memory_line

    done = subprocess.run([sys.executable, "-c", CAPPED_ALLOCATIONS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    before = resource.getrlimit(resource.RLIMIT_DATA)
    with host_memory_capped("cpu"):
        assert resource.getrlimit(resource.RLIMIT_DATA)[0] != before[0]
    assert resource.getrlimit(resource.RLIMIT_DATA) == before
    with host_memory_capped(torch.device("cuda")):  # a device object: no GPU needed
        assert resource.getrlimit(resource.RLIMIT_DATA) == before
    lower = (gpt.hardware._proc_kib("/proc/self/status", "VmData") + (64 << 20), before[1])
    resource.setrlimit(resource.RLIMIT_DATA, lower)
    try:
        with host_memory_capped("cpu"):
            assert resource.getrlimit(resource.RLIMIT_DATA) == lower
        assert resource.getrlimit(resource.RLIMIT_DATA) == lower
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, before)
    assert not is_out_of_memory(RuntimeError("could not create a primitive"))  # no cap
    assert not is_out_of_memory(RuntimeError("the run failed"))
    assert out_of_memory_line(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")) == \
        "CUDA out of memory"


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


@pytest.mark.parametrize("n,tokens_each,max_tokens,k", [
    (8, 4 * 256, 16384, 8),  # the seed preset: 8 micro-batches of 4 x 256, one forward
    (8, 1024, 4096, 4), (8, 1024, 3000, 2), (6, 1000, 4500, 3), (5, 1000, 4500, 1),  # divisors only
    (4, 16384, 16384, 1), (8, 1024, 0, 1), (1, 10, 100, 1),
])
def test_merge_factor(n, tokens_each, max_tokens, k):
    assert merge_factor(n, tokens_each, max_tokens) == k


def test_merged_micro_batches_are_the_same_rows_and_the_same_step():
    """Four micro-batches of 3 rows merged in twos (and in one): the rows in order, and a train_step
    over them (no dropout, fp32, plain SGD, whose step would show a loss scaled by another count of
    micro-batches) gives the step the four give: equal metrics and weights to float rounding.
    Shapes that differ are left alone."""
    g = torch.Generator().manual_seed(0)
    micro = [(torch.randint(0, 64, (3, 8), generator=g), torch.randint(0, 64, (3, 8), generator=g)) for _ in range(4)]
    merged = merge_micro_batches(micro, max_tokens=2 * 3 * 8)
    assert [x.shape for x, _ in merged] == [(6, 8), (6, 8)]
    assert torch.equal(torch.cat([x for x, _ in merged]), torch.cat([x for x, _ in micro]))
    assert torch.equal(torch.cat([y for _, y in merged]), torch.cat([y for _, y in micro]))
    assert merge_micro_batches(micro[:3] + [(micro[3][0][:2], micro[3][1][:2])], 1000)[3][0].shape == (2, 8)
    config = GPTConfig(vocab_size=64, max_seq_length=8, num_layers=1, num_heads=2, d_model=16, d_ff=32, dropout=0.0)
    steps = []
    for batches in (micro, merged, merge_micro_batches(micro, 10_000)):
        torch.manual_seed(0)
        model = GPT2Model(config, impl="torch")
        opt = torch.optim.SGD(model.parameters(), lr=0.5)  # no clipping, no Adam: the step scales with the loss
        metrics = train_step(model, opt, batches, device=torch.device("cpu"), dtype="fp32")
        steps.append((metrics, [p.detach().clone() for p in model.parameters()]))
    for metrics, params in steps[1:]:
        torch.testing.assert_close(metrics, steps[0][0], rtol=1e-6, atol=1e-6)
        assert metrics[2] == steps[0][0][2] == 4 * 3 * 8
        for p, q in zip(params, steps[0][1]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_second_ctrl_c_stops_now_and_the_run_resumes_exactly(base_args, tmp_path, capsys, monkeypatch, history):
    # One forward per micro-batch (--forward-tokens 0), so that the second Ctrl-C lands between two.
    args = base_args + ["--max-steps", "8", "--eval-interval", "0", "--grad-accum", "2", "--dropout", "0.1",
                        "--forward-tokens", "0"]
    rc, _, err = run_main(args + ["--out-dir", str(tmp_path / "straight")], capsys)
    assert rc == 0, err
    real_forward = GPT2Model.forward
    calls = {"n": 0}

    def interrupted(self, idx, targets=None, **kw):
        if self.training:
            calls["n"] += 1
            if calls["n"] == 12:  # step 6, its second micro-batch: Ctrl-C twice, mid-step
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
        return real_forward(self, idx, targets, **kw)

    monkeypatch.setattr(GPT2Model, "forward", interrupted)
    out_dir = tmp_path / "int"
    rc, _, err = run_main(args + ["--out-dir", str(out_dir)], capsys)
    assert rc == 130
    lines = err.strip().splitlines()
    assert lines[0].startswith("Ctrl-C: stopping after the current step (step 6)"), err
    assert lines[1].startswith("Ctrl-C again: stopping now"), err
    assert lines[2].startswith("interrupted at step 5 (now, the step in progress dropped)") and "--resume" in lines[2]
    ck = load_checkpoint(out_dir / LAST_NAME)
    assert ck["step"] == 5 and ck["batches"][0]["drawn"] == 10  # the boundary: 5 steps x 2 micro-batches
    monkeypatch.setattr(GPT2Model, "forward", real_forward)
    rc, _, err = run_main(["--resume", "--out-dir", str(out_dir)], capsys)
    assert rc == 0, err
    # Dropout on, so the RNG stream had to be rewound too: bitwise the uninterrupted run.
    assert history(out_dir)["train_log"]["losses"] == history(tmp_path / "straight")["train_log"]["losses"]
    assert history(out_dir)["final_perplexity"] == history(tmp_path / "straight")["final_perplexity"]


@pytest.mark.parametrize("case", ["missing_data", "empty_data", "batch_size_0", "accum_0", "eval_batch_negative",
                                  "forward_tokens_negative", "resume_without_ckpt",
                                  "corrupt_ckpt", "text_as_ckpt", "triton_missing", "triton_head_dim", "bad_device",
                                  "no_tensorboard",
                                  "refusal", "resume_and_overwrite", "weight_decay_on", "out_dir_is_a_file",
                                  "out_dir_under_a_file", "tensorboard_under_a_file"])
def test_bad_input_one_line_exit_1(case, base_args, tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    old = {BEST_NAME: b"earlier best", HISTORY_NAME: b'{"earlier": 1}'}
    for name, data in old.items():
        (out_dir / name).write_bytes(data)
    # --overwrite (the old run's files are there) must not delete anything when the new run fails.
    args = base_args + ["--max-steps", "2", "--out-dir", str(out_dir), "--overwrite"]
    expect = {
        "missing_data": "nope.jsonl does not exist", "empty_data": "empty.txt is empty",
        "batch_size_0": "--batch-size must be >= 1", "accum_0": "--grad-accum must be >= 1",
        "eval_batch_negative": "--eval-batch-size must be >= 0 (0 = a step's sequences), got -2",
        "forward_tokens_negative": "--forward-tokens must be >= 0 (0 = one forward per micro-batch), got -1",
        "resume_without_ckpt": f"no run to continue in {out_dir} (it holds", "corrupt_ckpt": "corrupt or truncated",
        "text_as_ckpt": "not a loadable checkpoint of this project", "triton_missing": "Triton kernels are unavailable",
        "triton_head_dim": "the kernels need a head dim in (16, 32, 64, 128) and, for attention dropout, a Hopper GPU or newer (this model: "
                           "head dim 8, attn dropout 0.0); use --impl torch or auto",
        "bad_device": "--device 'tpu' is not a device name", "no_tensorboard": "pip install tensorboard",
        "refusal": "continue it with --resume, replace it with --overwrite, or choose another --out-dir",
        "resume_and_overwrite": "choose one", "weight_decay_on": "invalid choice",
        "out_dir_is_a_file": "is a file, not a directory",
        "out_dir_under_a_file": f"cannot create --out-dir {tmp_path / 'notes.txt' / 'run'}: {tmp_path / 'notes.txt'} is "
                                "a file, not a directory",
        "tensorboard_under_a_file": f"cannot create --tensorboard {tmp_path / 'notes.txt' / 'tb'}: "
                                    f"{tmp_path / 'notes.txt'} is a file, not a directory",
    }[case]
    if case == "missing_data":
        args += ["--data", str(tmp_path / "nope.jsonl")]
    elif case == "empty_data":
        (tmp_path / "empty.txt").write_text("")
        args += ["--data", str(tmp_path / "empty.txt")]
    elif case == "batch_size_0":
        args += ["--batch-size", "0"]
    elif case == "accum_0":
        args += ["--grad-accum", "0"]
    elif case == "eval_batch_negative":
        args += ["--eval-batch-size", "-2"]
    elif case == "forward_tokens_negative":
        args += ["--forward-tokens", "-1"]
    elif case in ("resume_without_ckpt", "corrupt_ckpt", "text_as_ckpt"):
        args = ["--resume", "--out-dir", str(out_dir)]
        if case != "resume_without_ckpt":
            if case == "corrupt_ckpt":  # a real checkpoint, cut short
                torch.save({"model_state_dict": {"w": torch.zeros(1000)}, "config": GPTConfig().to_dict()}, out_dir / LAST_NAME)
                old[LAST_NAME] = (out_dir / LAST_NAME).read_bytes()[:-100]
            else:
                old[LAST_NAME] = b"step 40, trust me\n"
            (out_dir / LAST_NAME).write_bytes(old[LAST_NAME])
    elif case == "triton_missing":
        monkeypatch.setitem(sys.modules, "kernels", None)  # `import kernels` raises ImportError
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        args += ["--impl", "triton"]
    elif case == "triton_head_dim":  # d_model 32 over 4 heads
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        args += ["--impl", "triton", "--num-heads", "4"]
    elif case == "bad_device":
        args += ["--device", "tpu"]
    elif case == "no_tensorboard":
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
        args += ["--tensorboard", str(tmp_path / "tb")]
    elif case == "refusal":
        args.remove("--overwrite")
        torch.save({"model_state_dict": {}, "config": GPTConfig().to_dict(), "step": 40}, out_dir / LAST_NAME)
        old[LAST_NAME] = (out_dir / LAST_NAME).read_bytes()
        expect = "holds a run (step 40): " + expect
    elif case == "resume_and_overwrite":
        args += ["--resume"]
    elif case == "weight_decay_on":
        args += ["--weight-decay-on", "biases"]
    elif case == "out_dir_is_a_file":
        (tmp_path / "notes.txt").write_text("mine")
        args += ["--out-dir", str(tmp_path / "notes.txt")]
    elif case in ("out_dir_under_a_file", "tensorboard_under_a_file"):  # found before the data is prepared
        (tmp_path / "notes.txt").write_text("mine")
        monkeypatch.setattr("gpt.data.prepare_data", lambda *a, **k: pytest.fail("prepared the data first"))
        # The package check comes first: without tensorboard installed (a GPU image) it would answer instead.
        monkeypatch.setattr("gpt.train.tensorboard_writer_class", lambda: None)
        args += (["--out-dir", str(tmp_path / "notes.txt" / "run")] if case == "out_dir_under_a_file"
                 else ["--tensorboard", str(tmp_path / "notes.txt" / "tb")])
    if case == "weight_decay_on":  # argparse's own one-line usage error, exit 2
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2 and expect in capsys.readouterr().err
    else:
        rc, _, err = run_main(args, capsys)
        lines = err.strip().splitlines()
        assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
        assert "Traceback" not in err and "weights_only" not in err
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == old
    assert not (tmp_path / "tb").exists()


def test_help_every_flag_described_once_with_the_presets_values(capsys):
    for preset in PRESETS:
        with pytest.raises(SystemExit) as exc:
            main(["--preset", preset, "--help"])
        assert exc.value.code == 0
        text = " ".join(capsys.readouterr().out.split())  # unwrapped
        assert "(default: None)" not in text and "--no-progress" in text
        assert "hide the progress bars (shown by default)" in text
        tc = PRESETS[preset].train
        assert f"(preset {preset}: {tc.batch_size})" in text and f"(preset {preset}: {tc.weight_decay_on})" in text
    parser = build_parser("tiny")
    for action in parser._actions:
        assert action.help and action.help.count("(default:") + action.help.count("(preset ") <= 1, action.option_strings
    assert set(field_comments(TrainConfig)) == {f for f in TrainConfig.__dataclass_fields__}
    assert set(field_comments(GPTConfig)) == {f for f in GPTConfig.__dataclass_fields__}


def test_seed_preset_is_the_seed_recipe():
    """bench/seed_recipe.py's description: AdamW(model.parameters(), lr 2e-4, wd 0.01, betas (0.9, 0.95)),
    500 warmup steps then cosine to 0, clipping 1.0, batch 4 x accumulation 8, dropout 0.1."""
    seed, tiny = PRESETS["seed"].train, PRESETS["tiny"].train
    assert (seed.batch_size, seed.grad_accum, seed.lr, seed.weight_decay, seed.beta1, seed.beta2, seed.warmup_steps,
            seed.grad_clip, seed.min_lr_ratio, seed.weight_decay_on) == (4, 8, 2e-4, 0.01, 0.9, 0.95, 500, 1.0, 0.0, "all")
    assert PRESETS["seed"].model.dropout == 0.1
    model = GPT2Model(GPTConfig(vocab_size=50, max_seq_length=8, num_layers=1, num_heads=2, d_model=16, d_ff=32))
    opt = build_optimizer(model, seed, torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert lr_at(10**6, seed, 10**6) == 0.0  # cosine to 0
    # Our preferred choices live in the other presets: decay on matrices only, cosine to 10%.
    opt = build_optimizer(model, tiny, torch.device("cpu"))
    assert {g["weight_decay"] for g in opt.param_groups} == {tiny.weight_decay, 0.0}
    assert all(p.dim() < 2 for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"])
    assert lr_at(600, tiny, 600) == pytest.approx(tiny.lr * 0.1)


def test_seed_protocol_scores_padded_rows_counting_pads():
    stories = [[5, 6, 7], [8, 0, 9, 10], list(range(11, 311))]  # the last one is longer than a row
    tokens = np.array([t for s in stories for t in (*s, EOS_ID)], dtype=np.uint16)
    rows = story_rows(tokens)
    assert rows.shape == (3, 256)
    assert rows[0].tolist() == [5, 6, 7] + [EOS_ID] * 253 and rows[2].tolist() == list(range(11, 267))
    torch.manual_seed(0)
    model = GPT2Model(GPTConfig(max_seq_length=256, num_layers=1, num_heads=2, d_model=16, d_ff=32), impl="torch")
    got = evaluate_seed_protocol(model, tokens, 2, torch.device("cpu"), "fp32")
    x, y = torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])
    with torch.no_grad():
        logits = model.eval()(x)
    counted = y != SEED_IGNORE_INDEX  # the seed ignored "!" (id 0) and counted every pad
    losses = F.cross_entropy(logits.flatten(0, 1).double(), y.flatten(), reduction="none")[counted.flatten()]
    assert got["tokens"] == 3 * 255 - 1 and got["rows"] == 3
    assert got["loss"] == pytest.approx(losses.mean().item(), rel=1e-6)
    assert got["accuracy"] == pytest.approx((logits.argmax(-1) == y)[counted].double().mean().item())


def test_seed_protocol_in_history_and_tensorboard(base_args, tmp_path, capsys, history):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out_dir, tb = tmp_path / "s", tmp_path / "tb"
    rc, out, err = run_main(base_args + ["--max-seq-length", "256", "--max-steps", "3", "--eval-interval", "0",
                                         "--log-interval", "1", "--tensorboard", str(tb), "--out-dir", str(out_dir)], capsys)
    assert rc == 0, err
    h = history(out_dir)
    seed = h["seed_protocol_test"]
    assert seed["rows"] == h["data"]["stories"]["test"] and seed["perplexity"] == pytest.approx(math.exp(seed["loss"]))
    assert "padded" in seed["protocol"] and "every real token" in h["test_protocol"]
    assert f"test by the seed's protocol (stories padded to 256 with EOS, pads counted): perplexity {seed['perplexity']:.2f}" in out
    events = EventAccumulator(str(tb))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(h["train_log"]["losses"])
    assert [e.step for e in events.Scalars("val/loss")] == [3]
    assert events.Scalars("test/perplexity")[0].value == pytest.approx(h["final_perplexity"], rel=1e-6)


def test_hub_unreachable_fails_fast_without_retries(base_args, tmp_path, capsys, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub contacted after the probe failed"))
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as s:  # a port nobody listens on: refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    args = [a for a in base_args if a != "--no-progress"]
    args = args[:args.index("--data")] + args[args.index("--data") + 2:]  # no --data: the hub
    rc, _, err = run_main(args + ["--out-dir", str(tmp_path / "o")], capsys)
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "does not answer" in lines[0] and "--data PATH" in lines[0], err
    assert "tokenizing" not in err
