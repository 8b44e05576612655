"""Host time per call of the kernels' Python launchers, the kernel launch itself left out.

On the H200 (bench/results/2026-11-26-NVIDIA-H200/) a LayerNorm forward took 62-106 us a call from 2M
to 67M elements and the split-K decode attention 60-77 us: the host, not the GPU, set the pace of
our small launches. This benchmark measures that host work on any machine, the CPU included:
each public function is called on small CPU tensors with Triton's ``JITFunction.run`` and
``Autotuner.run`` replaced by no-ops (``stub_launches``), so what is timed is our validation,
allocation, autograd node and block-size logic -- per call, in microseconds, the best of several
rounds, against the C++-dispatched ``F.layer_norm`` on the same tensors as the peer (its whole
call, compute included). Then the same calls with Triton's launch path on top
(``test_dispatched_host_us``, on the compile check's stand-in sm_90 driver whose launchers record
the launch instead of making it): ours, past the JIT's per-call dispatch once a launch key is known
(``kernels.launch.Direct``), against every launch through ``JITFunction.run`` (binding,
specialisation, cache lookup, launch metadata) and, for the attention launches, through Triton's
``Autotuner`` too (which ``attention._Tuned`` skips once a key is tuned). A CUDA launch (~3-5 us
of driver time) comes on top of all of these on a GPU; a CUDA graph (``--cuda-graph``) removes all
of it.

    python -m pytest bench/test_bench_host.py
"""

from __future__ import annotations

import json
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


# The calls timed through Triton's own dispatch, at the seed model's shapes (batch 16 x 256, 8 heads
# of 64; decoding one token against a 1,024-slot cache).
DISPATCHED = ["layer_norm, inference", "causal_attention forward, inference",
              "causal_attention backward (launches)", "decode_attention"]


def autotune_files() -> set:
    """The autotuners' choices in Triton's cache directory (``cache_results``)."""
    from triton import knobs

    return {str(p) for p in Path(knobs.cache.dir).rglob("*.autotune.json")}


def dispatched_us() -> dict[str, list]:
    """Host us per call of each DISPATCHED call through Triton's real launch path, on the compile
    check's stand-in sm_90 driver whose launchers record the launch instead of running it
    (``RecordingDriver``): [ours (launches past the JIT's dispatch once a key is known,
    ``kernels.launch.Direct``), every launch through ``JITFunction.run`` (binding, specialisation,
    cache lookup, launch metadata), and for the autotuned attention kernels also every launch
    through Triton's ``Autotuner`` (which ``attention._Tuned`` skips after a key's first launch),
    else None]. Needs the JIT: run with TRITON_INTERPRET unset (``test_dispatched_host_us`` runs it
    in a process of its own)."""
    from triton.runtime import driver

    from kernels import compile_check, launch

    recording = compile_check.RecordingDriver(compile_check.ARCHS["sm_90"])
    driver.set_active(recording)
    attention._launchable = lambda device: True
    Autotuner._bench = lambda self, *args, config, **kw: [float(config.num_warps)] * 3  # no GPU to time them on
    for tuned in attention._TUNED:  # these made-up choices must not reach Triton's cache for a GPU run to read
        tuned.tuner.cache_results = False

    q = torch.randn(16, 8, 256, 64, dtype=torch.bfloat16)
    do = torch.randn_like(q)
    o, lse = attention._attention_forward(q, q, q, 0.125, None)
    x, w, b = torch.randn(16, 256, N, dtype=torch.bfloat16), torch.ones(N), torch.zeros(N)
    cache = torch.randn(1, 8, 1024, 64, dtype=torch.bfloat16)
    calls = dict(zip(DISPATCHED, [
        lambda: kernels.layer_norm(x, w, b),
        lambda: kernels.causal_attention(q, q, q),
        lambda: attention._attention_backward(do, q, q, q, o, lse, 0.125, None),
        lambda: kernels.decode_attention(q[:1, :, :1], cache, cache, torch.tensor([100])),
    ]))

    def timed(fn):
        def call():
            fn()
            recording.launches.clear()  # the recorded arguments (outputs among them) are not kept
        return per_call_us(call)

    result = {name: [float("inf"), float("inf"), None] for name in calls}
    for _ in range(2):  # alternated, best of both: the shared machine's noise hits both ways alike
        for name, fn in calls.items():
            result[name][0] = min(result[name][0], timed(fn))
            with launch.through_jit():
                result[name][1] = min(result[name][1], timed(fn))
    with launch.through_jit():
        tuned_launch = attention._Tuned.launch
        attention._Tuned.launch = lambda self, grid, key, *args, **kw: self.tuner[grid](*args, **kw)
        try:
            for name in DISPATCHED[1:3]:
                result[name][2] = timed(calls[name])
        finally:
            attention._Tuned.launch = tuned_launch
    return result


@pytest.fixture(scope="module")
def dispatched():
    """``dispatched_us()`` from a child process (the JIT, not the interpreter, loaded), and its wall time."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json; from bench.test_bench_host import autotune_files, dispatched_us; before = autotune_files(); "
            "figures = dispatched_us(); figures['autotune files written'] = sorted(autotune_files() - before); "
            "print(json.dumps(figures))")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1]), time.perf_counter() - t0


@pytest.mark.parametrize("name", DISPATCHED)
def test_dispatched_host_us(benchmark, dispatched, name):
    """Host time a call with Triton's launch path included (the driver's launch itself left out):
    what a GPU's host spends on each call of ours. Ratios: every launch through the JIT's dispatch
    (and through the autotuner) over ours."""
    import triton

    figures, wall_s = dispatched
    # The stand-in driver reports a real target (sm_90): made-up timings on disk would be a GPU's choices.
    assert figures["autotune files written"] == []
    us, through_jit, through_autotuner = figures[name]
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the figure is the child's, in extra_info
    info = dict(host_us=round(us, 2), triton=triton.__version__, what=name, child_wall_s=round(wall_s, 1),
                jit_dispatch_every_launch_us=round(through_jit, 2),
                speedup_vs_jit_dispatch_every_launch=round(through_jit / us, 2))
    if through_autotuner is not None:
        info.update(autotuner_every_launch_us=round(through_autotuner, 2),
                    speedup_vs_autotuner_every_launch=round(through_autotuner / us, 2))
    record(benchmark, **info)
