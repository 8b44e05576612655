"""train.py as a user runs it, in real processes: the refusal, one-flag resume from anywhere, Ctrl-C,
torchrun (DDP equivalence, and a killed worker restarted by --max-restarts with --resume auto); and
the data-side items of the same issue (the .txt separator message, one cache for gpt.data and train.py).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpt import data as data_mod
from gpt.checkpoint import load_checkpoint
from gpt.data import DataError, prepare_data
from gpt.tokenizer import get_tokenizer
from gpt.train import main
from gpt.trainer import HISTORY_NAME, LAST_NAME

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _env(**drop) -> dict:
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONPATH": str(ROOT)}


def _cli(args, cwd=ROOT, env=None, timeout=180):
    return subprocess.run(args, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in d.iterdir()}


def test_refusal_then_one_flag_resume_from_another_directory(base_args, tmp_path, history, capsys):
    out = tmp_path / "run"
    args = [*base_args, "--max-steps", "4", "--eval-interval", "0", "--out-dir", str(out)]
    assert main(args) == 0, capsys.readouterr().err  # the first run in this process: faster
    before = _files(out)

    again = _cli([sys.executable, "train.py", *args])  # the same command into the same directory
    assert again.returncode == 1
    assert again.stderr.strip() == (f"error: {out} already holds a run (step 4): continue it with --resume, replace it "
                                    "with --overwrite, or choose another --out-dir")
    assert _files(out) == before

    # One flag, from elsewhere, without the environment that named the tokenizer and data.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resumed = _cli([sys.executable, str(ROOT / "train.py"), "--resume", "--out-dir", str(out), "--max-steps", "6"],
                   cwd=elsewhere, env=_env(GPT2_TOKENIZER_DIR=None, TINYSTORIES_DIR=None))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming at step 4 of {out / LAST_NAME}" in resumed.stdout
    h = history(out)
    assert h["steps"] == 6 and h["train_log"]["steps"] == [4, 5, 6] and h["tokens_seen"] == 6 * 128
    assert h["run_options"]["data"] == str(Path(base_args[base_args.index("--data") + 1]).resolve())
    assert not any(elsewhere.iterdir())  # nothing written where the command ran (the cache is the run's)


@pytest.mark.parametrize("sig,name,again,code", [
    (signal.SIGINT, "Ctrl-C", "press Ctrl-C again", 130),
    (signal.SIGTERM, "SIGTERM", "send SIGTERM again", 143),  # a scheduler's preemption, kill, torchrun's shutdown
], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_says_so_at_once_and_writes_resumable_checkpoint(base_args, tmp_path, sig, name, again, code):
    out_dir = tmp_path / "int"
    proc = subprocess.Popen([sys.executable, "-u", "train.py", *base_args, "--max-steps", "100000", "--log-interval", "1",
                             "--eval-interval", "0", "--out-dir", str(out_dir)],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # the start line comes just before the first step
            if line.startswith("train: preset"):
                break
        proc.send_signal(sig)
        notice = "\n"
        while notice == "\n":  # the first line on stderr (after a blank one) is the notice
            notice = proc.stderr.readline()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert notice.startswith(f"{name}: stopping after the current step") and f"{again} to stop now" in notice
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted at step") and "--resume" in lines[0], err
    step = int(lines[0].split()[3])
    ck = load_checkpoint(out_dir / LAST_NAME)
    assert ck["step"] == step and ck["batches"][0]["drawn"] == step  # a step boundary: grad_accum 1


def test_torchrun_two_ranks_match_single_process_accumulation(base_args, tmp_path, history, capsys):
    # Two ranks on one machine: gloo on the CPU (a GPU host may have a single GPU).
    args = base_args + ["--max-steps", "3", "--eval-interval", "0", "--log-interval", "1", "--grad-accum", "2",
                        "--lr", "1e-2", "--warmup-steps", "0", "--device", "cpu"]
    ddp = _cli([*TORCHRUN, "train.py", *args, "--out-dir", str(tmp_path / "ddp")])
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert "2 process(es)" in ddp.stdout and ddp.stdout.count("test perplexity") == 1  # rank 0 prints
    assert main([*args, "--out-dir", str(tmp_path / "one")]) == 0, capsys.readouterr().err
    a, b = history(tmp_path / "ddp"), history(tmp_path / "one")
    # Rank r draws global batches r, r + 2, ...: the same data as micro-steps of one process. Only the
    # order of the gradient sums differs (all-reduce vs accumulation), so equal to float rounding.
    assert a["train_log"]["losses"] == pytest.approx(b["train_log"]["losses"], rel=1e-5, abs=0)
    assert a["val_losses"] == pytest.approx(b["val_losses"], rel=1e-5, abs=0)
    assert a["train_log"]["losses"][-1] != b["train_log"]["losses"][0]  # training moved the loss


def test_torchrun_two_ranks_graphed_match_ddp(base_args, tmp_path, history):
    """Under torchrun the step is captured too (``GraphedTrainStep(process_group=...)``: the backward's
    graph, one all-reduce, the update's graph). On a CPU the stand-in for the graph runs (the refusal
    of a CPU lifted in ``tests/graphed_ddp.py``): the same losses as DDP's eager steps."""
    args = [a for a in base_args if a != "--no-cuda-graph"] + [
        "--max-steps", "8", "--eval-interval", "4", "--log-interval", "1", "--grad-accum", "2", "--lr", "1e-2",
        "--warmup-steps", "0", "--device", "cpu", "--dropout", "0"]
    env = {**_env(), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    runs = {}
    for name, extra in (("ddp", ["--no-cuda-graph"]), ("graphed", [])):
        run = _cli([*TORCHRUN, str(ROOT / "tests" / "graphed_ddp.py"), "train", *args, *extra,
                    "--out-dir", str(tmp_path / name)], env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        assert ("CUDA graph" in run.stdout.splitlines()[0]) == (name == "graphed"), run.stdout.splitlines()[0]
        runs[name] = history(tmp_path / name)
    ddp, graphed = runs["ddp"], runs["graphed"]
    assert graphed["train_log"]["losses"] == pytest.approx(ddp["train_log"]["losses"], rel=1e-5, abs=0)
    assert graphed["val_losses"] == pytest.approx(ddp["val_losses"], rel=1e-5, abs=0)
    assert graphed["final_perplexity"] == pytest.approx(ddp["final_perplexity"], rel=1e-5)
    assert ddp["train_log"]["losses"][-1] != ddp["train_log"]["losses"][0]  # training moved the loss


def _worker_pid(agent: int, rank: int) -> int | None:
    """The torchrun worker of ``rank`` under the process ``agent`` (from /proc), or None."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == agent and f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RESTART_COUNT=0" in environ:
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker of a rank through /proc (Linux)")
def test_torchrun_restarts_a_killed_worker_and_the_run_finishes(base_args, tmp_path, history):
    out = tmp_path / "k"
    args = base_args + ["--max-steps", "40", "--eval-interval", "20", "--checkpoint-interval", "10", "--log-interval", "1",
                        "--grad-accum", "2", "--resume", "auto", "--out-dir", str(out), "--device", "cpu"]
    proc = subprocess.Popen([*TORCHRUN, "--max-restarts", "2", "train.py", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / LAST_NAME).exists():  # the first checkpoint: step 10
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.05)
        victim = _worker_pid(proc.pid, rank=1)
        assert victim is not None
        saved = load_checkpoint(out / LAST_NAME)["step"]
        os.kill(victim, signal.SIGKILL)
        output, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert "exitcode: -9" in output  # the kill was seen, the workers restarted
    resumes = [line for line in output.splitlines() if "resuming at step" in line]
    assert len(resumes) == 1, output[-3000:]
    resumed_at = int(resumes[0].split("resuming at step ")[1].split()[0])
    assert saved <= resumed_at < 40 and resumed_at % 10 == 0  # at most the steps since the last checkpoint lost
    h = history(out)
    assert h["steps"] == 40 and h["tokens_seen"] == 40 * 256
    assert h["train_log"]["steps"] == list(range(1, 41))  # continuous: every step logged once, in order
    assert h["train_log"]["tokens"] == [256 * s for s in range(1, 41)] and h["val_steps"] == [20, 40]
    assert all(np.isfinite(h["train_log"]["losses"])) and h["val_losses"][1] < h["val_losses"][0]
    assert (out / HISTORY_NAME).exists()


def test_sigterm_to_torchrun_stops_every_rank_at_one_step_with_last_pt(base_args, tmp_path, history):
    """A scheduler's SIGTERM goes to torchrun's agent, which passes it to its workers: the ranks agree
    at the next log step, write one last.pt there, and --resume continues from it."""
    out = tmp_path / "term"
    args = base_args + ["--max-steps", "100000", "--eval-interval", "0", "--log-interval", "2", "--grad-accum", "2",
                        "--out-dir", str(out), "--device", "cpu"]
    proc = subprocess.Popen([*TORCHRUN, "train.py", *args], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # rank 0's ETA line: three steps done
            if line.startswith("speed after 3 steps"):
                break
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    notices = [line for line in output.splitlines() if line.startswith("SIGTERM: stopping after the current step")]
    assert len(notices) == 1, output[-3000:]  # rank 0 says it, once
    stopped = [line for line in output.splitlines() if line.startswith("interrupted at step")]
    assert len(stopped) == 1 and "saved" in stopped[0], output[-3000:]
    step = int(stopped[0].split()[3])
    ck = load_checkpoint(out / LAST_NAME)
    assert ck["step"] == step >= 3 and step % 2 == 0  # the log step where the ranks agreed
    assert ck["world_size"] == 2 and [b["drawn"] for b in ck["batches"]] == [step, step]  # both ranks' positions
    resumed = _cli([*TORCHRUN, "train.py", "--resume", "--out-dir", str(out), "--max-steps", str(step + 2)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert history(out)["steps"] == step + 2


def test_grad_accum_must_divide_by_world_size(base_args, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(base_args + ["--grad-accum", "3", "--out-dir", str(tmp_path / "o")]) == 1
    assert "divisible by the number of processes (2)" in capsys.readouterr().err


def test_txt_without_separator_names_the_separator(tmp_path, tokenizer_dir):
    blank_separated = tmp_path / "stories.txt"
    blank_separated.write_text("Once there was a cat.\n\nThe end.\n\nAnother story.\n")
    with pytest.raises(DataError, match=r"stories\.txt: not in TinyStories \.txt format: no line holding only "
                                        r"<\|endoftext\|>, the line that separates stories"):
        prepare_data(blank_separated, get_tokenizer(str(tokenizer_dir)), tmp_path / "c", 0, progress=False)


def test_gpt_data_and_train_share_one_cache(tmp_path, tokenizer_dir, stories_dir, capsys, monkeypatch):
    """`python -m gpt.data` (its default: the seed's first 270,000 stories) and train.py --preset tiny (all
    stories) ask for the same splits of the 8,700-story sample: one tokenization, one cache entry."""
    cache = tmp_path / "cache"
    sample = stories_dir / "tinystories-sample.jsonl"
    assert data_mod.main(["--data", str(sample), "--tokenizer", str(tokenizer_dir), "--cache-dir", str(cache),
                          "--quiet"]) == 0
    capsys.readouterr()
    tok = get_tokenizer(str(tokenizer_dir))
    monkeypatch.setattr(tok, "encode_batch", lambda texts: pytest.fail("tokenized again"))
    again = prepare_data(sample, tok, cache, num_stories=0, progress=False)  # what --preset tiny asks for
    assert [p.name for p in cache.iterdir()] == [again.path.name]
    assert again.meta["stories"]["train"] + again.meta["stories"]["val"] + again.meta["stories"]["test"] == 8700
    # A count below the source's size is a different dataset, tokenized on its own.
    monkeypatch.undo()
    fewer = prepare_data(sample, get_tokenizer(str(tokenizer_dir)), cache, num_stories=100, progress=False)
    assert fewer.path != again.path and sum(fewer.meta["stories"].values()) == 100
