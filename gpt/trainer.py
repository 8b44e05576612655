"""Training: one optimizer step, one evaluation, the state a checkpoint holds, and the loop around them.

* ``train_step`` and ``evaluate`` are the building blocks; the loop, the benchmarks and
  ``bench/time_budget.py`` all call them.
* ``TrainState`` is everything a resumable checkpoint holds (weights, optimizer, scaler, data
  position, RNG streams, counters, history) and how it is written and restored.
* ``Trainer`` is the loop: schedule, logging, evaluation and early stopping, checkpoints, Ctrl-C,
  DDP, and the final test pass, samples, history JSON and curves.

The step never waits on the device: loss, correct and counted targets accumulate in a device tensor
that is read (one sync) only every ``--log-interval`` steps, where NaN/inf is also caught.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import atomic_write, load_checkpoint, save_checkpoint
from .config import GPTConfig, TrainConfig
from .data import DEFAULT_CACHE_DIR, TrainBatches, eval_batches
from .errors import UserError, one_line
from .hardware import autocast, default_dtype, environment, peak_flops
from .model import GPT2Model

SEED_PROMPTS = ("Once upon a time", "The little girl", "In a magical forest", "The brave knight")
BEST_NAME, LAST_NAME = "gpt2_best_model.pt", "last.pt"
HISTORY_NAME, CURVES_NAME = "training_history.json", "training_curves_with_accuracy.png"


class TrainError(UserError):
    """A user-facing problem (bad flag, missing checkpoint, diverged loss): one line, exit 1."""


class StopTraining(Exception):
    """Ctrl-C arrived: the loop stops at the next step boundary and writes a resumable checkpoint."""


@dataclass(frozen=True)
class RunOptions:
    """Settings of one run that are not part of the model or the optimisation recipe."""

    preset: str = "seed"
    data: str | None = None  # None: the Hugging Face hub's roneneldan/TinyStories
    tokenizer: str | None = None  # directory with vocab.json + merges.txt; None: the default lookup
    out_dir: str = "out"
    cache_dir: str = DEFAULT_CACHE_DIR
    device: str | None = None  # None: cuda if available, else cpu
    impl: str = "auto"
    dtype: str | None = None  # None: hardware.default_dtype(device)
    compile: bool = False
    resume: bool = False
    seed: int = 1337
    log_interval: int = 10
    sample_length: int = 100
    progress: bool = True


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2, embeddings included) only; fused (one pass over
    each parameter) on CUDA and CPU: 57 vs 250 ms for the seed model on one CPU thread."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=device.type in ("cuda", "cpu"))


def lr_at(step: int, tc: TrainConfig, max_steps: int) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` down to ``lr * min_lr_ratio``."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    span = max(1, max_steps - tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / span)
    min_lr = tc.lr * tc.min_lr_ratio
    return min_lr + 0.5 * (tc.lr - min_lr) * (1 + math.cos(math.pi * progress))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Iterable, *,
               device: torch.device, dtype: str, grad_clip: float = 0.0,
               scaler: Optional[torch.amp.GradScaler] = None, lr: Optional[float] = None) -> torch.Tensor:
    """One optimizer step over ``micro_batches`` [(x, y), ...] (gradient accumulation, the loss averaged
    over them): forward under autocast, backward, then clip the global gradient norm, step, clear.

    ``model(x, y)`` returns an ``LMLoss``; a DDP model all-reduces on the last micro-batch only.
    ``scaler`` is fp16's loss scaler (None or disabled: no scaling). Returns the step's
    ``[sum of loss * count, correct, count]`` as a float64 tensor on the device: no host sync
    (but fp16's), so the caller reads metrics when it chooses.
    """
    micro = list(micro_batches)
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    metrics = torch.zeros(3, dtype=torch.float64, device=device)
    for i, (x, y) in enumerate(micro):
        if device.type == "cuda":
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        last = i == len(micro) - 1
        sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else contextlib.nullcontext()
        with sync:
            with autocast(device, dtype):
                out = model(x, y)
            loss = out.loss / len(micro)
            (loss if scaler is None else scaler.scale(loss)).backward()
        metrics += torch.stack([out.loss.detach().double() * out.count, out.correct.double(), out.count.double()])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if grad_clip > 0:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return metrics


@torch.no_grad()
def evaluate(model, tokens, context: int, batch_size: int, device: torch.device, dtype: str,
             max_tokens: int = 0, rank: int = 0, world_size: int = 1, should_stop=None) -> dict:
    """Loss, perplexity and next-token accuracy over the real tokens of ``tokens`` (each once).

    ``model(x, y)`` must return an ``LMLoss``. Under DDP each rank takes every world_size-th batch
    and the sums are all-reduced, so every rank gets the same numbers.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * count, correct, count
    for i, (x, y) in enumerate(eval_batches(tokens, context, batch_size, max_tokens)):
        if should_stop is not None and should_stop():
            raise StopTraining
        if i % world_size != rank:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, dtype):
            out = model(x, y)
        sums += torch.stack([out.loss.double() * out.count, out.correct.double(), out.count.double()])
    if world_size > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    loss_sum, correct, count = sums.tolist()
    loss = loss_sum / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": correct / max(count, 1.0),
            "tokens": int(count)}


