"""The fused LM head + cross-entropy (kernels.linear_cross_entropy) against the unfused head, on a GPU.

Forward + backward of the tied head and the mean cross-entropy with next-token accuracy, bf16 h
and weight, V = 50,257, at (N = 8,192, C = 512) -- the seed model at batch 32 -- and (N = 32,768,
C = 768) -- GPT-2 small at 32 x 1,024. Peers: ``gpt.ops.linear_cross_entropy_unfused`` (``F.linear``
to bf16 logits, ``F.cross_entropy`` on their fp32 upcast, ``argmax`` for accuracy: what the model
did before), eager and ``torch.compile``'d. Each is timed with CUDA events over back-to-back calls
(``cuda_time_ms``) and its peak memory above the inputs is read from ``torch.cuda.max_memory_allocated``
over one forward + backward (the gradients of h and the weight included, for every implementation).

FLOPs: 6 N V C (logits, dh, dW: three GEMMs), credited to every implementation, so TFLOP/s ratios
are time ratios; the fused op does no more. Its memory traffic beyond the GEMMs' operands is ~5
passes over a chunk of bf16 logits (GEMM write, row kernel 2 reads + 1 write, two gradient-GEMM
reads) against ~15 for the eager path; see kernels/cross_entropy.py.

``test_row_kernel`` times the row kernel alone on one chunk of the seed's step (5,336 x 50,304 bf16
logits, 512 MiB: larger than L2) for a few tile / warp choices, against a device copy of the same
chunk: the kernel's least traffic is a copy's (one read, one write), its second read of each row is
what L2 saves or not (``ratio_vs_copy`` 1.0: as fast as that copy). Run 3's ncu had the previous
kernel at 254 us per 2,668-row chunk (3.2 TB/s of its 3 passes, L2 hit rate 51%, register-bound
at 24 warps per SM).

Goal (unmeasured: no GPU was lent to the session that wrote this): time no worse than eager
(``ratio_vs_eager >= 1``), and at least 4x less peak memory for the head (``memory_ratio_vs_eager >= 4``).

    python -m pytest bench/test_bench_cross_entropy.py
"""

from __future__ import annotations

import functools

import pytest
import torch

import kernels
import kernels.cross_entropy as kce
from bench.common import cuda_time_ms, kernel_times_ms, make_pass, record, requires_cuda, synced, top_kernels
from gpt.ops import linear_cross_entropy_unfused

pytestmark = requires_cuda

DEVICE = "cuda"
DTYPE = torch.bfloat16
V = 50257
SHAPES = [(8192, 512), (32768, 768)]


def fused(h, weight, targets):
    return kernels.linear_cross_entropy(h, weight, targets)


@functools.lru_cache(maxsize=None)
def compiled_unfused():
    return torch.compile(linear_cross_entropy_unfused, dynamic=False)


def leaves(N, C):
    """bf16 h (N, C) and weight (V, C) requiring grad, int64 targets with ~1% ignored (-1)."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    h = torch.randn(N, C, device=DEVICE, generator=g).to(DTYPE).requires_grad_()
    weight = (0.02 * torch.randn(V, C, device=DEVICE, generator=g)).to(DTYPE).requires_grad_()
    targets = torch.randint(0, V, (N,), device=DEVICE, generator=g)
    targets[torch.rand(N, device=DEVICE, generator=g) < 0.01] = -1
    return h, weight, targets


def peak_bytes(run) -> int:
    """Peak allocated bytes above what is allocated before one call of ``run`` (grads cleared first)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def check_against_unfused(h, weight, targets):
    """Loss, accuracy and both gradients of the fused op against the eager unfused head (bf16 tolerance)."""
    outs = {}
    for name, fn in (("fused", fused), ("eager", linear_cross_entropy_unfused)):
        h.grad = weight.grad = None
        loss, correct, count = fn(h, weight, targets)
        loss.backward()
        outs[name] = (loss.detach().float(), correct.item(), count.item(), h.grad.float(), weight.grad.float())
    (loss, correct, count, dh, dw), (e_loss, e_correct, e_count, e_dh, e_dw) = outs["fused"], outs["eager"]
    h.grad = weight.grad = None
    assert count == e_count
    assert abs(correct - e_correct) <= max(2, 1e-3 * count)  # bf16 near-ties may round either way
    torch.testing.assert_close(loss, e_loss, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dh, e_dh, atol=2e-2 * e_dh.abs().max().item(), rtol=2e-2)
    torch.testing.assert_close(dw, e_dw, atol=2e-2 * e_dw.abs().max().item(), rtol=2e-2)


