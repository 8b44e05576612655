"""Host time per call of the kernels' Python launchers, the kernel launch itself left out.

On the H200 (bench/results/2026-11-26-NVIDIA-H200/) a LayerNorm forward took 62-106 us a call from 2M
to 67M elements and the split-K decode attention 60-77 us: the host, not the GPU, set the pace of
our small launches. This benchmark measures that host work on any machine, the CPU included:
each public function is called on small CPU tensors with Triton's ``JITFunction.run`` and
``Autotuner.run`` replaced by no-ops (``stub_launches``), so what is timed is our validation,
allocation, autograd node and block-size logic -- per call, in microseconds, the best of several
rounds. Beside it, what Triton's own dispatch adds on top (binding, specialisation, cache lookup:
``JITFunction.run(..., warmup=True)`` on a compiled kernel, through the compile check's stand-in
sm_90 driver, for the LayerNorm forward kernel), and the C++-dispatched ``F.layer_norm`` on the same
tensors as the peer (its whole call, compute included). A CUDA launch (~3-5 us of driver time) comes
on top of all of these on a GPU; a CUDA graph (``--cuda-graph``) removes all of it.

    python -m pytest bench/test_bench_host.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

import kernels
from bench.common import record
from kernels import attention

pytestmark = pytest.mark.benchmark(group="host")

ROOT = Path(__file__).resolve().parents[1]
N = 512  # the seed model's width
ROUNDS, CALLS = 5, 2000


def per_call_us(fn) -> float:
    """Best over ROUNDS of the mean host time of CALLS calls of fn(), in us."""
    fn()
    best = float("inf")
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        for _ in range(CALLS):
            fn()
        best = min(best, (time.perf_counter() - t0) / CALLS * 1e6)
    return best


@pytest.fixture
def stub_launches(monkeypatch):
    """Kernel launches become no-ops (the JIT's, the autotuner's and, on a CPU, the interpreter's),
    and the launchers accept CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction

    for cls in (JITFunction, Autotuner, InterpretedFunction):
        monkeypatch.setattr(cls, "run", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(attention, "_launchable", lambda device: True)


def _calls():
    """The public calls timed: (name, fn), on small bf16 CPU tensors (fp32 LayerNorm parameters)."""
    x = torch.randn(2, 4, N, dtype=torch.bfloat16)
    w, b = torch.ones(N), torch.zeros(N)
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    q = torch.randn(2, 8, 16, 64, dtype=torch.bfloat16)
    cache = torch.randn(2, 8, 64, 64, dtype=torch.bfloat16)
    q1, kv_len = q[:, :, :1], torch.tensor([20, 20])
    return [
        ("layer_norm, training (autograd node)", lambda: kernels.layer_norm(x, wg, bg)),
        ("layer_norm, inference", lambda: kernels.layer_norm(x, w, b)),
        ("add_layer_norm, training (autograd node)", lambda: kernels.add_layer_norm(x, x, wg, bg)),
        ("add_layer_norm, inference", lambda: kernels.add_layer_norm(x, x, w, b)),
        ("causal_attention, inference", lambda: kernels.causal_attention(q, q, q)),
        ("decode_attention", lambda: kernels.decode_attention(q1, cache, cache, kv_len)),
    ]


@pytest.mark.parametrize("index", range(6), ids=[name for name, _ in _calls()])
def test_launcher_host_us(benchmark, stub_launches, index):
    name, fn = _calls()[index]
    x, w, b = torch.randn(2, 4, N, dtype=torch.bfloat16), torch.ones(N), torch.zeros(N)
    peer = per_call_us(lambda: F.layer_norm(x, (N,), w, b))
    ours = per_call_us(fn)
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=CALLS // 10, warmup_rounds=1)
    # ratio_vs_: the peer's time over ours, as in every benchmark here (< 1: ours takes longer)
    record(benchmark, host_us=round(ours, 2), f_layer_norm_us=round(peer, 2), ratio_vs_f_layer_norm=round(peer / ours, 2),
           what=name)


def dispatch_us() -> float:
    """Host us per ``JITFunction.run(..., warmup=True)`` of the compiled LayerNorm forward kernel
    (sm_90, the compile check's stand-in driver). Needs the JIT: run with TRITON_INTERPRET unset."""
    from triton.runtime import driver

    from kernels import compile_check
    from kernels.layernorm import _block_and_warps, _layer_norm_fwd_kernel

    driver.set_active(compile_check.StandInDriver(compile_check.ARCHS["sm_90"]))
    x = torch.randn(8, N, dtype=torch.bfloat16)
    y, w, b, stats = torch.empty_like(x), torch.ones(N), torch.zeros(N), torch.empty(8)
    block, warps = _block_and_warps(N)
    args = (x, x, y, y, w, b, stats, stats, N, N, N, 1e-5)
    return per_call_us(lambda: _layer_norm_fwd_kernel.run(*args, grid=(8,), warmup=True, HAS_RESIDUAL=False,
                                                          BLOCK_N=block, num_warps=warps))  # (the first compiles)


def test_triton_dispatch_host_us(benchmark):
    """What Triton's JIT adds per launch on the host before the driver (binding, specialisation,
    cache lookup), measured in a process of its own where the JIT, not the interpreter, is loaded."""
    import triton

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from bench.test_bench_host import dispatch_us; print(dispatch_us())"
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    us = float(out.stdout.split()[-1])
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the figure is the child's, in extra_info
    record(benchmark, host_us=round(us, 2), triton=triton.__version__, wall_s=round(time.perf_counter() - t0, 1))
