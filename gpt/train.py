"""The training loop: AdamW + warmup/cosine, mixed precision, gradient accumulation, DDP, exact resume.

``main(argv)`` is the command line (``python train.py --help``). Every ``GPTConfig``/``TrainConfig``
field is a flag (``--d-model``, ``--warmup-steps``...) overriding the chosen preset. Outputs in
``--out-dir``: ``gpt2_best_model.pt`` (best validation loss), ``last.pt`` (for ``--resume``),
``training_history.json`` and ``training_curves_with_accuracy.png``.

The step never waits on the device: loss, correct and counted targets accumulate in a device tensor
that is read (one sync) only every ``--log-interval`` steps, where NaN/inf is also caught.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import PRESETS, GPTConfig, TrainConfig, get_preset
from .model import IMPLS, GPT2Model, select_ops

SEED_PROMPTS = ("Once upon a time", "The little girl", "In a magical forest", "The brave knight")
BEST_NAME, LAST_NAME = "gpt2_best_model.pt", "last.pt"
HISTORY_NAME, CURVES_NAME = "training_history.json", "training_curves_with_accuracy.png"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Measured on this project's 2-core AMD EPYC (avx512_bf16), tiny preset, 16 x 128 tokens per step:
# bf16 autocast was 7% faster when the machine was quiet (1638 vs 1526 tokens/s) and no faster under
# load (270 vs 278): not worth bf16's precision, so CPUs default to fp32.
CPU_DEFAULT_DTYPE = "fp32"


class TrainError(Exception):
    """A user-facing problem (bad flag, missing checkpoint, diverged loss): one line, exit 1."""


class StopTraining(Exception):
    """Ctrl-C arrived: the loop stops at the next step boundary and writes a resumable checkpoint."""


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOptions:
    """Settings of one run that are not part of the model or the optimisation recipe."""

    preset: str = "seed"
    data: str | None = None  # None: the Hugging Face hub's roneneldan/TinyStories
    tokenizer: str | None = None  # directory with vocab.json + merges.txt; None: the default lookup
    out_dir: str = "out"
    cache_dir: str = "data_cache"
    device: str | None = None  # None: cuda if available, else cpu
    impl: str = "auto"
    dtype: str | None = None  # None: bf16 on CUDA, CPU_DEFAULT_DTYPE on CPU
    compile: bool = False
    resume: bool = False
    seed: int = 1337
    log_interval: int = 10
    sample_length: int = 100
    progress: bool = True


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a GPT-2 on TinyStories. Preset values can be overridden by any flag below.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run = p.add_argument_group("run")
    run.add_argument("--preset", default="seed", choices=sorted(PRESETS), help="model + recipe preset ('tiny' for a CPU)")
    run.add_argument("--data", default=None, help="TinyStories .txt/.jsonl/.parquet file or directory (default: the HF hub)")
    run.add_argument("--tokenizer", default=None, help="GPT-2 tokenizer directory (vocab.json, merges.txt)")
    run.add_argument("--out-dir", default="out")
    run.add_argument("--cache-dir", default="data_cache", help="where tokenized splits are cached")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    run.add_argument("--impl", default="auto", choices=IMPLS, help="hot-op implementation (auto: triton on CUDA)")
    run.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                     help=f"autocast dtype (default: bf16 on CUDA, {CPU_DEFAULT_DTYPE} on CPU)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--resume", action="store_true", help=f"continue from OUT_DIR/{LAST_NAME}")
    run.add_argument("--seed", type=int, default=1337)
    run.add_argument("--log-interval", type=int, default=10, help="steps between metric reads (host syncs)")
    run.add_argument("--sample-length", type=int, default=100, help="tokens per generated sample at the end")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    # Every dataclass field is a flag; None means "the preset's value".
    for title, cls in (("model (GPTConfig)", GPTConfig), ("training (TrainConfig)", TrainConfig)):
        group = p.add_argument_group(title)
        for f in fields(cls):
            group.add_argument(_flag(f.name), type=type(f.default), default=None, dest=f.name,
                               help=f"preset value if omitted (seed: {f.default})")
    return p


def _overrides(ns: argparse.Namespace, cls) -> dict:
    return {f.name: getattr(ns, f.name) for f in fields(cls) if getattr(ns, f.name) is not None}


def validate_train_config(tc: TrainConfig, world_size: int = 1) -> None:
    checks = [
        (tc.batch_size >= 1, f"--batch-size must be >= 1, got {tc.batch_size}"),
        (tc.grad_accum >= 1, f"--grad-accum must be >= 1, got {tc.grad_accum}"),
        (tc.lr > 0, f"--lr must be > 0, got {tc.lr}"),
        (0 <= tc.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {tc.min_lr_ratio}"),
        (tc.weight_decay >= 0, f"--weight-decay must be >= 0, got {tc.weight_decay}"),
        (0 <= tc.beta1 < 1 and 0 <= tc.beta2 < 1, f"betas must be in [0, 1), got ({tc.beta1}, {tc.beta2})"),
        (tc.grad_clip >= 0, f"--grad-clip must be >= 0 (0 = off), got {tc.grad_clip}"),
        (tc.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {tc.warmup_steps}"),
        (tc.max_steps >= 0, f"--max-steps must be >= 0, got {tc.max_steps}"),
        (tc.max_steps > 0 or tc.epochs > 0, "need --max-steps > 0 or --epochs > 0"),
        (tc.eval_interval >= 0, f"--eval-interval must be >= 0, got {tc.eval_interval}"),
        (tc.eval_tokens >= 0, f"--eval-tokens must be >= 0, got {tc.eval_tokens}"),
        (tc.patience >= 0, f"--patience must be >= 0 (0 = never stop early), got {tc.patience}"),
        (tc.num_stories >= 0, f"--num-stories must be >= 0, got {tc.num_stories}"),
        (tc.grad_accum % world_size == 0,
         f"--grad-accum ({tc.grad_accum}) must be divisible by the number of processes ({world_size})"),
    ]
    for ok, msg in checks:
        if not ok:
            raise TrainError(msg)


# ----------------------------------------------------------------------------------------------
# Pieces reusable outside the loop (benchmarks use them)
# ----------------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2, embeddings included) only; fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=device.type == "cuda")


def lr_at(step: int, tc: TrainConfig, max_steps: int) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` down to ``lr * min_lr_ratio``."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    span = max(1, max_steps - tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / span)
    min_lr = tc.lr * tc.min_lr_ratio
    return min_lr + 0.5 * (tc.lr - min_lr) * (1 + math.cos(math.pi * progress))


def optimizer_step(optimizer, scaler: torch.amp.GradScaler, params: list, grad_clip: float) -> None:
    """Unscale (fp16), clip the global gradient norm, step, clear the gradients. No host sync but fp16's."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def autocast_context(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def flops_per_token(config: GPTConfig) -> int:
    """Training FLOPs per token as nanoGPT estimates them: 6N + 12 L d T (N without positions)."""
    n = config.num_params() - config.max_seq_length * config.d_model
    return 6 * n + 12 * config.num_layers * config.d_model * config.max_seq_length


