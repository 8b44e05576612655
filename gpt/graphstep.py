"""The training step captured in a CUDA graph and replayed: one launch a step instead of hundreds;
the evaluation forward likewise (``GraphedEval``, at the end). (``run_on`` and ``Captured`` serve
the decode step's graph too: ``gpt.generate.Decoder(cuda_graph=True)``.)

An eager step of the seed model launches a few hundred kernels (ours, cuBLAS's, autograd's, the
optimizer's), each costing 10-100 us of Python, autograd and driver work on the host. At batch
32 x 256 the GPU's share of a step is a few milliseconds, so the host sets the pace: on an H200 the
step reached 11.5% MFU at batch 32 and 17.1% at batch 512 with the same kernels
(bench/results/2026-11-26-NVIDIA-H200/). ``GraphedTrainStep`` is ``train_step`` without that cost:

1. the first ``warmup`` steps run eagerly (``train_step`` as is), on the side stream the capture
   will use: Triton compiles and autotunes, cuBLAS makes its workspaces, the optimizer its state;
2. the next step is captured in a CUDA graph (``torch.cuda.graph``) over static device buffers --
   the micro-batches, the learning rate (a device tensor the fused AdamW reads: ``capturable``), the
   step's metrics -- and replayed to run it;
3. every later step copies its batch into the buffers (pinned, asynchronous), writes the lr and
   replays: no host sync, and the metrics tensor is read in stream order before the next replay
   overwrites it.

A replay computes what an eager step computes, the same kernels on the same values, so results
agree with eager steps to rounding (tests/test_graphstep.py). Dropout draws fresh numbers on every
replay (the CUDA generator moves its Philox offset per replay), not eager's exact stream.

Under torchrun the step is two graphs, its forward and backward, then its update, with the
gradients' all-reduce between them (``process_group``: DDP's averaging, on one flat buffer).

Needs (``graph_refusal`` says what is missing; train.py captures by default where nothing is, and
refuses ``--cuda-graph`` in one line where something is): CUDA, no fp16 loss scaler (its skipped
steps are host decisions), no ``--compile`` (``torch.compile(mode="reduce-overhead")`` graphs a
compiled model itself). A step whose micro-batches differ in shape from the captured ones runs
eagerly. The optimizer's state must not be replaced after the capture (``load_state_dict`` makes new
tensors): a run resumes before it.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

from .errors import UserError
from .step import accumulate_gradients, apply_gradients, forward_sums, train_step

WARMUP_STEPS = 3  # eager steps before the capture: compilation, autotuning, lazy initialisation


def run_on(stream: Optional[torch.cuda.Stream], fn):
    """fn() on ``stream`` (None: the current stream), after the current stream's queued work and
    before what is queued on it next."""
    if stream is None:
        return fn()
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        out = fn()
    current.wait_stream(stream)
    return out


class Captured:
    """``fn`` recorded in a CUDA graph on ``stream``: ``replay()`` runs it again and returns its
    output, a static tensor every replay overwrites. Recording runs nothing. With ``stream`` None
    (no CUDA: tests) ``replay()`` calls ``fn`` itself and copies the result into one output tensor,
    as a replay overwrites the graph's: that checks everything around the graph, a caller keeping
    an earlier replay's output included."""

    def __init__(self, fn, stream: Optional[torch.cuda.Stream]):
        self.fn, self.graph, self.output = fn, None, None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(stream.device))
            self.graph = torch.cuda.CUDAGraph()  # holds the graph's memory pool while it lives
            # thread_local: an unsafe CUDA call of this thread fails the capture; another thread's
            # work (the checkpoint writer's, gpt.checkpoint.BackgroundWriter: CPU tensors only, but
            # its garbage collections may free device memory) goes on outside the graph.
            with torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"):
                self.output = fn()

    def replay(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
        elif self.output is None:
            self.output = self.fn()
        else:
            self.output.copy_(self.fn())
        return self.output


class GraphError(UserError):
    """A run that CUDA-graph capture cannot serve: one line."""


def graph_refusal(device: torch.device, dtype: str, compiled: bool) -> str | None:
    """Why a training step on ``device`` cannot be captured (see the module doc), or None if it can."""
    if device.type != "cuda":
        return f"--cuda-graph needs a CUDA device, got {device}"
    if dtype == "fp16":
        return "--cuda-graph cannot capture fp16's loss scaler (its skipped steps are decided on the host); use --dtype bf16"
    if compiled:
        return "--cuda-graph and --compile do not combine (torch.compile's mode='reduce-overhead' graphs a compiled model)"
    return None


def use_tensor_lr(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Make every param group's lr a device tensor and the optimizer capturable, so a captured step
    reads the lr written before each replay instead of the number it saw at capture."""
    for group in optimizer.param_groups:
        lr = group["lr"]
        if not isinstance(lr, torch.Tensor) or lr.device != device:
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
        group["capturable"] = True


def use_float_lr(optimizer: torch.optim.Optimizer) -> None:
    """Undo ``use_tensor_lr`` (a checkpoint of a graphed run loads its lr tensors, on the CPU):
    plain-number lrs and a non-capturable optimizer, as ``build_optimizer`` makes them."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(group["lr"])
        group["capturable"] = False


class GraphedTrainStep:
    """``train_step(model, optimizer, micro_batches, lr=...)``, captured after ``warmup`` eager steps.

    ``stepper(micro_batches, lr)`` returns the step's ``[sum of loss * count, correct, count]`` (float64,
    on the device), as ``train_step`` does; after the capture it is a static tensor that the next
    step overwrites, so read it (or add it up) before then. ``captured`` says whether steps now replay.
    On a CPU (tests) nothing is captured: a "replay" runs the eager step on the static buffers, so
    everything but the graph itself -- buffers, lr, warm-up, shape fallback -- is checked there.

    With a ``process_group`` (torchrun: ``model`` unwrapped, each rank its own micro-batches) the
    gradients are averaged over the group's ranks, as DDP averages them: every parameter's gradient is
    a view of one flat buffer, and a step is two graphs, the forward and backward's
    (``accumulate_gradients``) then the update's (``apply_gradients``), with one all-reduce of that
    buffer between them, launched from the host (the warm-up steps do the same eagerly). Unlike DDP,
    the all-reduce does not overlap the backward: for the seed model one call on 179 MB.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, device: torch.device,
                 dtype: str, grad_clip: float = 0.0, warmup: int = WARMUP_STEPS,
                 process_group: Optional[dist.ProcessGroup] = None):
        if warmup < 1:  # the first step compiles kernels and makes the optimizer state: never inside a capture
            raise ValueError(f"GraphedTrainStep needs warmup >= 1 eager steps, got {warmup}")
        self.model, self.optimizer, self.device = model, optimizer, torch.device(device)
        self.options = dict(device=self.device, dtype=dtype, grad_clip=grad_clip)
        self.warmup = warmup
        self.eager_steps = 0
        self.inputs: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None  # static device buffers
        self.graph: Optional[Captured] = None  # the step; with a process group, its forward and backward
        self.update: Optional[Captured] = None  # with a process group: the step's update
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.group = process_group
        if process_group is not None:
            self.grads = FlatGradients([p for g in optimizer.param_groups for p in g["params"]], self.device)
        use_tensor_lr(optimizer, self.device)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, micro_batches: Iterable, lr: float) -> torch.Tensor:
        micro = list(micro_batches)
        if self.captured and self._fits(micro):
            self._load(micro, lr)
            return self._replay()
        if self.captured or self.eager_steps < self.warmup:
            self.eager_steps += 1
            if self.group is None:
                return run_on(self.stream, lambda: train_step(self.model, self.optimizer, micro, lr=lr, **self.options))
            self._set_lr(lr)
            self.grads.attach()  # (an eager step elsewhere may have cleared .grad)
            metrics = run_on(self.stream, lambda: self._accumulate(micro))
            self.grads.all_reduce(self.group)
            run_on(self.stream, self._apply)
            return metrics
        self.inputs = [(torch.empty_like(x, device=self.device), torch.empty_like(y, device=self.device))
                       for x, y in micro]
        self._load(micro, lr)
        if self.group is None:
            self.optimizer.zero_grad(set_to_none=True)  # gradients are made inside the graph's memory
            self.graph = Captured(lambda: train_step(self.model, self.optimizer, self.inputs, **self.options),
                                  self.stream)
        else:
            self.grads.attach()
            self.graph = Captured(lambda: self._accumulate(self.inputs), self.stream)
            self.update = Captured(self._apply, self.stream)
        return self._replay()

    def _replay(self) -> torch.Tensor:
        metrics = self.graph.replay()
        if self.group is not None:
            self.grads.all_reduce(self.group)
            self.update.replay()
        return metrics

    def _accumulate(self, micro: list) -> torch.Tensor:
        self.grads.flat.zero_()
        return accumulate_gradients(self.model, micro, device=self.device, dtype=self.options["dtype"])

    def _apply(self) -> None:
        self.grads.flat.mul_(1.0 / dist.get_world_size(self.group))  # the sum of the ranks' gradients -> their mean
        apply_gradients(self.optimizer, grad_clip=self.options["grad_clip"])

    def _fits(self, micro: list) -> bool:
        return len(micro) == len(self.inputs) and all(
            x.shape == sx.shape and y.shape == sy.shape and x.dtype == sx.dtype and y.dtype == sy.dtype
            for (x, y), (sx, sy) in zip(micro, self.inputs))

    def _load(self, micro: list, lr: float) -> None:
        """The batch into the static buffers and the lr into its tensors, in stream order."""
        for (x, y), (sx, sy) in zip(micro, self.inputs):
            for src, dst in ((x, sx), (y, sy)):
                if src.device.type == "cpu" and self.device.type == "cuda":
                    src = src.pin_memory()  # an asynchronous copy; the pinned block lives until it is done
                dst.copy_(src, non_blocking=True)
        self._set_lr(lr)

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr)


class FlatGradients:
    """The gradients of ``params`` (one dtype, on ``device``) as views of one flat buffer, ``flat``:
    one all-reduce a step, at fixed addresses a graph can capture. A backward adds into a defined
    ``.grad`` in place, so once ``attach`` has set the views, gradients land in the buffer."""

    def __init__(self, params: list[torch.Tensor], device: torch.device):
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1 or any(p.device != device for p in params):
            raise ValueError(f"a flat gradient buffer needs parameters of one dtype on {device}, got "
                             f"{sorted(map(str, dtypes))} on {sorted({str(p.device) for p in params})}")
        self.params = params
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=dtypes.pop(), device=device)
        self.views = [view.view_as(p) for view, p in zip(self.flat.split([p.numel() for p in params]), params)]

    def attach(self) -> None:
        for p, view in zip(self.params, self.views):
            p.grad = view

    def all_reduce(self, group: dist.ProcessGroup) -> None:
        """The sum over the group's ranks, in stream order (no host wait)."""
        dist.all_reduce(self.flat, group=group)


class GraphedEval:
    """``forward_sums(model, x, y)`` for ``gpt.step.score``, captured in a CUDA graph per sequence
    length: the evaluation forward at one launch a batch.

    A validation pass of the seed preset forwards its 54,000 stories, ~11 M tokens in ~1,340 batches
    of 32 x 256: about the compute of the 500 training steps between two passes, and host-bound when
    eager as the step was. Here a batch's tokens are copied into static buffers of ``batch_size``
    rows; a batch with fewer rows (a split's last) is padded with x = 0 and y = -1, the padding
    ``gpt.data.eval_batches`` already gives a partial window, which counts for nothing. So one graph
    serves a whole split at each length (the context; the seed protocol's 255). A length's first
    batch runs eagerly on the capture stream (compilation, autotuning, workspaces), its second is
    captured, every later one replays. A batch with more rows or other dtypes than its length's
    first, a model in training mode or gradients on run eagerly (``forward_sums``): a replay never
    computes something other than what the call asks.

    The returned sums are a static tensor the next replay overwrites: add them up (``score`` does)
    before the next call. The parameters are read in place at every replay, so the graphs follow
    training and ``load_state_dict``. On a CPU (tests) ``Captured`` runs the forward itself over the
    static buffers, which checks everything but the graph: padding, buffers, warm-up, fallbacks.
    """

    def __init__(self, model: torch.nn.Module, *, device: torch.device, dtype: str, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"GraphedEval needs batch_size >= 1, got {batch_size}")
        self.model, self.device, self.dtype, self.batch_size = model, torch.device(device), dtype, batch_size
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # length T -> static (x, y), (batch_size, T)
        self.graphs: dict[int, Captured] = {}  # length T -> its captured forward

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows, T = x.shape
        if rows > self.batch_size or x.shape != y.shape or self.model.training or torch.is_grad_enabled():
            return forward_sums(self.model, x, y, self.device, self.dtype)
        warm = T in self.buffers
        if not warm:
            self.buffers[T] = (torch.empty((self.batch_size, T), dtype=x.dtype, device=self.device),
                               torch.empty((self.batch_size, T), dtype=y.dtype, device=self.device))
        elif (x.dtype, y.dtype) != tuple(b.dtype for b in self.buffers[T]):
            return forward_sums(self.model, x, y, self.device, self.dtype)
        self._load(x, y)
        if T in self.graphs:
            return self.graphs[T].replay()
        fn = lambda: forward_sums(self.model, *self.buffers[T], self.device, self.dtype)  # noqa: E731
        if not warm:  # a length's first batch: the eager warm-up
            return run_on(self.stream, fn)
        self.graphs[T] = Captured(fn, self.stream)
        return self.graphs[T].replay()

    def _load(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """x and y into their length's buffers (pinned, asynchronous copies), padding rows after them."""
        rows, T = x.shape
        for src, dst, pad in ((x, self.buffers[T][0], 0), (y, self.buffers[T][1], -1)):
            if src.device.type == "cpu" and self.device.type == "cuda":
                src = src.pin_memory()
            dst[:rows].copy_(src, non_blocking=True)
            if rows < self.batch_size:
                dst[rows:].fill_(pad)