# ----------------------------------------------------------------------------------------------
# What a checkpoint holds
# ----------------------------------------------------------------------------------------------


def rng_states(device: torch.device) -> dict:
    """Torch (CPU and CUDA), NumPy and Python RNG states as tensors and plain values (weights_only-safe)."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device).cpu() if device.type == "cuda" else None,
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


def new_history() -> dict:
    """The seed's per-evaluation keys, plus when each evaluation happened and every logged train step."""
    return {
        "train_losses": [], "train_accuracies": [], "val_losses": [], "val_accuracies": [],
        "val_perplexities": [], "val_steps": [], "val_tokens": [],
        "train_log": {"steps": [], "tokens": [], "losses": [], "accuracies": []},
    }


class TrainState:
    """Everything a resumable checkpoint holds: the weights, optimizer and scaler, this rank's data
    position and RNG streams, the step and token counters, early-stopping bookkeeping and the history.

    ``checkpoint(gather)`` builds the checkpoint dict (a collective under DDP: ``gather`` collects one
    object from every rank); ``restore(ckpt)`` puts a checkpoint back. Both the best-model and the
    last checkpoint have this form; ``model_state_dict`` + ``config`` is the seed's part.
    """

    def __init__(self, model: GPT2Model, optimizer, scaler, batches: TrainBatches, tc: TrainConfig,
                 opts: RunOptions, device: torch.device):
        self.model, self.optimizer, self.scaler, self.batches = model, optimizer, scaler, batches
        self.tc, self.opts, self.device = tc, opts, device
        self.step = 0  # optimizer steps taken
        self.tokens_seen = 0  # training tokens over all ranks
        self.best_val = math.inf  # best validation loss so far
        self.bad_evals = 0  # evaluations since the best one (early stopping)
        self.history = new_history()

    def checkpoint(self, gather: Callable[[object], list]) -> dict:
        batches = gather(self.batches.state_dict())
        rng = gather(rng_states(self.device))
        return {
            "model_state_dict": self.model.state_dict(), "config": self.model.config.to_dict(),
            "train_config": asdict(self.tc), "run_options": asdict(self.opts),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "step": self.step, "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val, "bad_evals": self.bad_evals, "history": self.history,
            "batches": batches, "rng": rng, "world_size": len(batches),
        }

    def restore(self, ck: dict, rank: int) -> None:
        """Load a checkpoint written by ``checkpoint``; raises KeyError/ValueError/... if it does not fit."""
        self.model.load_state_dict(ck["model_state_dict"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        self.batches.load_state_dict(ck["batches"][rank])
        set_rng_states(ck["rng"][rank], self.device)
        self.step, self.tokens_seen = ck["step"], ck["tokens_seen"]
        self.best_val, self.bad_evals, self.history = ck["best_val_loss"], ck["bad_evals"], ck["history"]


def write_json(obj: dict, path: Path) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


# ----------------------------------------------------------------------------------------------
# The loop
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
        self.dtype = opts.dtype or default_dtype(self.device)
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
                import kernels  # noqa: F401
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
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == "fp16")  # a no-op unless fp16
        self.batches = TrainBatches(self.splits.train, tc.batch_size, ctx, seed=opts.seed,
                                    rank=self.rank, world_size=self.world)
        torch.manual_seed(opts.seed + self.rank)  # dropout streams differ per rank
        self.state = TrainState(self.raw, self.optimizer, self.scaler, self.batches, tc, opts, self.device)
        if resume_ckpt is not None:
            try:
                self.state.restore(resume_ckpt, self.rank)
            except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as e:
                raise TrainError(f"{self.out / LAST_NAME} cannot be resumed from: {one_line(e)}") from None
        self.fwd = torch.compile(self.raw) if opts.compile else self.raw  # evaluation calls this
        self.model = self.fwd  # training calls this: DDP-wrapped under torchrun
        if self.world > 1:
            self.model = DistributedDataParallel(self.fwd, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # -- checkpoints ---------------------------------------------------------------------------

    def _gather(self, obj) -> list:
        """Every rank's ``obj`` as a list (rank order) on every rank; [obj] when not distributed."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def save_last(self) -> None:
        ck = self.state.checkpoint(self._gather)  # collective: every rank calls it
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
        st = self.state
        loss = loss_sum / count
        if not math.isfinite(loss):
            raise TrainError(f"training loss became {loss} by step {st.step} (lr {self.lr:.3g}); "
                             f"stopped, the last good checkpoint is kept in {self.out / LAST_NAME}")
        log = st.history["train_log"]
        log["steps"].append(st.step)
        log["tokens"].append(st.tokens_seen)
        log["losses"].append(loss)
        log["accuracies"].append(correct / count)
        if pbar is not None:
            tps = self.session_tokens / max(self.train_time + time.perf_counter() - self.t_mark, 1e-9)
            pbar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)

    def _evaluate_and_checkpoint(self, pbar, since_eval: dict) -> bool:
        """Validation pass, best/last checkpoints, early-stopping bookkeeping. True = stop early."""
        tc, st = self.tc, self.state
        m = evaluate(self.fwd, self.splits.val, self.model_cfg.max_seq_length, tc.batch_size, self.device,
                     self.dtype, tc.eval_tokens, self.rank, self.world,
                     self._should_stop if self.world == 1 else None)
        if not math.isfinite(m["loss"]):
            raise TrainError(f"validation loss became {m['loss']} at step {st.step}; "
                             f"stopped, the last good checkpoint is kept in {self.out / LAST_NAME}")
        h = st.history
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
        since_eval.update(n=len(log["losses"]), tokens=st.tokens_seen)
        h["val_losses"].append(m["loss"])
        h["val_accuracies"].append(m["accuracy"])
        h["val_perplexities"].append(m["perplexity"])
        h["val_steps"].append(st.step)
        h["val_tokens"].append(st.tokens_seen)
        improved = m["loss"] < st.best_val
        if improved:
            st.best_val, st.bad_evals = m["loss"], 0
        else:
            st.bad_evals += 1
        ck = st.checkpoint(self._gather)
        if self.master:
            if improved:
                save_checkpoint(ck, self.out / BEST_NAME)
            save_checkpoint(ck, self.out / LAST_NAME)
            msg = (f"step {st.step}/{self.max_steps} | val loss {m['loss']:.4f} ppl {m['perplexity']:.2f} "
                   f"acc {100 * m['accuracy']:.1f}% | train loss {h['train_losses'][-1]:.4f}"
                   + (" | best" if improved else f" | no improvement ({st.bad_evals}/{tc.patience})"))
            (pbar.write if pbar is not None else print)(msg)
        return tc.patience > 0 and st.bad_evals >= tc.patience

    def train(self) -> str:
        """Run the optimizer steps. Returns why it ended: 'done', 'early_stop' or 'interrupted'."""
        from tqdm import tqdm

        tc, opts, st = self.tc, self.opts, self.state
        acc = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss * count, correct, count
        pbar = tqdm(total=self.max_steps, initial=st.step, unit="step", dynamic_ncols=True,
                    disable=not (self.master and opts.progress)) if self.master else None
        self.session_tokens, self.train_time, self.eval_time = 0, 0.0, 0.0
        since_eval = {"n": len(st.history["train_log"]["losses"]), "tokens": st.tokens_seen}
        reason = "done"
        self.lr = lr_at(st.step, tc, self.max_steps)
        self.t_mark = time.perf_counter()
        try:
            while st.step < self.max_steps:
                self.lr = lr_at(st.step, tc, self.max_steps)
                micro = [self.batches.next() for _ in range(self.accum)]
                acc += train_step(self.model, self.optimizer, micro, device=self.device, dtype=self.dtype,
                                  grad_clip=tc.grad_clip, scaler=self.scaler, lr=self.lr)
                st.step += 1
                st.tokens_seen += self.tokens_per_step
                self.session_tokens += self.tokens_per_step
                if pbar is not None:
                    pbar.update(1)
                eval_now = st.step == self.max_steps or (tc.eval_interval and st.step % tc.eval_interval == 0)
                if eval_now or st.step % opts.log_interval == 0:
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
        from .curves import plot_curves
        from .generate import generate_text

        st = self.state
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
            with autocast(self.device, self.dtype):
                samples[prompt] = generate_text(self.raw, self.tokenizer, prompt=prompt,
                                                max_length=self.opts.sample_length, device=self.device)
        tps = self.session_tokens / self.train_time if self.train_time > 0 else 0.0
        peak = peak_flops(self.device)
        flops = self.model_cfg.flops_per_token()
        result = {
            **st.history,
            "final_perplexity": test["perplexity"], "test_loss": test["loss"], "test_accuracy": test["accuracy"],
            "test_tokens": test["tokens"], "generated_texts": samples,
            "steps": st.step, "max_steps": self.max_steps, "tokens_seen": st.tokens_seen,
            "tokens_per_step": self.tokens_per_step, "tokens_per_sec": tps,
            "train_seconds": self.train_time, "eval_seconds": self.eval_time,
            "flops_per_token": flops, "mfu": flops * tps / peak if peak else None,
            "best_val_loss": st.best_val, "num_params": self.raw.num_params(),
            "config": self.model_cfg.to_dict(), "train_config": asdict(self.tc),
            "run_options": {**asdict(self.opts), "dtype": self.dtype, "world_size": self.world},
            "data": self.splits.meta, "environment": environment(self.device),
        }
        write_json(result, self.out / HISTORY_NAME)
        plot_curves(st.history, self.out / CURVES_NAME)
        return result