def peak_flops(device: torch.device) -> float | None:
    """Data-sheet bf16 peak (FLOP/s) of a known CUDA device, else None."""
    if device.type != "cuda":
        return None
    try:
        from bench.common import PEAKS
    except ImportError:
        return None
    name = torch.cuda.get_device_name(device)
    return next((v["bf16_tflops"] * 1e12 for k, v in PEAKS.items() if k in name), None)


@torch.no_grad()
def evaluate(model, tokens, context: int, batch_size: int, device: torch.device, dtype: str,
             max_tokens: int = 0, rank: int = 0, world_size: int = 1, should_stop=None) -> dict:
    """Loss, perplexity and next-token accuracy over the real tokens of ``tokens`` (each once).

    ``model(x, y)`` must return an ``LMLoss``. Under DDP each rank takes every world_size-th batch
    and the sums are all-reduced, so every rank gets the same numbers.
    """
    from .data import eval_batches

    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * count, correct, count
    for i, (x, y) in enumerate(eval_batches(tokens, context, batch_size, max_tokens)):
        if should_stop is not None and should_stop():
            raise StopTraining
        if i % world_size != rank:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast_context(device, dtype):
            out = model(x, y)
        sums += torch.stack([out.loss.double() * out.count, out.correct.double(), out.count.double()])
    if world_size > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    loss_sum, correct, count = sums.tolist()
    loss = loss_sum / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": correct / max(count, 1.0),
            "tokens": int(count)}


