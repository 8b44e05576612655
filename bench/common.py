"""What the benchmarks share: the CUDA skip marker, measured bandwidth, and roofline bookkeeping
(data-sheet peaks are ``gpt.hardware.PEAKS``)."""

from __future__ import annotations

import functools
import time

import pytest
import torch

from gpt.hardware import device_peaks

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels at speed)")


@functools.lru_cache(maxsize=None)
def measured_copy_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write bytes / time), the practical memory roofline."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * nbytes * 10 / (start.elapsed_time(end) * 1e-3) / 1e9


def cuda_time_ms(fn, warmup: int = 5, iters: int = 20) -> float:
    """Median-free mean time of fn() in ms on the current stream, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def kernel_times_ms(fn, warmup: int = 3, iters: int = 10) -> dict[str, float]:
    """Device time per call in ms of each GPU kernel fn() launches (torch.profiler), largest first:
    what the kernels cost apart from launching them, and which of them costs what."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    times = {e.key: e.self_device_time_total / iters / 1e3 for e in prof.key_averages()
             if e.device_type == torch.autograd.DeviceType.CUDA}
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def device_time_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    """GPU time of fn()'s kernels per call in ms, launch overhead excluded. Beside ``cuda_time_ms``
    (back-to-back calls, where a host slower than the kernels sets the pace) it says what the
    kernels cost apart from launching them."""
    return sum(kernel_times_ms(fn, warmup, iters).values())


def short_kernel_name(name: str) -> str:
    """A profiler's kernel name without what every torch kernel repeats ('void ', 'at::native::',
    '(anonymous namespace)::'), so that the functor (``GeluBackwardCUDAKernelImpl``,
    ``CUDAFunctor_add<float>``) survives the cut to 110 characters."""
    for noise in ("void ", "at::native::", "(anonymous namespace)::"):
        name = name.replace(noise, "")
    return name[:110]


def top_kernels(times: dict[str, float], n: int = 8) -> list[str]:
    """The n costliest kernels of ``kernel_times_ms`` as short 'ms name' strings, for extra_info."""
    return [f"{ms:.3f} ms {short_kernel_name(name)}" for name, ms in list(times.items())[:n]]


KERNEL_GROUPS = ("gemm", "triton", "torch", "other")


def kernel_group(name: str) -> str:
    """Which of ``KERNEL_GROUPS`` a profiler kernel name belongs to: a cuBLAS / CUTLASS GEMM, a Triton
    kernel (ours, ``_..._kernel``, or inductor's, ``triton_...``), one of torch's own CUDA kernels
    (elementwise, reductions, the fused optimizer, the CUB sorts of an embedding's backward), else
    other (memory copies and sets)."""
    if any(tag in name for tag in ("nvjet", "gemm", "cutlass", "xmma", "cublas")):
        return "gemm"
    if "at::" in name or "cub::" in name:
        return "torch"
    if name.startswith(("_", "triton_")) and name.replace("_", "a").isalnum():
        return "triton"
    return "other"


def kernel_groups_ms(times: dict[str, float]) -> dict[str, float]:
    """``kernel_times_ms``'s times summed by ``kernel_group``: GEMMs against the rest of a step."""
    groups = dict.fromkeys(KERNEL_GROUPS, 0.0)
    for name, ms in times.items():
        groups[kernel_group(name)] += ms
    return {group: round(ms, 3) for group, ms in groups.items()}


def best_seconds(*fns, rounds: int = 3) -> list[float]:
    """Best wall time of each function over ``rounds`` rounds, taking turns (fn1, fn2, fn1, ...), so
    that a neighbour's load on a shared machine falls on every contender alike."""
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def record(benchmark, **info) -> None:
    """Put units and roofline figures into pytest-benchmark's extra_info (shown in the JSON and report)."""
    peaks = device_peaks()
    if "tflops" in info and "bf16_tflops" in peaks:
        info["pct_peak_tflops"] = round(100 * info["tflops"] / peaks["bf16_tflops"], 1)
    if "gbs" in info and "hbm_gbs" in peaks:
        info["pct_peak_gbs"] = round(100 * info["gbs"] / peaks["hbm_gbs"], 1)
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    benchmark.extra_info.update(info)


def as_tuple(out):
    """A function's outputs as a tuple (single tensors wrapped)."""
    return out if isinstance(out, tuple) else (out,)


def make_pass(fn, inputs, grads, which):
    """A no-argument callable running one pass of fn on leaf inputs (grads reset so none accumulate)."""

    def clear():
        for t in inputs:
            t.grad = None

    if which == "fwd":
        return lambda: fn(*inputs)
    if which == "bwd":
        outs = as_tuple(fn(*inputs))

        def bwd():
            clear()
            torch.autograd.backward(outs, grads, retain_graph=True)

        return bwd

    def fwd_bwd():
        clear()
        torch.autograd.backward(as_tuple(fn(*inputs)), grads)

    return fwd_bwd


def synced(fn):
    """fn followed by a device synchronisation, so wall-clock timers see the GPU work."""

    def run():
        fn()
        torch.cuda.synchronize()

    return run
