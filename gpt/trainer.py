"""The training loop (``Trainer``): schedule, logging, evaluation and early stopping, checkpoints,
Ctrl-C, DDP, and the final test pass, samples, history JSON and curves.

Its pieces live beside it: ``gpt.step`` (one optimizer step, one evaluation), ``gpt.state`` (what a
resumable checkpoint holds), ``gpt.graphstep`` (the step and the evaluation forward as CUDA
graphs), ``gpt.checkpoint.BackgroundWriter`` (checkpoints written while training goes on). The loop
never waits on the device between steps: loss, correct and counted targets accumulate in a device
tensor that is read (one sync) only every ``--log-interval`` steps, where NaN/inf is also caught.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import BackgroundWriter, atomic_write, load_checkpoint
from .config import GPTConfig, TrainConfig
from .data import DEFAULT_CACHE_DIR, TrainBatches
from .errors import UserError, one_line
from .graphstep import GraphedEval, GraphedTrainStep, GraphError, graph_refusal
from .hardware import default_dtype, environment, peak_flops
from .model import GPT2Model
from .ops import triton_covers
from .state import TrainState, data_identity, same_data
from .step import (TEST_PROTOCOL, StopTraining, build_optimizer, default_eval_batch, evaluate, evaluate_seed_protocol,
                   lr_at, merge_micro_batches, train_step)

SEED_PROMPTS = ("Once upon a time", "The little girl", "In a magical forest", "The brave knight")
BEST_NAME, LAST_NAME = "gpt2_best_model.pt", "last.pt"
HISTORY_NAME, CURVES_NAME = "training_history.json", "training_curves_with_accuracy.png"
RUN_FILES = (LAST_NAME, BEST_NAME, HISTORY_NAME, CURVES_NAME)  # what a run writes into --out-dir
ETA_AFTER_STEPS = 3  # the start-up ETA line is printed after this many steps of a session
CPU_HINT_AFTER_SECONDS = 3600  # a CPU run's ETA beyond this suggests --preset tiny (unless it is that)


class TrainError(UserError):
    """A user-facing problem (bad flag, missing checkpoint, diverged loss): one line, exit 1."""


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
    dtype: str | None = None  # None: hardware.default_dtype(device, impl)
    compile: bool = False
    # Capture the step in a CUDA graph after 3 eager ones, and the validation and test forwards
    # after one (gpt.graphstep); None: wherever it can be (CUDA, torchrun too, bf16 or fp32, no
    # --compile). The seed preset on an H200: 315,500 tokens/s graphed, 53,758 with eager steps
    # (impl torch; bench/results/2026-11-26-NVIDIA-H200-run3).
    cuda_graph: bool | None = None
    # A step's micro-batches run merged into forwards of up to this many tokens (gpt.step.
    # merge_micro_batches: the same sequences and loss, so the same step); 0 = one forward per
    # micro-batch. The seed preset's 8 x 4 x 256 become one forward of 32 x 256: on an H200 its
    # captured step ran at 315,500 tokens/s in 8 micro-batches against 930,383 as one batch of 32
    # (bench/results/2026-11-26-NVIDIA-H200-run3: train_graph.log, test_train_step_cuda_graph).
    forward_tokens: int = 16384
    seed: int = 1337
    log_interval: int = 10
    checkpoint_interval: int = 100  # steps between last.pt writes (also at every evaluation); 0 = evaluations only
    sample_length: int = 100
    progress: bool = True
    tensorboard: str | None = None  # TensorBoard log directory; None: no event files
    init_from: str | None = None  # a new run's starting weights (gpt.hf.load_pretrained's source); None: random


def run_files(out_dir: Path) -> list[Path]:
    """The outputs of a run present in ``out_dir`` (empty: the directory holds no run)."""
    return [out_dir / name for name in RUN_FILES if (out_dir / name).exists()]


def remove_run(out_dir: Path) -> None:
    """Delete a run's outputs from ``out_dir`` (and temp files of interrupted writes); nothing else."""
    for path in run_files(out_dir):
        path.unlink()
    for name in RUN_FILES:
        for tmp in out_dir.glob(f"{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def write_json(obj: dict, path: Path) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def init_distributed(backend: str) -> None:
    """``init_process_group`` from torchrun's environment, with a store namespace per restart attempt.

    After ``torchrun --max-restarts`` restarts the workers, the rendezvous store still holds the
    previous attempt's keys; without a fresh namespace gloo reads a dead peer's address from them
    and the restarted job fails (or hangs) in connecting.
    """
    store, rank, world = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"attempt_{attempt}", store), rank=rank, world_size=world)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _say(message: str) -> None:
    """Print one line to stderr from anywhere, a signal handler included (no buffered-writer re-entry)."""
    try:
        os.write(sys.stderr.fileno(), f"\n{message}\n".encode())
    except (AttributeError, OSError, ValueError):  # a replaced stderr without a file descriptor (tests)
        print(message, file=sys.stderr, flush=True)


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