def rng_states(device: torch.device) -> dict:
    """Torch (CPU and CUDA), NumPy and Python RNG states as tensors and plain values (weights_only-safe)."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos), "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss),
        "python_version": py_version, "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": py_gauss,
    }


def set_rng_states(s: dict, device: torch.device) -> None:
    torch.set_rng_state(s["torch"])
    if device.type == "cuda" and s["cuda"] is not None:
        torch.cuda.set_rng_state(s["cuda"], device)
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), s["numpy_pos"],
                         s["numpy_has_gauss"], s["numpy_gauss"]))
    random.setstate((s["python_version"], tuple(s["python_state"].tolist()), s["python_gauss"]))


def _plain(obj):
    """NumPy arrays/scalars inside a state dict -> tensors/Python numbers, so weights_only can load it."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def write_json(obj: dict, path: Path) -> None:
    """Atomic JSON write: temp file in the same directory, then os.replace."""
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def plot_curves(history: dict, path: Path) -> None:
    """Loss, perplexity and accuracy against steps (top) and tokens (bottom), train and validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr, ev = history["train_log"], history
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for row, (key_tr, key_ev, xlabel) in enumerate((("steps", "val_steps", "optimizer step"),
                                                    ("tokens", "val_tokens", "training tokens"))):
        series = (("loss", tr["losses"], ev["val_losses"], lambda v: v),
                  ("perplexity", tr["losses"], ev["val_losses"], lambda v: math.exp(min(v, 50.0))),
                  ("next-token accuracy", tr["accuracies"], ev["val_accuracies"], lambda v: v))
        for ax, (name, tr_vals, ev_vals, f) in zip(axes[row], series):
            ax.plot(tr[key_tr], [f(v) for v in tr_vals], label="train")
            ax.plot(ev[key_ev], [f(v) for v in ev_vals], "o-", label="validation")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(name)
            if name == "perplexity":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cuda": torch.version.cuda,
    }


class RankBatches:
    """Rank ``rank``'s share of the single-process batch stream: global batches rank, rank + W, rank + 2W...

    ``TrainBatches`` draws global batch g from a generator seeded by (seed, 0, g), so a rank can draw
    any global batch by setting the stream position. With W ranks of A micro-batches each, optimizer
    step s covers global batches s*A*W ... s*A*W + A*W - 1: exactly what one process with A*W
    micro-batches draws, so DDP and single-process accumulation see the same data.
    """

    def __init__(self, tokens, batch_size: int, context: int, seed: int, rank: int = 0, world_size: int = 1):
        from .data import TrainBatches

        self.stream = TrainBatches(tokens, batch_size, context, seed=seed)  # the global (single-process) stream
        self.rank, self.world_size = rank, world_size
        self.drawn = 0  # batches this rank has drawn

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.stream.state_dict()
        state["step"] = self.drawn * self.world_size + self.rank
        self.stream.load_state_dict(state)
        self.drawn += 1
        return self.stream.next()

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "rank": self.rank, "world_size": self.world_size,
                "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(f"batch state is for rank {state['rank']} of {state['world_size']}, "
                             f"this is rank {self.rank} of {self.world_size}")
        self.stream.load_state_dict(state["stream"])
        self.drawn = int(state["drawn"])


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------


class Trainer:
    """One training run: ``setup()``, ``train()`` (checkpoints on the way), then ``finish()`` (test, samples, outputs)."""

    def __init__(self, opts: RunOptions, model_cfg: GPTConfig, tc: TrainConfig):
        self.opts, self.model_cfg, self.tc = opts, model_cfg, tc
        self.out = Path(opts.out_dir)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.master = self.rank == 0
        self.device = self._pick_device()
        self.dtype = opts.dtype or ("bf16" if self.device.type == "cuda" else CPU_DEFAULT_DTYPE)
        self.accum = tc.grad_accum // self.world  # micro-batches per rank per optimizer step
        self.tokens_per_step = tc.batch_size * tc.grad_accum * model_cfg.max_seq_length
        self._stop_requested = False  # set by the SIGINT handler of this process
        self._stop_agreed = False  # acted on: every rank sees the same value (agreed at log steps under DDP)

    def _pick_device(self) -> torch.device:
        name = self.opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise TrainError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1 ...)") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise TrainError(f"--device {name}: no CUDA GPU is available (use --device cpu --preset tiny)")
            if self.world > 1:
                device = torch.device("cuda", self.local_rank)
        elif device.type != "cpu":
            raise TrainError(f"--device {name}: only cpu and cuda are supported")
        return device

    # -- setup ---------------------------------------------------------------------------------

    def setup(self, resume_ckpt: dict | None) -> None:
        from .data import prepare_data
        from .tokenizer import get_tokenizer

        opts, tc, cfg = self.opts, self.tc, self.model_cfg
        if self.dtype == "fp16" and self.device.type == "cpu":
            raise TrainError("--dtype fp16 is for CUDA; use bf16 or fp32 on a CPU")
        if opts.impl == "triton":
            if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise TrainError("--impl triton needs a CUDA GPU (or TRITON_INTERPRET=1 for the slow interpreter)")
            try:
                select_ops("triton", self.device)
            except (ImportError, AttributeError) as e:
                raise TrainError(f"--impl triton: the Triton kernels are unavailable ({e})") from None
        self.tokenizer = get_tokenizer(opts.tokenizer)
        if self.tokenizer.vocab_size > cfg.vocab_size:
            raise TrainError(f"tokenizer has {self.tokenizer.vocab_size} tokens but --vocab-size is {cfg.vocab_size}")
        if self.world > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
        # Rank 0 tokenizes and caches first; the others then read the cache.
        if not self.master:
            dist.barrier()
        self.splits = prepare_data(opts.data, self.tokenizer, cache_dir=opts.cache_dir,
                                   num_stories=tc.num_stories, progress=opts.progress and self.master)
        if self.master and self.world > 1:
            dist.barrier()
        ctx = cfg.max_seq_length
        for name in ("train", "val", "test"):
            if len(getattr(self.splits, name)) < ctx + 1:
                raise TrainError(f"the {name} split has {len(getattr(self.splits, name))} tokens, fewer than "
                                 f"one context of {ctx + 1}; use more stories or a smaller --max-seq-length")
        self.max_steps = tc.max_steps or max(1, math.ceil(tc.epochs * len(self.splits.train) / self.tokens_per_step))

        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(opts.seed)  # same initial weights on every rank
        self.raw = GPT2Model(cfg, impl=opts.impl).to(self.device)
        self.optimizer = build_optimizer(self.raw, tc, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == "fp16")
        self.batches = RankBatches(self.splits.train, tc.batch_size, ctx, seed=opts.seed,
                                    rank=self.rank, world_size=self.world)
        torch.manual_seed(opts.seed + self.rank)  # dropout streams differ per rank
        self.step = 0
        self.tokens_seen = 0
        self.best_val = math.inf
        self.bad_evals = 0
        self.history = {
            "train_losses": [], "train_accuracies": [], "val_losses": [], "val_accuracies": [],
            "val_perplexities": [], "val_steps": [], "val_tokens": [],
            "train_log": {"steps": [], "tokens": [], "losses": [], "accuracies": []},
        }
        if resume_ckpt is not None:
            self._restore(resume_ckpt)
        self.fwd = torch.compile(self.raw) if opts.compile else self.raw  # evaluation calls this
        self.model = self.fwd  # training calls this: DDP-wrapped under torchrun
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.fwd, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _restore(self, ck: dict) -> None:
        try:
            self.raw.load_state_dict(ck["model_state_dict"])
            self.optimizer.load_state_dict(ck["optimizer"])
            self.scaler.load_state_dict(ck["scaler"])
            self.batches.load_state_dict(ck["batches"][self.rank])
            set_rng_states(ck["rng"][self.rank], self.device)
            self.step, self.tokens_seen = ck["step"], ck["tokens_seen"]
            self.best_val, self.bad_evals, self.history = ck["best_val_loss"], ck["bad_evals"], ck["history"]
        except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainError(f"{self.out / LAST_NAME} cannot be resumed from: {msg}") from None

    # -- checkpoints ---------------------------------------------------------------------------

    def _gather(self, obj):
        """Every rank's ``obj`` as a list (rank order) on every rank; [obj] when not distributed."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def _checkpoint(self) -> dict:
        # Collective: every rank must call this (data positions and RNG states are per rank).
        batches = self._gather(_plain(self.batches.state_dict()))
        rng = self._gather(rng_states(self.device))
        rng = [{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in r.items()} for r in rng]
        return {
            "model_state_dict": self.raw.state_dict(), "config": self.model_cfg.to_dict(),
            "train_config": asdict(self.tc), "run_options": asdict(self.opts),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "step": self.step, "max_steps": self.max_steps, "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val, "bad_evals": self.bad_evals, "history": self.history,
            "batches": batches, "rng": rng, "world_size": self.world,
        }

    def save_last(self) -> None:
        ck = self._checkpoint()
        if self.master:
            save_checkpoint(ck, self.out / LAST_NAME)

    # -- the loop ------------------------------------------------------------------------------

    def _request_stop(self, signum, frame) -> None:
        if self._stop_requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop_requested = True

    def _should_stop(self) -> bool:
        return self._stop_requested

    def _log(self, acc: torch.Tensor, pbar) -> None:
        """Read the accumulated metrics (the one host sync), check them, append to the history."""
        if self.world > 1:
            flag = torch.tensor([float(self._stop_requested)], dtype=torch.float64, device=self.device)
            both = torch.cat([acc, flag])
            dist.all_reduce(both)
            acc, self._stop_agreed = both[:3], bool(both[3].item() > 0)
        loss_sum, correct, count = acc.tolist()
        if count == 0:
            return
        loss = loss_sum / count
        if not math.isfinite(loss):
            raise TrainError(f"training loss became {loss} by step {self.step} (lr {self.lr:.3g}); "
                             f"stopped, the last good checkpoint is kept in {self.out / LAST_NAME}")
        log = self.history["train_log"]
        log["steps"].append(self.step)
        log["tokens"].append(self.tokens_seen)
        log["losses"].append(loss)
        log["accuracies"].append(correct / count)
        if pbar is not None:
            tps = self.session_tokens / max(self.train_time + time.perf_counter() - self.t_mark, 1e-9)
            pbar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)

    def _evaluate_and_checkpoint(self, pbar, since_eval: dict) -> bool:
        """Validation pass, best/last checkpoints, early-stopping bookkeeping. True = stop early."""
        tc = self.tc
        m = evaluate(self.fwd, self.splits.val, self.model_cfg.max_seq_length, tc.batch_size, self.device,
                     self.dtype, tc.eval_tokens, self.rank, self.world,
                     self._should_stop if self.world == 1 else None)
        if not math.isfinite(m["loss"]):
            raise TrainError(f"validation loss became {m['loss']} at step {self.step}; "
                             f"stopped, the last good checkpoint is kept in {self.out / LAST_NAME}")
        h = self.history
        log = h["train_log"]
        new = slice(since_eval["n"], None)
        tr_tokens = sum(np.diff([since_eval["tokens"]] + log["tokens"][new]))
        if len(log["losses"][new]):
            weights = np.diff([since_eval["tokens"]] + log["tokens"][new]) / max(tr_tokens, 1)
            h["train_losses"].append(float(np.dot(weights, log["losses"][new])))
            h["train_accuracies"].append(float(np.dot(weights, log["accuracies"][new])))
        else:
            h["train_losses"].append(log["losses"][-1] if log["losses"] else math.nan)
            h["train_accuracies"].append(log["accuracies"][-1] if log["accuracies"] else math.nan)
        since_eval.update(n=len(log["losses"]), tokens=self.tokens_seen)
        h["val_losses"].append(m["loss"])
        h["val_accuracies"].append(m["accuracy"])
        h["val_perplexities"].append(m["perplexity"])
        h["val_steps"].append(self.step)
        h["val_tokens"].append(self.tokens_seen)
        improved = m["loss"] < self.best_val
        if improved:
            self.best_val, self.bad_evals = m["loss"], 0
        else:
            self.bad_evals += 1
        ck = self._checkpoint()
        if self.master:
            if improved:
                save_checkpoint(ck, self.out / BEST_NAME)
            save_checkpoint(ck, self.out / LAST_NAME)
            msg = (f"step {self.step}/{self.max_steps} | val loss {m['loss']:.4f} ppl {m['perplexity']:.2f} "
                   f"acc {100 * m['accuracy']:.1f}% | train loss {h['train_losses'][-1]:.4f}"
                   + (" | best" if improved else f" | no improvement ({self.bad_evals}/{tc.patience})"))
            (pbar.write if pbar is not None else print)(msg)
        return tc.patience > 0 and self.bad_evals >= tc.patience

    def train(self) -> str:
        """Run the optimizer steps. Returns why it ended: 'done', 'early_stop' or 'interrupted'."""
        from tqdm import tqdm

        tc, opts = self.tc, self.opts
        acc = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss * count, correct, count
        params = list(self.raw.parameters())
        pbar = tqdm(total=self.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                    disable=not (self.master and opts.progress)) if self.master else None
        self.session_tokens, self.train_time, self.eval_time = 0, 0.0, 0.0
        since_eval = {"n": len(self.history["train_log"]["losses"]), "tokens": self.tokens_seen}
        reason = "done"
        self.lr = lr_at(self.step, tc, self.max_steps)
        self.t_mark = time.perf_counter()
        try:
            while self.step < self.max_steps:
                self.lr = lr_at(self.step, tc, self.max_steps)
                for g in self.optimizer.param_groups:
                    g["lr"] = self.lr
                for micro in range(self.accum):
                    x, y = self.batches.next()
                    if self.device.type == "cuda":
                        x, y = x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
                    last_micro = micro == self.accum - 1
                    sync = self.model.no_sync() if self.world > 1 and not last_micro else contextlib.nullcontext()
                    with sync:
                        with autocast_context(self.device, self.dtype):
                            out = self.model(x, y)
                        self.scaler.scale(out.loss / self.accum).backward()
                    acc += torch.stack([out.loss.detach().double() * out.count, out.correct.double(),
                                        out.count.double()])
                optimizer_step(self.optimizer, self.scaler, params, tc.grad_clip)
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                self.session_tokens += self.tokens_per_step
                if pbar is not None:
                    pbar.update(1)
                eval_now = self.step == self.max_steps or (tc.eval_interval and self.step % tc.eval_interval == 0)
                if eval_now or self.step % opts.log_interval == 0:
                    self._log(acc, pbar)
                    acc.zero_()
                if self._stop_agreed or (self.world == 1 and self._stop_requested):
                    raise StopTraining
                if eval_now:
                    now = time.perf_counter()
                    self.train_time += now - self.t_mark
                    stop = self._evaluate_and_checkpoint(pbar, since_eval)
                    self.t_mark = time.perf_counter()
                    self.eval_time += self.t_mark - now
                    if stop:
                        reason = "early_stop"
                        if self.master:
                            (pbar.write if pbar else print)(
                                f"early stop: no validation improvement in {tc.patience} evaluations")
                        break
        except StopTraining:
            reason = "interrupted"
        finally:
            if pbar is not None:
                pbar.close()
        self.train_time += time.perf_counter() - self.t_mark
        if reason == "interrupted":
            self.save_last()
        return reason

    def finish(self) -> dict:
        """Best model -> test metrics and samples; write the history JSON and the curves."""
        from .generate import generate_text

        best = self.out / BEST_NAME
        if self.world > 1:
            dist.barrier()  # rank 0 has finished writing the best checkpoint
        if best.exists():
            self.raw.load_state_dict(load_checkpoint(best, map_location=self.device)["model_state_dict"])
        test = evaluate(self.raw, self.splits.test, self.model_cfg.max_seq_length, self.tc.batch_size,
                        self.device, self.dtype, 0, self.rank, self.world)
        if not self.master:
            return {}
        samples = {}
        for prompt in SEED_PROMPTS:
            with autocast_context(self.device, self.dtype):
                samples[prompt] = generate_text(self.raw, self.tokenizer, prompt=prompt,
                                                max_length=self.opts.sample_length, device=self.device)
        tps = self.session_tokens / self.train_time if self.train_time > 0 else 0.0
        peak = peak_flops(self.device)
        h = self.history
        result = {
            **h,
            "final_perplexity": test["perplexity"], "test_loss": test["loss"], "test_accuracy": test["accuracy"],
            "test_tokens": test["tokens"], "generated_texts": samples,
            "steps": self.step, "max_steps": self.max_steps, "tokens_seen": self.tokens_seen,
            "tokens_per_step": self.tokens_per_step, "tokens_per_sec": tps,
            "train_seconds": self.train_time, "eval_seconds": self.eval_time,
            "flops_per_token": flops_per_token(self.model_cfg),
            "mfu": flops_per_token(self.model_cfg) * tps / peak if peak else None,
            "best_val_loss": self.best_val, "num_params": self.raw.num_params(),
            "config": self.model_cfg.to_dict(), "train_config": asdict(self.tc),
            "run_options": {**asdict(self.opts), "dtype": self.dtype, "world_size": self.world},
            "data": self.splits.meta, "environment": environment(self.device),
        }
        write_json(result, self.out / HISTORY_NAME)
        plot_curves(h, self.out / CURVES_NAME)
        return result


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def _configs(ns: argparse.Namespace, resume_ckpt: dict | None) -> tuple[GPTConfig, TrainConfig]:
    preset = get_preset(ns.preset)
    model_over, train_over = _overrides(ns, GPTConfig), _overrides(ns, TrainConfig)
    try:
        if resume_ckpt is None:
            return replace(preset.model, **model_over), replace(preset.train, **train_over)
        cfg = GPTConfig.from_dict(resume_ckpt["config"])
        for k, v in model_over.items():
            if getattr(cfg, k) != v:
                raise TrainError(f"--{k.replace('_', '-')} {v} differs from the checkpoint's {getattr(cfg, k)}; "
                                 "a resumed run keeps its model")
        return cfg, replace(TrainConfig(**resume_ckpt["train_config"]), **train_over)
    except (ValueError, TypeError, KeyError) as e:
        raise TrainError(str(e)) from None