@pytest.mark.benchmark(group="kernels")
@pytest.mark.parametrize("N,C", SHAPES, ids=[f"N{n}-C{c}" for n, c in SHAPES])
def test_linear_cross_entropy(benchmark, N, C):
    h, weight, targets = leaves(N, C)
    check_against_unfused(h, weight, targets)
    inputs, grads = [h, weight], [torch.ones((), device=DEVICE)]
    impls = {"fused": fused, "eager": linear_cross_entropy_unfused, "compiled": compiled_unfused()}
    passes = {name: make_pass(lambda h, w, fn=fn: fn(h, w, targets)[0], inputs, grads, "fwd+bwd")
              for name, fn in impls.items()}
    ms = {name: cuda_time_ms(p, warmup=3, iters=10) for name, p in passes.items()}
    kernels_fused = kernel_times_ms(passes["fused"], warmup=1, iters=3)  # where our time goes
    peak = {name: peak_bytes(p) for name, p in passes.items()}
    h.grad = weight.grad = None
    tflops = {name: 6 * N * V * C / (t * 1e-3) / 1e12 for name, t in ms.items()}
    benchmark.pedantic(synced(passes["fused"]), rounds=5, warmup_rounds=1)
    record(
        benchmark,
        tflops=round(tflops["fused"], 1),
        ms=round(ms["fused"], 3),
        peer="F.linear + F.cross_entropy(fp32 upcast) + argmax (eager; torch.compile)",
        ratio_vs_eager=round(ms["eager"] / ms["fused"], 3),
        ratio_vs_compiled=round(ms["compiled"] / ms["fused"], 3),
        eager_tflops=round(tflops["eager"], 1),
        compiled_tflops=round(tflops["compiled"], 1),
        peak_mib=round(peak["fused"] / 2**20, 1),
        eager_peak_mib=round(peak["eager"] / 2**20, 1),
        compiled_peak_mib=round(peak["compiled"] / 2**20, 1),
        memory_ratio_vs_eager=round(peak["eager"] / peak["fused"], 2),
        memory_ratio_vs_compiled=round(peak["compiled"] / peak["fused"], 2),
        bf16_logits_mib=round(N * V * 2 / 2**20, 1),
        kernel_ms=round(sum(kernels_fused.values()), 3),  # launch overhead excluded
        top_kernels=top_kernels(kernels_fused),
    )


# (BLOCK_V, num_warps, programs per SM: None = one program per row), the launcher's default first.
# One program per row keeps ~300-800 rows of 100 KB in flight (48 warps per SM at 8 a row), more than
# L2 holds between a row's two passes; a persistent grid of one 32-warp program per SM keeps 132, so
# pass 2 reads from L2. (Fewer warps a persistent program take 114-124 registers on sm_80/sm_90: the
# row loop's cost, measured with the compile check's stand-in driver; 32 warps cap them at 54-64.)
ROW_CONFIGS = [(*kce._block_and_warps(V, 8), None), (2048, 4, None), (8192, 16, None), (16384, 32, 1), (8192, 32, 1)]


@pytest.mark.benchmark(group="kernels")
@pytest.mark.parametrize("block,warps,per_sm", ROW_CONFIGS,
                         ids=[f"B{b}-w{w}" + (f"-{p}perSM" if p else "") for b, w, p in ROW_CONFIGS])
def test_row_kernel(benchmark, block, warps, per_sm):
    Vp = -(-V // kce.VOCAB_MULTIPLE) * kce.VOCAB_MULTIPLE
    M = kce._chunk_rows(Vp)  # the chunk loop's rows
    programs = None if per_sm is None else per_sm * torch.cuda.get_device_properties(DEVICE).multi_processor_count
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logits = (4 * torch.randn(M, Vp, device=DEVICE, generator=g)).to(DTYPE)
    targets = torch.randint(0, V, (M,), device=DEVICE, generator=g)
    loss = torch.empty(M, device=DEVICE)
    hit = torch.empty(M, device=DEVICE, dtype=torch.int32)
    expected = torch.logsumexp(logits[:, :V].float(), -1) - logits[torch.arange(M, device=DEVICE), targets].float()
    expected_grad_row = torch.softmax(logits[7, :V].float(), -1)
    expected_grad_row[targets[7]] -= 1
    run = lambda: kce._ce_rows(logits, V, targets, loss, hit, -1, True, block, warps, programs)  # noqa: E731
    run()  # overwrites the logits with the gradient
    torch.testing.assert_close(loss, expected, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(logits[7, :V].float(), expected_grad_row, atol=2e-3, rtol=1e-2)
    # Later calls run on the gradient as if it were logits: the same work (no data-dependent branch).
    copy_src = torch.empty_like(logits)
    ms = cuda_time_ms(run, warmup=3, iters=20)
    copy_ms = cuda_time_ms(lambda: copy_src.copy_(logits), warmup=3, iters=20)
    benchmark.pedantic(synced(run), rounds=5, warmup_rounds=1)
    nbytes = M * V * logits.element_size()
    record(
        benchmark,
        ms=round(ms, 4),
        gbs=round(3 * nbytes / (ms * 1e-3) / 1e9, 1),  # its 3 passes (2 reads, 1 write) per element
        peer="a device copy of the chunk (one read + one write)",
        copy_ms=round(copy_ms, 4),
        ratio_vs_copy=round(copy_ms / ms, 3),
        chunk_rows=M,
        programs=programs or M,
    )