class Trainer:
    """One training run: ``setup()``, ``train()`` (checkpoints on the way), then ``finish()`` (test, samples, outputs).

    Ctrl-C: the first one stops at the end of the current step and writes ``last.pt`` (said at once);
    a second one stops now: the step in progress is dropped and ``last.pt`` holds the state at the
    step boundary before it (weights, optimizer, data position and RNG, all of that boundary). The
    parts that move state forward (optimizer update, counters, logs, checkpoint writes) finish first;
    an evaluation in progress is dropped. Under DDP a second Ctrl-C exits without writing (the ranks
    may be inside different collectives); the last checkpoint written stays. SIGTERM (a scheduler's
    preemption, ``kill``, torchrun shutting its workers down) is handled as Ctrl-C is.

    Timing: ``train_seconds`` is the loop without evaluation passes (their checkpoint writes
    included); ``tokens_per_sec`` is the steady state, every step of this session but its first, and
    ``tokens_per_sec_with_startup`` counts every step and the set-up (data, model) before them.
    """

    def __init__(self, opts: RunOptions, model_cfg: GPTConfig, tc: TrainConfig, start_weights: dict | None = None):
        self.t_created = time.perf_counter()
        self.opts, self.model_cfg, self.tc = opts, model_cfg, tc
        self.start_weights = start_weights  # a new run's initial state dict (--init-from); None: random
        self.out = Path(opts.out_dir)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.master = self.rank == 0
        self.device = self._pick_device()
        self.dtype = opts.dtype or default_dtype(self.device, opts.impl)
        self.accum = tc.grad_accum // self.world  # micro-batches per rank per optimizer step
        self.tokens_per_step = tc.batch_size * tc.grad_accum * model_cfg.max_seq_length
        # Evaluation is forward-only: a step's sequences in one pass by default (the seed preset's 4-row
        # micro-batches would make a whole-split validation 8x as many host-bound launches on a GPU),
        # and on CUDA at least EVAL_FORWARD_TOKENS tokens.
        self.eval_batch = tc.eval_batch_size or default_eval_batch(tc.batch_size * self.accum,
                                                                   model_cfg.max_seq_length, self.device, tc.eval_tokens)
        refusal = graph_refusal(self.device, self.dtype, opts.compile)
        if opts.cuda_graph and refusal is not None:
            raise GraphError(refusal)
        self.cuda_graph = refusal is None if opts.cuda_graph is None else opts.cuda_graph  # None: where it can
        self.writer = BackgroundWriter()  # checkpoints are written while training goes on
        self._stop_requested = False  # first Ctrl-C: stop at the next step boundary
        self.stop_signal: int | None = None  # the signal that asked first (SIGINT or SIGTERM): the exit code
        self._stop_now = False  # second Ctrl-C: stop as soon as no state is half-updated
        self._interruptible = False  # a KeyboardInterrupt now loses nothing the boundary snapshot lacks
        self._stop_agreed = False  # acted on: every rank sees the same value (agreed at log steps under DDP)
        self.tb = None  # TensorBoard SummaryWriter (rank 0, --tensorboard)

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
                if self.local_rank >= torch.cuda.device_count():
                    raise TrainError(f"torchrun started more processes on this machine than it has GPUs "
                                     f"({torch.cuda.device_count()}): use --nproc_per_node "
                                     f"{torch.cuda.device_count()}, or --device cpu")
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
                import kernels
            except (ImportError, AttributeError) as e:
                raise TrainError(f"--impl triton: the Triton kernels are unavailable ({e})") from None
            if not triton_covers(cfg, self.device):
                raise TrainError(f"--impl triton: the kernels need a head dim in {kernels.attention.SUPPORTED_HEAD_DIMS} "
                                 f"and, for attention dropout, a Hopper GPU or newer (this model: head dim "
                                 f"{cfg.head_dim}, attn dropout {cfg.attn_dropout}); use --impl torch or auto")
        summary_writer = tensorboard_writer_class() if opts.tensorboard and self.master else None
        self.tokenizer = get_tokenizer(opts.tokenizer)
        if opts.tokenizer is None and self.tokenizer.source.startswith("dir:"):  # found via $GPT2_TOKENIZER_DIR:
            self.opts = opts = replace(opts, tokenizer=str(Path(self.tokenizer.source[4:]).resolve()))  # recorded
        if self.tokenizer.vocab_size > cfg.vocab_size:
            raise TrainError(f"tokenizer has {self.tokenizer.vocab_size} tokens but --vocab-size is {cfg.vocab_size}")
        if self.world > 1:
            init_distributed("nccl" if self.device.type == "cuda" else "gloo")
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
        data = data_identity(self.splits.meta)
        if resume_ckpt is not None and not same_data(resume_ckpt.get("data", data), data):
            raise TrainError(f"the data ({data['source']}) differs from the data of the run in {self.out} "
                             f"({resume_ckpt['data']['source']}): tokens, tokenizer or files changed")
        self.max_steps = tc.max_steps or max(1, math.ceil(tc.epochs * len(self.splits.train) / self.tokens_per_step))

        torch.manual_seed(opts.seed)  # same initial weights on every rank
        if resume_ckpt is None and self.start_weights is None:
            self.raw = GPT2Model(cfg, impl=opts.impl).to(self.device)
        else:  # every weight comes from --init-from's source or, below, the restored checkpoint: none
            # drawn (the gpt2 preset's 124M parameters: 0.02 s against 2.0 s on this project's CPU)
            self.raw = GPT2Model.uninitialized(cfg, impl=opts.impl, device=self.device)
            if resume_ckpt is None:
                self.raw.load_state_dict(self.start_weights)
        self.optimizer = build_optimizer(self.raw, tc, self.device)
        # The optimizer update must never be torn by a second Ctrl-C: from here the step is committed.
        self.optimizer.register_step_pre_hook(self._enter_update)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == "fp16")  # a no-op unless fp16
        self.batches = TrainBatches(self.splits.train, tc.batch_size, ctx, seed=opts.seed,
                                    rank=self.rank, world_size=self.world)
        torch.manual_seed(opts.seed + self.rank)  # dropout streams differ per rank
        self.state = TrainState(self.raw, self.optimizer, self.scaler, self.batches, tc, opts, self.device, data)
        if resume_ckpt is not None:
            try:
                self.state.restore(resume_ckpt, self.rank)
            except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as e:
                raise TrainError(f"{self.out / LAST_NAME} cannot be resumed from: {one_line(e)}") from None
        self.fwd = torch.compile(self.raw) if opts.compile else self.raw  # evaluation calls this
        self.model = self.fwd  # training calls this: DDP-wrapped under torchrun when stepping eagerly
        if self.world > 1 and not self.cuda_graph:
            self.model = DistributedDataParallel(self.fwd, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        elif self.world > 1:  # the graphed step all-reduces itself; from rank 0's weights, as DDP starts
            for tensor in self.raw.state_dict().values():
                dist.broadcast(tensor, 0)
        # After the restore: a captured step must see the optimizer state it will keep using.
        self.graphed = GraphedTrainStep(self.model, self.optimizer, device=self.device, dtype=self.dtype,
                                        grad_clip=tc.grad_clip, process_group=dist.group.WORLD if self.world > 1 else None
                                        ) if self.cuda_graph else None
        self.graphed_eval = GraphedEval(self.raw, device=self.device, dtype=self.dtype,
                                        batch_size=self.eval_batch) if self.cuda_graph else None
        if summary_writer is not None:
            self.tb = summary_writer(opts.tensorboard)
        self.setup_seconds = time.perf_counter() - self.t_created

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
            self.writer.save(ck, self.out / LAST_NAME)

    def _boundary(self) -> tuple:
        """What the compute of the next step consumes: the data position and the dropout RNG streams."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return self.batches.drawn, torch.get_rng_state(), cuda

    def _back_to(self, boundary: tuple) -> None:
        """Undo a step's compute (a second Ctrl-C): data position and RNG as at ``boundary``, no gradients."""
        self.batches.drawn, cpu, cuda = boundary
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)
        self.optimizer.zero_grad(set_to_none=True)

    # -- Ctrl-C --------------------------------------------------------------------------------

    def on_stop_signal(self, signum, frame) -> None:
        """The SIGINT and SIGTERM handler while training (installed by the command line)."""
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        again = "press Ctrl-C again" if signum == signal.SIGINT else f"send {what} again"
        if not self._stop_requested:
            self._stop_requested, self.stop_signal = True, signum
            if self.master:
                _say(f"{what}: stopping after the current step (step {self.state.step + 1}) and saving "
                     f"{self.out / LAST_NAME}; {again} to stop now")
            return
        if not self._stop_now and self.master:
            _say(f"{what} again: stopping now" + (", saving the last step boundary" if self.world == 1 else ""))
        self._stop_now = True
        if self._interruptible:
            raise KeyboardInterrupt

    def _enter_update(self, optimizer, args, kwargs) -> None:
        self._interruptible = False

    def _should_stop(self) -> bool:
        return self._stop_requested

    # -- logging -------------------------------------------------------------------------------

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
        for key, value in (("steps", st.step), ("tokens", st.tokens_seen), ("losses", loss),
                           ("accuracies", correct / count)):
            log[key].append(value)
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, st.step)
            self.tb.add_scalar("train/accuracy_pct", 100 * correct / count, st.step)
            self.tb.add_scalar("train/lr", self.lr, st.step)
        if pbar is not None:
            tps = self.steady_tokens_per_sec()
            pbar.set_postfix(loss=f"{loss:.3f}", acc=f"{100 * correct / count:.1f}%",
                             **({"tok_s": f"{tps:,.0f}"} if tps else {}), refresh=False)

    def _print(self, pbar, message: str) -> None:
        (pbar.write if pbar is not None else print)(message)

    def _evaluate_and_checkpoint(self, pbar) -> bool:
        """Validation pass, best/last checkpoints, early-stopping bookkeeping. True = stop early."""
        tc, st = self.tc, self.state
        self._interruptible = True  # a second Ctrl-C drops this evaluation; the state is at a boundary
        t0 = time.perf_counter()
        m = evaluate(self.fwd, self.splits.val, self.model_cfg.max_seq_length, self.eval_batch, self.device,
                     self.dtype, tc.eval_tokens, self.rank, self.world,
                     self._should_stop if self.world == 1 else None,
                     desc="validation" if self.master and self.opts.progress else None, forward=self.graphed_eval)
        self.validation_time += time.perf_counter() - t0  # (evaluate's result is read on the host: synced)
        self._interruptible = False
        if not math.isfinite(m["loss"]):
            raise TrainError(f"validation loss became {m['loss']} at step {st.step}; "
                             f"stopped, the last good checkpoint is kept in {self.out / LAST_NAME}")
        h = st.history
        log = h["train_log"]
        h["train_losses"].append(log["losses"][-1] if log["losses"] else math.nan)
        h["train_accuracies"].append(log["accuracies"][-1] if log["accuracies"] else math.nan)
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
        if self.tb is not None:
            self.tb.add_scalar("val/loss", m["loss"], st.step)
            self.tb.add_scalar("val/perplexity", m["perplexity"], st.step)
            self.tb.add_scalar("val/accuracy_pct", 100 * m["accuracy"], st.step)
        ck = st.checkpoint(self._gather)
        if self.master:
            self.writer.save(ck, *([self.out / BEST_NAME] if improved else []), self.out / LAST_NAME)
            self._print(pbar, f"step {st.step}/{self.max_steps} | val loss {m['loss']:.4f} ppl {m['perplexity']:.2f} "
                              f"acc {100 * m['accuracy']:.1f}% | train loss {h['train_losses'][-1]:.4f} "
                              f"acc {100 * h['train_accuracies'][-1]:.1f}%"
                              + (" | best" if improved else f" | no improvement ({st.bad_evals}/{tc.patience})"))
        return tc.patience > 0 and st.bad_evals >= tc.patience

    # -- timing --------------------------------------------------------------------------------

    def steady_tokens_per_sec(self) -> float | None:
        """Tokens/s of this session's steps after its first (evaluations excluded); None before step 2."""
        steps = self.session_steps - 1
        seconds = self.train_time + (time.perf_counter() - self.t_mark if self._timing else 0.0) - self.first_step_seconds
        if steps < 1 or seconds <= 0:
            return None
        return steps * self.tokens_per_step / seconds

    def _eta_line(self) -> str:
        tps = self.steady_tokens_per_sec()
        steps_left = self.max_steps - self.state.step
        seconds = steps_left * self.tokens_per_step / tps
        # A GPU recipe started on a CPU (``python train.py`` without a GPU): say what fits a CPU.
        hint = ("; on a CPU, `--preset tiny` trains a smaller model in minutes" if self.device.type == "cpu"
                and self.opts.preset != "tiny" and seconds > CPU_HINT_AFTER_SECONDS else "")
        return (f"speed after {self.session_steps} steps: {tps:,.0f} tokens/s (first step {self.first_step_seconds:.1f} s); "
                f"ETA {format_seconds(seconds)} for the {steps_left:,} steps left "
                f"(training only: validation passes and the final test come on top){hint}")

    # -- the loop ------------------------------------------------------------------------------

    def train(self) -> str:
        """Run the optimizer steps. Returns why it ended: 'done', 'early_stop', 'interrupted' (first
        Ctrl-C: at a step boundary) or 'stopped_now' (second Ctrl-C: the step in progress dropped).
        Every checkpoint is on disk when it returns or raises (a failing run's last write too)."""
        try:
            reason = self._steps()
        except BaseException:
            self.writer.wait(raise_error=False)  # the run fails for its own reason; its last write lands
            raise
        self.writer.wait()
        return reason

    def _steps(self) -> str:
        from tqdm import tqdm

        tc, opts, st = self.tc, self.opts, self.state
        acc = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss * count, correct, count
        pbar = tqdm(total=self.max_steps, initial=st.step, unit="step", dynamic_ncols=True, file=sys.stderr,
                    disable=not (self.master and opts.progress)) if self.master else None
        self.session_steps, self.train_time, self.eval_time, self.first_step_seconds = 0, 0.0, 0.0, 0.0
        self.validation_time = 0.0  # the validation passes alone (eval_time adds their checkpoints)
        reason = "done"
        self.lr = lr_at(st.step, tc, self.max_steps)
        boundary = self._boundary()
        self.t_mark, self._timing = time.perf_counter(), True
        try:
            while st.step < self.max_steps:
                self._interruptible = True  # until the optimizer's pre-hook: compute only, undone by _back_to
                if self._stop_now:  # a second Ctrl-C came while the state was moving forward
                    raise KeyboardInterrupt
                self.lr = lr_at(st.step, tc, self.max_steps)
                micro = merge_micro_batches([self.batches.next() for _ in range(self.accum)], opts.forward_tokens)
                if self.graphed is None:
                    acc += train_step(self.model, self.optimizer, micro, device=self.device, dtype=self.dtype,
                                      grad_clip=tc.grad_clip, scaler=self.scaler, lr=self.lr)
                else:
                    if self.graphed.captured:  # a replay is compute and update at once: committed
                        self._interruptible = False
                    acc += self.graphed(micro, self.lr)
                self._interruptible = False  # (the pre-hook did too; a scaler-skipped update has no hook)
                st.step += 1
                st.tokens_seen += self.tokens_per_step
                self.session_steps += 1
                boundary = self._boundary()
                if self.session_steps == 1:
                    _sync(self.device)  # one-off: the first step's time (start-up) is reported apart
                    self.first_step_seconds = self.train_time + time.perf_counter() - self.t_mark
                if self.session_steps == ETA_AFTER_STEPS and self.master and st.step < self.max_steps:
                    _sync(self.device)
                    self._print(pbar, self._eta_line())
                if pbar is not None:
                    pbar.update(1)
                eval_now = st.step == self.max_steps or (tc.eval_interval and st.step % tc.eval_interval == 0)
                save_now = not eval_now and opts.checkpoint_interval and st.step % opts.checkpoint_interval == 0
                stop_here = self.world == 1 and self._stop_requested  # (DDP agrees on it at log steps)
                if eval_now or save_now or stop_here or st.step % opts.log_interval == 0:
                    self._log(acc, pbar)
                    acc.zero_()
                if self._stop_agreed or stop_here:
                    raise StopTraining
                if save_now:
                    self.save_last()
                if eval_now:
                    now = time.perf_counter()
                    self.train_time += now - self.t_mark
                    stop = self._evaluate_and_checkpoint(pbar)
                    self.t_mark = time.perf_counter()
                    self.eval_time += self.t_mark - now
                    if stop:
                        reason = "early_stop"
                        if self.master:
                            self._print(pbar, f"early stop: no validation improvement in {tc.patience} evaluations")
                        break
            if self._stop_now:  # Ctrl-C twice during the last step's bookkeeping: still a stop
                raise KeyboardInterrupt
        except StopTraining:
            reason = "interrupted"
        except KeyboardInterrupt:
            reason = "stopped_now"
        finally:
            self._interruptible = False
            _sync(self.device)
            self.train_time += time.perf_counter() - self.t_mark
            self._timing = False
            if pbar is not None:
                pbar.close()
        if reason == "stopped_now":
            self._back_to(boundary)
        if reason == "interrupted" or (reason == "stopped_now" and self.world == 1):
            self.save_last()
        return reason

    def finish(self) -> dict:
        """Best model -> test metrics (ours and the seed's protocol) and samples; write the history
        JSON and the curves; print the results."""
        from .curves import plot_curves
        from .generate import Decoder, generate_text

        st, cfg = self.state, self.model_cfg
        best = self.out / BEST_NAME
        if self.world > 1:
            dist.barrier()  # rank 0 has finished writing the best checkpoint
        if best.exists():
            self.raw.load_state_dict(load_checkpoint(best, map_location=self.device)["model_state_dict"])
        show = self.master and self.opts.progress
        if self.master:
            print(f"final test pass with the best checkpoint ({len(self.splits.test) - 1:,} test tokens)", flush=True)
        test = evaluate(self.raw, self.splits.test, cfg.max_seq_length, self.eval_batch, self.device, self.dtype,
                        0, self.rank, self.world, desc="test" if show else None, forward=self.graphed_eval)
        seed_test = evaluate_seed_protocol(self.raw, self.splits.test, self.eval_batch, self.device, self.dtype,
                                           self.rank, self.world, desc="test, the seed's protocol" if show else None,
                                           forward=self.graphed_eval)
        if not self.master:
            # Wait for rank 0's samples and files, so that every rank tears its process group down
            # together: a gloo rank that destroys its group while a peer's is live can abort at exit
            # ("terminate called without an active exception", seen here in 1 restarted run of 4).
            dist.barrier()
            return {}
        samples = {}
        # One for the four (on CUDA one graph, captured once), in the run's dtype: a cast copy, not
        # an autocast that would cast every weight again each token.
        decoder = Decoder(self.raw, device=self.device, dtype=self.dtype)
        for prompt in SEED_PROMPTS:
            samples[prompt] = generate_text(decoder, self.tokenizer, prompt=prompt,
                                            max_length=self.opts.sample_length, device=self.device)
        session_tokens = self.session_steps * self.tokens_per_step
        tps = self.steady_tokens_per_sec() or (session_tokens / self.train_time if self.train_time > 0 else 0.0)
        peak = peak_flops(self.device)
        flops = cfg.flops_per_token()
        result = {
            **st.history,
            "final_perplexity": test["perplexity"], "test_loss": test["loss"], "test_accuracy": test["accuracy"],
            "test_tokens": test["tokens"], "test_protocol": TEST_PROTOCOL, "seed_protocol_test": seed_test,
            "generated_texts": samples,
            "steps": st.step, "max_steps": self.max_steps, "tokens_seen": st.tokens_seen,
            "tokens_per_step": self.tokens_per_step,
            "tokens_per_sec": tps,
            "tokens_per_sec_measured_over": (f"steps {st.step - self.session_steps + 2}-{st.step} of this session: "
                                             "its first step and every evaluation excluded"
                                             if self.session_steps > 1 else "the session's only step"),
            "tokens_per_sec_with_startup": session_tokens / (self.setup_seconds + self.train_time),
            "setup_seconds": self.setup_seconds, "first_step_seconds": self.first_step_seconds,
            "train_seconds": self.train_time, "eval_seconds": self.eval_time,
            "validation_seconds": self.validation_time,
            "flops_per_token": flops, "mfu": flops * tps / peak if peak else None,
            "best_val_loss": st.best_val, "num_params": self.raw.num_params(),
            "config": cfg.to_dict(), "train_config": asdict(self.tc),
            "run_options": {**asdict(self.opts), "dtype": self.dtype, "world_size": self.world},
            "data": self.splits.meta, "environment": environment(self.device),
        }
        write_json(result, self.out / HISTORY_NAME)
        title = (f"{self.opts.preset} preset, {self.raw.num_params() / 1e6:.2f}M parameters, {st.step:,} steps: "
                 f"test perplexity {test['perplexity']:.2f}"
                 + (f" ({seed_test['perplexity']:.2f} by the seed's protocol)" if seed_test["perplexity"] is not None else ""))
        plot_curves(st.history, self.out / CURVES_NAME, title, self.tokens_per_step)
        if self.tb is not None:
            self.tb.add_scalar("test/perplexity", test["perplexity"], st.step)
            self.tb.add_scalar("test/accuracy_pct", 100 * test["accuracy"], st.step)
            self.tb.close()
        if self.world > 1:
            dist.barrier()  # the other ranks wait here (above) until this rank's output is written
        return result


def tensorboard_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or a TrainError naming the missing optional package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainError("--tensorboard needs the optional tensorboard package: pip install tensorboard "
                         "(or pip install -e \".[tensorboard]\")") from None
    return SummaryWriter