def run(ns: argparse.Namespace) -> int:
    opts = RunOptions(**{f.name: getattr(ns, f.name) for f in fields(RunOptions)})
    if opts.log_interval < 1:
        raise TrainError(f"--log-interval must be >= 1, got {opts.log_interval}")
    if opts.sample_length < 1:
        raise TrainError(f"--sample-length must be >= 1, got {opts.sample_length}")
    resume_ckpt = None
    if opts.resume:
        last = Path(opts.out_dir) / LAST_NAME
        if not last.exists():
            raise TrainError(f"--resume: no checkpoint at {last}; start a run without --resume first")
        resume_ckpt = load_checkpoint(last)
        if "optimizer" not in resume_ckpt or "step" not in resume_ckpt:
            raise TrainError(f"--resume: {last} is a model-only checkpoint, not a resumable one")
    model_cfg, tc = _configs(ns, resume_ckpt)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate_train_config(tc, world)
    if resume_ckpt is not None and resume_ckpt.get("world_size", 1) != world:
        raise TrainError(f"--resume: the checkpoint was written by {resume_ckpt.get('world_size')} processes, "
                         f"this run has {world}")
    trainer = Trainer(opts, model_cfg, tc)
    trainer.setup(resume_ckpt)
    previous = signal.signal(signal.SIGINT, trainer._request_stop)  # from here on Ctrl-C stops at a step boundary
    try:
        if trainer.master:
            trainer.out.mkdir(parents=True, exist_ok=True)
            n = trainer.raw.num_params()
            print(f"model: {n / 1e6:.2f}M parameters ({model_cfg.num_layers} layers, d_model {model_cfg.d_model}, "
                  f"context {model_cfg.max_seq_length}) | impl {select_ops(opts.impl, trainer.device).name} | "
                  f"{trainer.device} {trainer.dtype} | {world} process(es)")
            print(f"tokens per optimizer step: {tc.batch_size} seqs x {model_cfg.max_seq_length} tokens x "
                  f"{tc.grad_accum} accumulation = {trainer.tokens_per_step:,} | {trainer.max_steps} steps "
                  f"| train split {len(trainer.splits.train):,} tokens"
                  + (f" | resuming at step {trainer.step}" if resume_ckpt is not None else ""))
        reason = trainer.train()
    finally:
        signal.signal(signal.SIGINT, previous)
    if reason == "interrupted":
        if trainer.master:
            print(f"interrupted at step {trainer.step}: saved {trainer.out / LAST_NAME}; continue with --resume",
                  file=sys.stderr)
        return 130
    result = trainer.finish()
    if trainer.master:
        print(f"test perplexity {result['final_perplexity']:.2f} | test accuracy {100 * result['test_accuracy']:.1f}% "
              f"| {result['tokens_per_sec']:,.0f} tokens/s | outputs in {trainer.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    from .data import DataError
    from .tokenizer import TokenizerNotFound

    try:
        return run(ns)
    except (TrainError, CheckpointError, DataError, TokenizerNotFound) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
