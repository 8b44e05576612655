"""Compile every kernel variant the launchers can pick for NVIDIA GPUs, on a machine without a GPU.

Triton compiles for any CUDA target without a GPU. Here Triton's active driver is a stand-in that
reports a target (sm_90 or sm_80, CI's gate; sm_89 or sm_86 on request) and its shared-memory limit, and our public functions
(``kernels.causal_attention_qkv``, ``kernels.causal_attention``, ``kernels.layer_norm``,
``kernels.add_layer_norm``, ``kernels.linear_cross_entropy``, forward and backward, and
``kernels.decode_attention``) are called on CPU tensors shaped as the model makes them: the fused
qkv projection (packed, or strided views of it), slices of
a ``KVCache`` and its whole fixed-size layers, (B, T, N) rows, the final hidden states against the
tied embedding. Each ``JITFunction.run`` becomes a warm-up
(compile, no launch), and each autotuned kernel is compiled once per configuration that survives
its own ``early_config_prune``. Signatures, the JIT's specialisation (unit strides as constants,
divisibility hints) and configurations are therefore those of a GPU run, not hand-written.

Compiled (``cases()``): attention in fp16 and bf16 for every supported head dim -- training forward
and backward (T = 256, and T = 16 for the 16-row configurations; both with dropout too, for sm_90
only, as the launchers refuse attention dropout below it), backward with kv_start, a prompt
prefilled into the KV cache, one-token decode with and without kv_start; LayerNorm and add +
LayerNorm forward and backward for N in {128, 512, 768, 1024, 4096, 8192} in fp32, fp16, bf16 and
the autocast mix (bf16 branch + fp32 residual); the LM head + cross-entropy row kernel for a
vocabulary of 50,257 (4,096-wide tiles, 8 warps) and of 97 (one 128-wide tile, 1 warp) with logits
in fp32, fp16 and bf16, training (gradient written) and evaluation (no_grad: statistics only); the
split-K decode kernels for every head dim in fp32, fp16 and bf16, with and without kv_start, in one
split and cut into 2, 8 and 64 key chunks (``DECODE_CASES``); the MLP's bias + GELU forward and
backward for N in {2048, 3072, 300} in fp32, fp16, bf16 and with an fp32 bias (``BIAS_GELU_CASES``). fp32 attention, a test path whose dots
run on FMA with one configuration, is left out: each of its compiles takes ~20 s at D = 128. Every kernel of
``KERNEL_MODULES`` and every CUDA autotune configuration must be reached (``uncovered``).

Per compiled variant: registers, stack and local bytes (spills) from ``cuobjdump
--dump-resource-usage`` on the cubin, shared memory (Triton's dynamic ``metadata.shared`` plus the
cubin's static shared memory), the tensor-core form of every dot (from the TTGIR: wgmma = MMAv3,
mma = MMAv2, fma = none), ``cp.async`` and 128-bit global loads in the PTX, the launch-time shared
memory estimate of autotuned kernels, and the estimated occupancy::

    regs/warp    = ceil(32 * regs / 256) * 256           (allocation unit 256 registers per warp)
    smem/block   = ceil((dynamic + static + 1024) / 128) * 128   (1 KiB per block reserved by CUDA)
    blocks/SM    = min(65536 // (regs/warp * warps), smem/SM // smem/block, 32, 64 // warps)
    warps/SM     = blocks/SM * warps                      (of at most 64)

The JIT, not the interpreter, is needed: the work runs in worker processes with TRITON_INTERPRET
unset, split over ``--jobs`` processes. Triton's on-disk cache keeps compiled kernels between runs.

    python -m kernels.compile_check --out bench/results/2026-11-26-static/compile.md

writes the table and exits 1 if any check fails (compile error, spill, shared-memory overflow,
missing tensor cores, estimate off, kernel or configuration never compiled).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from kernels import attention
from kernels.launch import through_jit
from kernels.decode_attention import SUPPORTED_HEAD_DIMS as DECODE_HEAD_DIMS

REPO = Path(__file__).resolve().parents[1]
KERNEL_MODULES = ("kernels.attention", "kernels.layernorm", "kernels.cross_entropy", "kernels.decode_attention",
                  "kernels.bias_gelu")
TABLE = REPO / "bench" / "results" / "2026-11-26-static" / "compile.md"
COMMAND = f"python -m kernels.compile_check --out {TABLE.relative_to(REPO)}"


@dataclass(frozen=True)
class Arch:
    name: str
    capability: int
    family: str  # the architecture's name, as the table's title says it
    max_shared_per_block: int  # opt-in limit per block (cudaDevAttrMaxSharedMemoryPerBlockOptin)
    shared_per_sm: int  # shared memory per SM usable by blocks (cudaDevAttrMaxSharedMemoryPerMultiprocessor)
    sms: int  # multiprocessors of the reference part (H100 SXM, A100)
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    reserved_shared_per_block: int = 1024  # cudaDevAttrReservedSharedMemoryPerBlock


ARCHS = {
    "sm_90": Arch("sm_90", 90, "Hopper", max_shared_per_block=232_448, shared_per_sm=233_472, sms=132),
    "sm_80": Arch("sm_80", 80, "Ampere", max_shared_per_block=166_912, shared_per_sm=167_936, sms=108),
    # The GeForce parts (RTX 40xx / L4 and RTX 30xx): 99 KiB of shared memory per block, 48 warps per
    # SM. Checked on request (``--arch sm_89 sm_86``), not by CI's gate: see GATE.
    "sm_89": Arch("sm_89", 89, "Ada", max_shared_per_block=101_376, shared_per_sm=102_400, sms=128,
                  max_warps_per_sm=48, max_blocks_per_sm=24),
    "sm_86": Arch("sm_86", 86, "Ampere GeForce", max_shared_per_block=101_376, shared_per_sm=102_400, sms=82,
                  max_warps_per_sm=48, max_blocks_per_sm=16),
}
# The architectures CI's gate compiles for (tests/test_compile_check.py) and the default here: the
# data-center parts this project's GPU runs use. Each further one costs ~2.5 minutes on 2 cores
# with a cold compile cache, which CI's 10-minute test budget does not have room for.
GATE = ("sm_90", "sm_80")


# ----------------------------------------------------------------------------------------------
# Triton without a GPU: a stand-in driver, and launches turned into compiles
# ----------------------------------------------------------------------------------------------


def nvidia_tools() -> tuple[Optional[Path], str]:
    """(directory of Triton's bundled cuobjdump, "") or (None, why the check cannot run here)."""
    from triton.backends import backends

    if "nvidia" not in backends:
        return None, f"the installed Triton {triton.__version__} has no NVIDIA backend"
    from triton.backends import nvidia

    return Path(nvidia.__file__).parent / "bin", ""


class _DeviceProperties:
    def __init__(self, arch: Arch):
        self.arch = arch

    def get_device_properties(self, device: int) -> dict:
        a = self.arch
        return {"max_shared_mem": a.max_shared_per_block, "max_num_regs": a.regs_per_sm,
                "multiprocessor_count": a.sms, "warpSize": 32}


class StandInDriver(DriverBase):
    """Triton's driver for a GPU that is not there: reports ``arch`` as the target and its limits.

    The current device is numbered by the capability, so kernels compiled for different targets
    sit in different JIT caches. Nothing can be launched or benchmarked.
    """

    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        self.utils = _DeviceProperties(arch)

    @classmethod
    def is_active(cls) -> bool:
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("the stand-in driver builds no launchers")

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch.capability, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError("the stand-in driver cannot time kernels")

    def get_current_device(self) -> int:
        return self.arch.capability

    def get_current_stream(self, device: int) -> int:
        return 0


class RecordingDriver(StandInDriver):
    """The stand-in driver with launchers that record each launch in ``launches`` instead of running
    it: what a GPU would be asked to run, on a machine without one (``tests/test_launch.py`` compares
    ``kernels.launch.Direct``'s launches with the JIT's). A launch is recorded as (kernel name,
    compiled kernel's handle, grid, stream, arguments); the launch hooks are called with the launch's
    metadata, as Triton's launchers call them. Loading a kernel gives it a new handle."""

    def __init__(self, arch: Arch):
        super().__init__(arch)
        self.launches: list[tuple] = []
        handles = iter(range(1, 1 << 30))
        self.utils.load_binary = lambda name, kernel, shared, device: (name, next(handles), 64, 0, 1024)

    def launcher_cls(self, src, metadata):
        name = src.fn.__name__

        def launch(g0, g1, g2, stream, function, packed_metadata, launch_metadata, enter, leave, *args):
            if enter is not None:
                enter(launch_metadata)
            self.launches.append((name, function, (g0, g1, g2), stream, args))
            if leave is not None:
                leave(launch_metadata)
        return launch


@dataclass
class Compiled:
    """One compile through the launchers: the JIT function, its constexprs, the kernel (None if it
    failed), the error, and the shared-memory estimate its autotuner's prune made (autotuned only)."""

    fn: JITFunction
    dtype: str  # of the first tensor argument (the input rows, or Q)
    constexprs: dict
    kernel: object
    error: Optional[str]
    estimate: Optional[int]


@contextlib.contextmanager
def compiling_for(arch: Arch) -> Iterator[list[Compiled]]:
    """Within the block, kernel launches compile for ``arch`` and are appended to the yielded list.

    Triton's active driver is the stand-in; ``JITFunction.run`` compiles (``warmup=True``) instead of
    launching; an autotuned kernel compiles every configuration its ``early_config_prune`` keeps,
    instead of benchmarking them (and past any configuration a real run chose: ``attention._Tuned``);
    no launch goes past the JIT (``kernels.launch.through_jit``); ``kernels.attention`` accepts CPU
    tensors. All restored on exit.
    """
    compiled: list[Compiled] = []
    pending_estimate: list[Optional[int]] = [None]
    jit_run, autotuner_run = JITFunction.run, Autotuner.run
    launchable, previous_driver = attention._launchable, driver._active

    def compile_instead(self, *args, grid, warmup, **kwargs):
        bound = inspect.signature(self.fn).bind_partial(
            *args, **{k: v for k, v in kwargs.items() if k in self.arg_names})
        constexprs = {p.name: bound.arguments[p.name] for p in self.params
                      if p.is_constexpr and p.name in bound.arguments}
        try:
            kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
            error = None
        except Exception as e:  # reported per variant, and the other variants still compile
            kernel, error = None, f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
        options = kernel.metadata if kernel is not None else argparse.Namespace(
            num_warps=kwargs.get("num_warps"), num_stages=kwargs.get("num_stages"))
        dtype = str(next(a.dtype for a in args if isinstance(a, torch.Tensor))).removeprefix("torch.")
        compiled.append(Compiled(self, dtype, {**constexprs, "num_warps": options.num_warps,
                                               "num_stages": options.num_stages}, kernel, error, pending_estimate[0]))
        return kernel

    def compile_every_config(self, *args, **kwargs):
        kwargs.pop("warmup")
        self.nargs = dict(zip(self.arg_names, args))
        try:
            configs = self.prune_configs(kwargs)
            named = {**self.nargs, **kwargs}
        finally:
            self.nargs = None
        estimate = getattr(self.early_config_prune, "estimate", None)
        for config in configs:
            pending_estimate[0] = None if estimate is None else estimate(config, named)
            self.fn.run(*args, **kwargs, **config.all_kwargs(), warmup=True)
        pending_estimate[0] = None

    driver.set_active(StandInDriver(arch))
    JITFunction.run, Autotuner.run = compile_instead, compile_every_config
    attention._launchable = lambda device: True
    chosen = [tuned.chosen for tuned in attention._TUNED]  # a real run's choices would skip the autotuner
    for tuned in attention._TUNED:
        tuned.chosen = {}
    try:
        with through_jit():  # a compile is not a launch: nothing to launch directly later
            yield compiled
    finally:
        JITFunction.run, Autotuner.run = jit_run, autotuner_run
        attention._launchable = launchable
        driver._active = previous_driver
        for tuned, before in zip(attention._TUNED, chosen):
            tuned.chosen = before


# ----------------------------------------------------------------------------------------------
# The launches: what the model and its users call, with the model's tensor layouts
# ----------------------------------------------------------------------------------------------

ATTENTION_DTYPES = ("float16", "bfloat16")
LAYER_NORM_NS = (128, 512, 768, 1024, 4096, 8192)
CROSS_ENTROPY_VS = (50257, 97)  # GPT-2's vocabulary (full 4,096-wide tiles + a ragged one); one small tile
BIAS_GELU_NS = (2048, 3072, 300)  # the seed model's and GPT-2 small's MLP widths; a ragged column block
HEADS = 3  # neither 1 nor a multiple of 16, as the JIT would specialise those


@dataclass(frozen=True)
class Case:
    """One call pattern: ``family`` (attention / decode / layernorm / cross_entropy / bias_gelu), what it is,
    dtype, head dim, N or the vocabulary size V; ``archs``: the architectures it is compiled for
    (None: every one), where the launchers refuse it on the others."""

    family: str
    what: str
    dtype: str
    size: int
    archs: Optional[tuple[str, ...]] = None

    def on(self, arch: str) -> bool:
        return self.archs is None or arch in self.archs

    @property
    def label(self) -> str:
        unit = {"attention": "D", "decode": "D", "layernorm": "N", "cross_entropy": "V", "bias_gelu": "N"}[self.family]
        return f"{self.what} {self.dtype} {unit}={self.size}"


ATTENTION_CASES = {
    "train T=256": "forward and backward on the fused projection's views, T a multiple of 16",
    "train T=16": "forward and backward of short sequences (query bucket 16: BLOCK_M = 16 configs)",
    "train T=256 dropout": "the same with dropout on the probabilities: the mask drawn in the forward and "
                           "drawn again in both backward kernels (sm_90 only: the launchers refuse it below)",
    "train T=16 dropout": "short sequences with dropout (BLOCK_M = 16 configs; sm_90 only)",
    "backward kv_start T=37": "forward and backward with left padding masked (kv_start), odd T",
    "prefill T=37 cache": "a prompt written to the KV cache and attended with the cache's kv_start",
    "decode Tq=1 cache": "one token against the cache slice with kv_start, as the model decodes",
    "decode Tq=1": "one token against the cache slice without kv_start",
}
LAYER_NORM_CASES = {
    "layer_norm": "LayerNorm forward and backward, weights in the input dtype",
    "add_layer_norm": "residual add + LayerNorm forward and backward, weights in the input dtype",
    "add_layer_norm bf16+fp32": "autocast: bf16 branch output added to the fp32 residual, fp32 weights, "
                                "the LayerNorm written in bf16 for the next Linear (out_dtype)",
    "layer_norm fp32->bf16": "autocast: the first block's LayerNorm of the fp32 residual stream, fp32 "
                             "weights, written in bf16 (out_dtype)",
    "add_layer_norm bf16+fp32 dropout": "the same add as training runs it, with the branch's dropout: the "
                                        "mask drawn in the forward and drawn again in the backward",
}
DECODE_CASES = {
    "static step": "the static decode step: one token per row against the whole fixed-size cache, "
                   "masked by the device length, batch x heads filling the programs (one split)",
    "static step padded": "the same with left padding masked (kv_start)",
    "split-K 2 kv_start": "batch 1, one head, a 4,096-slot cache cut into 2 key chunks, kv_start, then combined",
    "split-K 8": "the same cut into 8 key chunks, no padding",
    "split-K 64": "the same cut into 64 key chunks (the most the launcher picks)",
}
BIAS_GELU_CASES = {
    "mlp": "the MLP's bias + GELU after its first Linear, forward and backward, bias in the input dtype",
    "mlp bf16+fp32": "autocast: the Linear's bf16 output and the fp32 bias",
}
CROSS_ENTROPY_CASES = {
    "lm_head train": "fp32 hidden states and tied fp32 weight, logits in the case's dtype, loss.backward()",
    "lm_head eval": "the same under no_grad: statistics only, no gradient written",
}


def cases() -> list[Case]:
    """Every call pattern compiled for each architecture."""
    # Attention dropout: Hopper only (attention.DROPOUT_MIN_CAPABILITY; on sm_80 its backward spills).
    out = [Case("attention", what, dtype, d, ("sm_90",) if "dropout" in what else None)
           for d in attention.SUPPORTED_HEAD_DIMS for dtype in ATTENTION_DTYPES for what in ATTENTION_CASES]
    for n in LAYER_NORM_NS:
        for what in LAYER_NORM_CASES:
            dtypes = ("bfloat16",) if "fp32" in what else ("float32", "float16", "bfloat16")
            out += [Case("layernorm", what, dtype, n) for dtype in dtypes]
    out += [Case("decode", what, dtype, d) for d in DECODE_HEAD_DIMS
            for dtype in ("float32", "float16", "bfloat16") for what in DECODE_CASES]
    for n in BIAS_GELU_NS:
        out += [Case("bias_gelu", "mlp", dtype, n) for dtype in ("float32", "float16", "bfloat16")]
        out.append(Case("bias_gelu", "mlp bf16+fp32", "bfloat16", n))
    out += [Case("cross_entropy", what, dtype, v) for v in CROSS_ENTROPY_VS
            for dtype in ("float32", "float16", "bfloat16") for what in CROSS_ENTROPY_CASES]
    return out


def _attention_call(case: Case) -> None:
    import kernels
    from gpt.config import GPTConfig
    from gpt.kvcache import KVCache

    dtype, D, B, H = getattr(torch, case.dtype), case.size, 2, HEADS
    config = GPTConfig(vocab_size=64, max_seq_length=64, num_layers=1, num_heads=H, d_model=H * D, d_ff=64)

    def projection(T, requires_grad=False):
        """q, k, v (B, H, T, D): views of the fused projection's (B, T, 3 * C) output, as the model makes."""
        qkv = torch.randn(B, T, 3 * H * D, dtype=dtype, requires_grad=requires_grad)
        return qkv, [t.transpose(1, 2) for t in qkv.view(B, T, 3, H, D).unbind(2)]

    def train(T, kv_start=None, dropout_p=0.0):
        """The model's training step: the packed projection (its gradient written in one piece), or
        with kv_start the three views."""
        qkv, (q, k, v) = projection(T, requires_grad=True)
        y = (kernels.causal_attention_qkv(qkv.view(B, T, 3, H, D), dropout_p=dropout_p) if kv_start is None
             else kernels.causal_attention(q, k, v, kv_start=kv_start))
        merged = y.transpose(1, 2).reshape(B, T, H * D)  # the model's head merge: dO arrives strided
        merged.backward(torch.ones_like(merged))

    def cached(prompt, decode, kv_start):
        """A prompt of ``prompt`` tokens into the cache, then (if ``decode``) one more token, attending
        to the cache slices [0, pos + T) as the model does; only the last step calls the kernel."""
        cache = KVCache.allocate(config, B, "cpu", dtype)
        steps = [prompt, 1] if decode else [prompt]
        with torch.no_grad():
            for i, T in enumerate(steps):
                _, (q, k, v) = projection(T)
                k, v = cache.update(0, k, v)  # views of the (L, B, H, max_len, D) cache
                if i == len(steps) - 1:
                    kernels.causal_attention(q, k, v, kv_start=cache.start if kv_start else None)
                cache.pos += T

    calls: dict[str, Callable[[], None]] = {
        "train T=256": lambda: train(256),
        "train T=16": lambda: train(16),
        "train T=256 dropout": lambda: train(256, dropout_p=0.1),
        "train T=16 dropout": lambda: train(16, dropout_p=0.1),
        "backward kv_start T=37": lambda: train(37, kv_start=torch.tensor([0, 5])),
        "prefill T=37 cache": lambda: cached(37, decode=False, kv_start=True),
        "decode Tq=1 cache": lambda: cached(37, decode=True, kv_start=True),
        "decode Tq=1": lambda: cached(37, decode=True, kv_start=False),
    }
    calls[case.what]()


def _layer_norm_call(case: Case) -> None:
    import kernels

    dtype, N = getattr(torch, case.dtype), case.size
    shape = (2, 64, N)  # (B, T, N) activations: 128 rows

    def leaf(*size, dt=dtype):
        return torch.randn(*size, dtype=dt).requires_grad_()

    autocast = "fp32" in case.what  # fp32 weights and residual stream; the LayerNorm written in bf16
    weight_dtype = torch.float32 if autocast else dtype
    weight, bias = leaf(N, dt=weight_dtype), leaf(N, dt=weight_dtype)
    out_dtype = dtype if autocast else None
    if case.what.startswith("layer_norm"):
        y = kernels.layer_norm(leaf(*shape, dt=torch.float32 if autocast else dtype), weight, bias, out_dtype=out_dtype)
        y.backward(torch.ones_like(y))
    else:
        residual = leaf(*shape, dt=torch.float32 if autocast else dtype)
        p = 0.1 if "dropout" in case.what else 0.0
        y, s = kernels.add_layer_norm(leaf(*shape), residual, weight, bias, out_dtype=out_dtype, dropout_p=p)
        torch.autograd.backward((y, s), (torch.ones_like(y), torch.ones_like(s)))


def _cross_entropy_call(case: Case) -> None:
    import kernels

    dtype, V = getattr(torch, case.dtype), case.size
    h = torch.randn(2, 64, 32).requires_grad_()  # (B, T, C) final hidden states, fp32 as under autocast
    weight = torch.randn(V, 32).requires_grad_()  # the tied embedding, the fp32 master
    targets = torch.randint(0, V, (2, 64))
    targets[:, -1] = -1  # the last position has no next token
    with torch.set_grad_enabled(case.what == "lm_head train"):
        loss, _, _ = kernels.linear_cross_entropy(h, weight, targets, dtype=dtype)
    if loss.requires_grad:
        loss.backward()


def _decode_call(case: Case) -> None:
    import kernels
    from gpt.config import GPTConfig
    from gpt.kvcache import KVCache

    dtype, D = getattr(torch, case.dtype), case.size
    B, H, S = (2, HEADS, 256) if case.what.startswith("static") else (1, 1, 4096)
    splits = None if case.what.startswith("static") else int(case.what.split()[1])
    config = GPTConfig(vocab_size=64, max_seq_length=S, num_layers=1, num_heads=H, d_model=H * D, d_ff=64)
    cache = KVCache.allocate(config, B, "cpu", dtype, padded="padded" in case.what or "kv_start" in case.what)
    cache.reset(S // 2)  # a half-full cache
    q, k, v = (t.transpose(1, 2) for t in torch.randn(B, 1, 3, H, D, dtype=dtype).unbind(2))  # (B, H, 1, D) views
    with torch.no_grad():
        k, v, kv_len = cache.write(0, k, v)  # the whole (B, H, S, D) caches of the layer, and the length (1,)
        kernels.decode_attention(q, k, v, kv_len, kv_start=cache.start, num_splits=splits)


def _bias_gelu_call(case: Case) -> None:
    from kernels.bias_gelu import bias_gelu

    dtype, N = getattr(torch, case.dtype), case.size
    u = torch.randn(2, 64, N, dtype=dtype).requires_grad_()  # (B, T, N): the first Linear's output
    bias = torch.randn(N, dtype=torch.float32 if "fp32" in case.what else dtype).requires_grad_()
    g = bias_gelu(u, bias)
    g.backward(torch.ones_like(g))


def launch(case: Case) -> None:
    """Make the calls of one case (under ``compiling_for`` they compile instead of running)."""
    calls = {"attention": _attention_call, "decode": _decode_call, "layernorm": _layer_norm_call,
             "cross_entropy": _cross_entropy_call, "bias_gelu": _bias_gelu_call}
    calls[case.family](case)


# ----------------------------------------------------------------------------------------------
# What a compiled kernel uses
# ----------------------------------------------------------------------------------------------

_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_MMA_LAYOUT = re.compile(r"^(#\w+) = #ttg\.nvidia_mma<\{versionMajor = (\d+)", re.M)
_DOT = re.compile(r"= (?:tt\.dot|ttng\.warp_group_dot) .*-> tensor<[^>]*, (#\w+)>")
_VECTOR_LOAD = re.compile(r"ld\.global[.\w]*\.v4\.")


def resource_usage(cubin: bytes, bin_dir: Path) -> dict:
    """Registers, stack, static shared and local bytes of the cubin's one kernel, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(bin_dir / "cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    found = _RESOURCES.findall(out)
    if len(found) != 1:
        raise RuntimeError(f"expected one kernel in cuobjdump's resource usage, got:\n{out}")
    regs, stack, shared, local = map(int, found[0])
    return {"regs": regs, "stack": stack, "static_shared": shared, "local": local}


def dot_forms(ttgir: str) -> list[str]:
    """The tensor-core form of each dot in the TTGIR: "wgmma" (MMAv3), "mma" (MMAv2) or "fma"."""
    versions = {name: int(v) for name, v in _MMA_LAYOUT.findall(ttgir)}
    forms = {3: "wgmma", 2: "mma"}
    return [forms.get(versions.get(layout, 0), "fma") for layout in _DOT.findall(ttgir)]


def warps_per_sm(arch: Arch, regs: int, shared: int, warps: int) -> int:
    """Estimated resident warps per SM from registers and shared memory (formula in the docstring)."""
    regs_per_warp = math.ceil(32 * max(regs, 1) / 256) * 256
    smem = math.ceil((shared + arch.reserved_shared_per_block) / 128) * 128
    blocks = min(arch.regs_per_sm // (regs_per_warp * warps), arch.shared_per_sm // smem,
                 arch.max_blocks_per_sm, arch.max_warps_per_sm // warps)
    return blocks * warps


def describe(arch: Arch, case: Case, c: Compiled, bin_dir: Path) -> dict:
    """A JSON-able row for one compile."""
    row = {"arch": arch.name, "kernel": c.fn.fn.__name__, "case": case.label, "family": case.family,
           "dtype": c.dtype, "size": case.size, "config": {k: _plain(v) for k, v in c.constexprs.items()},
           "estimate": c.estimate, "error": c.error}
    if c.kernel is None:
        return row
    usage = resource_usage(c.kernel.asm["cubin"], bin_dir)
    ptx = c.kernel.asm["ptx"]
    shared = c.kernel.metadata.shared + usage["static_shared"]
    row.update(usage, hash=c.kernel.metadata.hash, dynamic_shared=c.kernel.metadata.shared, shared=shared,
               dots=dot_forms(c.kernel.asm["ttgir"]), cp_async="cp.async" in ptx,
               vector_loads=bool(_VECTOR_LOAD.search(ptx)),
               warps_per_sm=warps_per_sm(arch, usage["regs"], shared, c.constexprs["num_warps"]))
    return row


def _plain(v):
    return v if isinstance(v, (bool, int, float, str)) or v is None else str(v)


def compile_cases(units: list[tuple[str, Case]]) -> list[dict]:
    """Compile every (arch name, case) in this process: one row per compile (JIT's TRITON_INTERPRET unset)."""
    bin_dir, why = nvidia_tools()
    if bin_dir is None:
        raise RuntimeError(why)
    rows = []
    for arch_name, case in units:
        arch = ARCHS[arch_name]
        with compiling_for(arch) as compiled:
            launch(case)
        rows += [describe(arch, case, c, bin_dir) for c in compiled]
    return rows


def compile_all(archs=GATE, jobs: int = 2) -> list[dict]:
    """Compile every case for every arch in ``jobs`` worker processes; one row per distinct variant.

    Workers take (arch, case) units from a shared list, largest head dims first, claiming each with
    a file so that a slow unit does not hold the others back. Rows of the same compiled kernel (same
    arch and hash, reached from several cases) are merged, their cases listed in ``cases``.
    """
    every = cases()
    order = sorted(range(len(every)), key=lambda i: (every[i].family != "attention", -every[i].size))
    units = [(a, i) for i in order for a in archs if every[i].on(a)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "units.json").write_text(json.dumps(units))
        procs = [subprocess.Popen([sys.executable, "-m", "kernels.compile_check", "--worker", tmp, str(j)],
                                  env=env, cwd=REPO, stderr=subprocess.PIPE, text=True) for j in range(jobs)]
        try:
            errors = [(proc.returncode, err) for proc in procs for _, err in [proc.communicate()] if proc.returncode]
        finally:  # interrupted: stop the workers too
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if errors:
            raise RuntimeError(f"compile worker failed ({errors[0][0]}):\n{errors[0][1][-4000:]}")
        rows = [row for j in range(jobs) for row in json.loads((Path(tmp) / f"rows{j}.json").read_text())]
    return merge(rows)


def _work(tmp: Path, worker: int) -> None:
    """A worker: compile the units no other worker has claimed yet; write the rows."""
    every = cases()
    rows = []
    for n, (arch, i) in enumerate(json.loads((tmp / "units.json").read_text())):
        try:
            os.close(os.open(tmp / f"{n}.claim", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        rows += compile_cases([(arch, every[i])])
    (tmp / f"rows{worker}.json").write_text(json.dumps(rows))


def merge(rows: list[dict]) -> list[dict]:
    """One row per (arch, compiled hash) -- or per failing compile -- listing every case that reached it."""
    merged: dict[tuple, dict] = {}
    for row in sorted(rows, key=lambda r: (r["arch"], r["case"])):
        key = (row["arch"], row.get("hash") or (row["kernel"], json.dumps(row["config"]), row["case"]))
        if key in merged:
            merged[key]["cases"].append(row["case"])
            merged[key]["sizes"] = sorted({*merged[key]["sizes"], row["size"]})
        else:
            merged[key] = {**row, "cases": [row["case"]], "sizes": [row["size"]]}
    return list(merged.values())


# ----------------------------------------------------------------------------------------------
# Checks (each returns one line per failure)
# ----------------------------------------------------------------------------------------------


def _name(row: dict) -> str:
    cfg = ", ".join(f"{k}={v}" for k, v in row["config"].items())
    return f"{row['arch']} {row['kernel']}({cfg}) [{row['cases'][0]}]"


def compile_errors(rows) -> list[str]:
    return [f"{_name(r)}: {r['error']}" for r in rows if r["error"]]


def spills(rows) -> list[str]:
    return [f"{_name(r)}: {r['stack']} stack / {r['local']} local bytes ({r['regs']} registers)"
            for r in rows if not r["error"] and (r["stack"] or r["local"])]


def shared_overflows(rows) -> list[str]:
    return [f"{_name(r)}: {r['shared']} B shared > {ARCHS[r['arch']].max_shared_per_block} B per block"
            for r in rows if not r["error"] and r["shared"] > ARCHS[r["arch"]].max_shared_per_block]


def missing_tensor_cores(rows) -> list[str]:
    """fp16/bf16 dots on tensor cores: wgmma on sm_90 when each dot's rows fill a warpgroup's 64
    (forward and dQ: BLOCK_M rows; dK/dV: BLOCK_N rows), else mma; mma on sm_80, sm_89 and sm_86."""
    bad = []
    for r in rows:
        if r["error"] or not r["dots"] or r["dtype"] not in ("float16", "bfloat16"):
            continue
        rows_per_dot = r["config"]["BLOCK_N" if "dkdv" in r["kernel"] else "BLOCK_M"]
        want = "wgmma" if r["arch"] == "sm_90" and rows_per_dot >= 64 else "mma"
        if any(form != want for form in r["dots"]):
            bad.append(f"{_name(r)}: dots {r['dots']}, expected all {want}")
    return bad


def estimate_mismatches(rows, slack: float = 2.0) -> list[str]:
    """The prune's estimate must cover the compiled shared memory (else it could admit a config that
    fails to launch) and stay within ``slack`` times it (else it throws good configs away)."""
    return [f"{_name(r)}: estimate {r['estimate']} B vs compiled {r['shared']} B"
            for r in rows if not r["error"] and r["estimate"] is not None
            and not r["shared"] <= r["estimate"] <= slack * r["shared"]]


def launched_kernels() -> set[str]:
    """Every ``@triton.jit`` function of the kernel modules that no other one calls: the kernels."""
    import ast
    import importlib

    bodies = {}
    for module in KERNEL_MODULES:
        tree = ast.parse(Path(importlib.import_module(module).__file__).read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and any(ast.unparse(d).startswith("triton.jit") for d in node.decorator_list):
                bodies[node.name] = {n.func.id for n in ast.walk(node)
                                     if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    called = set().union(*bodies.values())
    return {name for name in bodies if name not in called}


def uncovered(rows, archs=GATE) -> list[str]:
    """Kernels never compiled, and CUDA autotune configurations no case compiles (dead entries)."""
    out = [f"{arch}: kernel {name} never compiled" for arch in archs for name in sorted(launched_kernels())
           if not any(r["arch"] == arch and r["kernel"] == name for r in rows)]
    for kernel, configs in attention._CUDA_CONFIGS.items():
        for c in configs:
            want = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
            for arch in archs:
                if not any(r["arch"] == arch and r["kernel"] == kernel
                           and all(r["config"].get(k) == v for k, v in want.items()) for r in rows):
                    out.append(f"{arch}: {kernel} config {want} compiled by no case")
    return out


def problems(rows, archs=GATE) -> list[str]:
    return (compile_errors(rows) + spills(rows) + shared_overflows(rows) + missing_tensor_cores(rows)
            + estimate_mismatches(rows) + uncovered(rows, archs))


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------


def markdown(rows: list[dict], out: Path = TABLE) -> str:
    """The table of ``rows``, to be written to ``out`` (named in its regeneration command)."""
    out = out.resolve()
    archs = [a for a in ARCHS if any(r["arch"] == a for r in rows)]
    command = (f"python -m kernels.compile_check --out {out.relative_to(REPO) if out.is_relative_to(REPO) else out}"
               + ("" if tuple(archs) == GATE else f" --arch {' '.join(archs)}"))
    limits = [ARCHS[a] for a in archs]
    per_sm = ("32, 64 // warps" if all((a.max_blocks_per_sm, a.max_warps_per_sm) == (32, 64) for a in limits) else
              "blocks/SM limit, warps/SM limit // warps; " + ", ".join(
                  f"{a.name} {a.max_blocks_per_sm} and {a.max_warps_per_sm}" for a in limits))
    lines = [
        f"# Kernels compiled for {' and '.join(f'{ARCHS[a].family} ({a})' for a in archs)} without a GPU",
        "",
        f"Triton {triton.__version__}, compiled on a CPU. Regenerate with `{command}` "
        "(see `kernels/compile_check.py`; CI runs the same checks in `tests/test_compile_check.py`).",
        "",
        "Every variant our launchers pick, compiled through the launchers with the JIT's own "
        "specialisation: attention for D in {16, 32, 64, 128}, fp16 and bf16, every autotune "
        "configuration kept by the launch-time prune for the case's query length bucket; LayerNorm "
        f"for N in {{{', '.join(map(str, LAYER_NORM_NS))}}}; the LM head + cross-entropy row kernel for V in "
        f"{{{', '.join(map(str, CROSS_ENTROPY_VS))}}}, logits in fp32, fp16 and bf16; the split-K decode kernels for D in "
        "{16, 32, 64, 128} in fp32, fp16 and bf16 (one query row: no dots); the MLP's bias + GELU for N in "
        f"{{{', '.join(map(str, BIAS_GELU_NS))}}} in fp32, fp16 and bf16. One row per distinct compiled "
        "kernel; *cases* lists the calls that reach it: "
        + "; ".join(f"*{k}*: {v}" for k, v in {**ATTENTION_CASES, **LAYER_NORM_CASES, **DECODE_CASES,
                                                  **CROSS_ENTROPY_CASES, **BIAS_GELU_CASES}.items())
        + ". fp32 attention (a test path: FMA dots, one configuration) is not compiled here.",
        "",
        "Columns: *regs* per thread, *spill* = stack / local bytes (cuobjdump), *shared* = Triton's "
        "dynamic shared memory + the cubin's static (bytes), *est* = the launch-time prune's estimate "
        "(autotuned kernels), *dots* = tensor-core form of each dot (wgmma, mma, fma = none), "
        "*loads* = cp.async / 128-bit global loads in the PTX, *warps/SM* = estimated occupancy: "
        "blocks/SM = min(65536 // (ceil(32 regs / 256) * 256 * warps), smem/SM // "
        f"ceil((shared + 1024) / 128) * 128, {per_sm}), warps/SM = blocks/SM * warps "
        f"(smem/SM: {', '.join(f'{a.name} {a.shared_per_sm:,} B' for a in limits)}; per-block limit "
        f"{', '.join(f'{a.name} {a.max_shared_per_block:,} B' for a in limits)}).",
        "",
    ]
    found = problems(rows, tuple(archs))
    lines += ["**Checks: all passed** (compiles, no spills, shared memory within the per-block limit, "
              "tensor cores in every fp16/bf16 dot, estimate within [1, 2] x compiled, every kernel "
              "and configuration compiled)." if not found else "**Checks failed:**"]
    lines += [f"- {p}" for p in found]
    for kernel in sorted({r["kernel"] for r in rows}):
        lines += ["", f"## {kernel}", "",
                  "| arch | dtype | D/N/V | config | warps | stages | regs | spill | shared | est | dots | loads "
                  "| warps/SM | cases |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted((r for r in rows if r["kernel"] == kernel),
                        key=lambda r: (r["arch"], r["dtype"], r["sizes"], json.dumps(r["config"]), r["cases"])):
            cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items() if k not in ("num_warps", "num_stages"))
            cases_ = "; ".join(sorted({c.rsplit(" ", 2)[0] for c in r["cases"]}))
            sizes = "/".join(map(str, r["sizes"]))
            if r["error"]:
                lines.append(f"| {r['arch']} | {r['dtype']} | {sizes} | {cfg} | {r['config']['num_warps']} "
                             f"| {r['config']['num_stages']} | error: {r['error']} | | | | | | | {cases_} |")
                continue
            dots = ", ".join(f"{r['dots'].count(f)} {f}" for f in ("wgmma", "mma", "fma") if f in r["dots"])
            loads = ", ".join(name for name, on in (("cp.async", r["cp_async"]), ("v4", r["vector_loads"])) if on)
            lines.append(
                f"| {r['arch']} | {r['dtype']} | {sizes} | {cfg} | {r['config']['num_warps']} "
                f"| {r['config']['num_stages']} | {r['regs']} | {r['stack']}/{r['local']} | {r['shared']:,} "
                f"| {'' if r['estimate'] is None else format(r['estimate'], ',')} | {dots or '-'} | {loads or '-'} "
                f"| {r['warps_per_sm']} | {cases_} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write the markdown table here")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--arch", nargs="+", default=list(GATE), choices=list(ARCHS),
                   help=f"targets (default: {' '.join(GATE)}, CI's gate)")
    p.add_argument("--worker", nargs=2, metavar=("DIR", "INDEX"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
        _work(Path(args.worker[0]), int(args.worker[1]))
        return 0
    _, why = nvidia_tools()
    if why:
        print(why, file=sys.stderr)
        return 1
    rows = compile_all(tuple(args.arch), args.jobs)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(rows, args.out))
    found = problems(rows, tuple(args.arch))
    print(f"{len(rows)} compiled variants, {len(found)} problems", *found, sep="\n")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
