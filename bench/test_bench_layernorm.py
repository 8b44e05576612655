"""Fused Triton LayerNorm (and residual add + LayerNorm) vs F.layer_norm, eager and torch.compile'd;
the MLP's bias + GELU (``test_bias_gelu``) vs F.gelu likewise.

bf16 activations, fp32 weights (as under autocast), rows 4k-64k, N = 512 (the seed model's width)
and 768 / 1024 / 4096. Each pass -- fwd, bwd, fwd+bwd -- is timed with CUDA events over 20
back-to-back calls (``cuda_time_ms``); those times and GB/s are in ``extra_info``, with ratios
against the peers measured in the same test. pytest-benchmark's own table times single calls
including a synchronize, so at these sizes it mostly shows launch latency.

Bytes are counted as in Triton's LayerNorm tutorial, per element of the (rows, N) activations:
forward 2 x size (read x, write y), backward 3 x size (read x and dy, write dx), fwd+bwd 5 x size;
the fused add moves 4 x size forward (x, residual in; y, x + residual out) and 4 x size backward
(x + residual, dy, d(x + residual) in; one shared grad out). Peers are credited with the same
bytes, so GB/s ratios are time ratios. At about 8 FLOP per element forward and 12 backward, i.e.
2-3 FLOP/byte in bf16, all of this is memory-bound (an H100's ridge point is ~300 FLOP/byte).

``kernel_ms_one_row_tiles`` times the kernels with the forward's tiles of up to run 3 (one row a
program), against the multi-row tiles of ``kernels.layernorm._tile`` that replaced them.

Goal (issue 12): fwd+bwd at >= 85% of ``measured_copy_gbs()`` on tensors larger than L2 and
>= 1.5x eager F.layer_norm at 16,384 x 512; results in bench/results/*-NVIDIA-*/.
"""

from __future__ import annotations

import functools
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import kernels
from bench.common import (as_tuple, cuda_time_ms, device_time_ms, make_pass, measured_copy_gbs, record,
                          requires_cuda, synced)

pytestmark = requires_cuda

DEVICE = "cuda"
EPS = 1e-5
DTYPE = torch.bfloat16
LN_SHAPES = [(4096, 512), (16384, 512), (65536, 512), (65536, 768), (16384, 768), (16384, 1024), (16384, 4096)]
ADD_SHAPES = [(16384, 512), (65536, 512)]
PASSES = ("fwd", "bwd", "fwd+bwd")
LN_BYTES = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}  # x element size, per activation element
ADD_BYTES = {"fwd": 4, "bwd": 4, "fwd+bwd": 8}


def ln_torch(x, weight, bias):
    # CUDA's F.layer_norm wants one dtype: the fp32 weights cast to the activations' (a negligible
    # (N,) cast, differentiable), so the peer reads and writes bf16 activations as ours does.
    return F.layer_norm(x, x.shape[-1:], weight.to(x.dtype), bias.to(x.dtype), EPS)


def add_ln_torch(x, residual, weight, bias):
    s = x + residual
    return F.layer_norm(s, s.shape[-1:], weight.to(s.dtype), bias.to(s.dtype), EPS), s


def add_ln_reference(x, residual, weight, bias):
    """The check's fp32 reference: fp32 math on the sum rounded to the activations' dtype, as the
    kernel and torch's bf16 ``x + residual`` store it. (Unrounded, the bf16 rounding of the sum moves
    dweight by ~1e-3 of its largest entry over 16k rows: seen on an H200, and by 1.8e-4 in fp16 at
    2k rows under the interpreter, against 3.5e-7 with this rounding.)"""
    s = (x + residual).to(DTYPE).to(x.dtype)
    return F.layer_norm(s, s.shape[-1:], weight, bias, EPS), s


def add_ln_autocast_torch(x, residual, weight, bias):
    """The model's add + LayerNorm under autocast, eagerly: a bf16 branch output added to the fp32
    residual stream, F.layer_norm in fp32, and its output cast to bf16 by the Linear that reads it."""
    s = x + residual
    return F.layer_norm(s, s.shape[-1:], weight, bias, EPS).to(DTYPE), s


def add_ln_autocast_triton(x, residual, weight, bias):
    return kernels.add_layer_norm(x, residual, weight, bias, EPS, out_dtype=DTYPE)


def ln_triton(x, weight, bias):
    return kernels.layer_norm(x, weight, bias, EPS)


def add_ln_triton(x, residual, weight, bias):
    return kernels.add_layer_norm(x, residual, weight, bias, EPS)


def one_row_tiles(N: int) -> tuple[int, int, int]:
    """``kernels.layernorm._tile`` as it was up to run 3: the forward one row a program, with 8-16
    values a thread. Timed beside the multi-row tiles that replaced it, to keep the faster."""
    block, warps = kernels.layernorm._block_and_warps(N)
    return block, 1, warps


@functools.lru_cache(maxsize=None)
def compiled(fn):
    return torch.compile(fn, dynamic=False)


def leaves(rows, N, n_acts):
    """n_acts bf16 (rows, N) activations and fp32 weight, bias, all leaves requiring grad."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    acts = [torch.randn(rows, N, device=DEVICE, generator=g).to(DTYPE).requires_grad_() for _ in range(n_acts)]
    weight = (1 + 0.1 * torch.randn(N, device=DEVICE, generator=g)).requires_grad_()
    bias = (0.1 * torch.randn(N, device=DEVICE, generator=g)).requires_grad_()
    return [*acts, weight, bias]


def check_against_reference(ours, ref, inputs, grads):
    """Outputs and all input grads of ours vs ref run in fp32 on the same bf16 values (bf16 tolerance)."""
    ref_inputs = [t.detach().float().requires_grad_() for t in inputs]
    outs, ref_outs = as_tuple(ours(*inputs)), as_tuple(ref(*ref_inputs))
    torch.autograd.backward(outs, grads)
    torch.autograd.backward(ref_outs, [g.float() for g in grads])
    for a, b in zip(outs, ref_outs):
        torch.testing.assert_close(a.float(), b, atol=3e-2, rtol=2e-2)
    for t, r in zip(inputs, ref_inputs):
        # weight / bias grads are sums over all rows: compare relative to their largest entry.
        tol = 2e-2 if t.dtype == DTYPE else 1e-4  # bf16 activation grads; fp32-accumulated weight / bias grads
        torch.testing.assert_close(t.grad.float(), r.grad, atol=tol * r.grad.abs().max().item(), rtol=tol)
        t.grad = None


def run_case(benchmark, ours, ref, inputs, n_outs, which, act_bytes, peer, check_ref=None, grad_dtypes=None,
             layer_norm=True):
    """Check ours against ``check_ref`` (default: the peer ``ref``) in fp32, then time ours and the peers.
    ``grad_dtypes``: the upstream gradients' dtypes, one per output (default: the activations').
    ``layer_norm``: ours is a LayerNorm, also timed with the forward's tiles of up to run 3."""
    rows, N = inputs[0].shape
    grads = [torch.randn(rows, N, device=DEVICE, dtype=dt) for dt in grad_dtypes or [DTYPE] * n_outs]
    check_against_reference(ours, check_ref or ref, inputs, grads)
    nbytes = act_bytes * rows * N * inputs[0].element_size()
    ms = {name: cuda_time_ms(make_pass(fn, inputs, grads, which))
          for name, fn in (("triton", ours), ("eager", ref), ("compiled", compiled(ref)))}
    gbs = {name: nbytes / (t * 1e-3) / 1e9 for name, t in ms.items()}
    kernel_ms = {name: device_time_ms(make_pass(fn, inputs, grads, which))
                 for name, fn in (("triton", ours), ("eager", ref))}
    if layer_norm:
        with mock.patch.object(kernels.layernorm, "_tile", one_row_tiles):  # the kernels' tiles before run 4
            kernel_ms["one_row"] = device_time_ms(make_pass(ours, inputs, grads, which))
    benchmark.pedantic(synced(make_pass(ours, inputs, grads, which)), rounds=20, warmup_rounds=3)
    record(
        benchmark,
        gbs=round(gbs["triton"], 1),
        ms=round(ms["triton"], 4),
        pct_copy_gbs=round(100 * gbs["triton"] / measured_copy_gbs(), 1),
        peer=peer,
        ratio_vs_eager=round(ms["eager"] / ms["triton"], 3),
        ratio_vs_compiled=round(ms["compiled"] / ms["triton"], 3),
        eager_gbs=round(gbs["eager"], 1),
        # The kernels alone (launch overhead excluded): what a CUDA graph or a faster host would see.
        kernel_ms=round(kernel_ms["triton"], 4),
        kernel_pct_copy_gbs=round(100 * nbytes / (kernel_ms["triton"] * 1e-3) / 1e9 / measured_copy_gbs(), 1),
        kernel_ratio_vs_eager=round(kernel_ms["eager"] / kernel_ms["triton"], 3),
        **({"kernel_ms_one_row_tiles": round(kernel_ms["one_row"], 4),
            "kernel_ratio_vs_one_row_tiles": round(kernel_ms["one_row"] / kernel_ms["triton"], 3)} if layer_norm else {}),
        compiled_gbs=round(gbs["compiled"], 1),
        bytes=nbytes,
    )


@pytest.mark.benchmark(group="kernels")
@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("rows,N", LN_SHAPES, ids=[f"{r}x{n}" for r, n in LN_SHAPES])
def test_layer_norm(benchmark, rows, N, which):
    # bytes: LN_BYTES[which] x rows x N x 2; FLOPs ~8 (fwd) / ~12 (bwd) per element: ~2-3 FLOP/byte.
    run_case(benchmark, ln_triton, ln_torch, leaves(rows, N, 1), 1, which, LN_BYTES[which],
             "F.layer_norm (eager; torch.compile)")


@pytest.mark.benchmark(group="kernels")
@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("rows,N", ADD_SHAPES, ids=[f"{r}x{n}" for r, n in ADD_SHAPES])
def test_add_layer_norm(benchmark, rows, N, which):
    # bytes: ADD_BYTES[which] x rows x N x 2; FLOPs ~9 (fwd) / ~13 (bwd) per element: ~1.5-2 FLOP/byte.
    run_case(benchmark, add_ln_triton, add_ln_torch, leaves(rows, N, 2), 2, which, ADD_BYTES[which],
             "x + residual, then F.layer_norm (eager; torch.compile)", check_ref=add_ln_reference)


# In units of 2 bytes per (rows, N) element: forward reads the bf16 branch (2) and the fp32 residual
# (4) and writes the fp32 sum (4) and the bf16 LayerNorm (2); backward reads the sum (4), dy (2) and
# d(sum) (4) and writes d(sum) (4) (the branch's bf16 copy of it is the peers' too).
AUTOCAST_BYTES = {"fwd": 6, "bwd": 7, "fwd+bwd": 13}


@pytest.mark.benchmark(group="kernels")
@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("rows,N", ADD_SHAPES, ids=[f"{r}x{n}" for r, n in ADD_SHAPES])
def test_add_layer_norm_autocast(benchmark, rows, N, which):
    """As the model calls it under bf16 autocast (``out_dtype``): bf16 branch + fp32 residual, the
    LayerNorm written in bf16 for the next Linear; the peer adds, normalizes in fp32 and casts."""
    x, residual, weight, bias = leaves(rows, N, 2)
    residual = residual.detach().float().requires_grad_()
    run_case(benchmark, add_ln_autocast_triton, add_ln_autocast_torch, [x, residual, weight, bias], 2, which,
             AUTOCAST_BYTES[which], "x + residual (fp32), F.layer_norm, .to(bf16) (eager; torch.compile)",
             check_ref=add_ln_torch, grad_dtypes=[DTYPE, torch.float32])  # (all fp32 in the check)


P_DROP = 0.1  # the seed model's dropout


def add_ln_dropout_torch(x, residual, weight, bias):
    """The model's branch dropout, add and LayerNorm under autocast, eagerly: F.dropout on the bf16
    branch (writing its mask), the fp32 add, F.layer_norm, the cast for the next Linear."""
    s = F.dropout(x, P_DROP) + residual
    return F.layer_norm(s, s.shape[-1:], weight, bias, EPS).to(DTYPE), s


def add_ln_dropout_triton(x, residual, weight, bias):
    return kernels.add_layer_norm(x, residual, weight, bias, EPS, out_dtype=DTYPE, dropout_p=P_DROP)


@pytest.mark.benchmark(group="kernels")
@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("rows,N", ADD_SHAPES, ids=[f"{r}x{n}" for r, n in ADD_SHAPES])
def test_add_layer_norm_dropout(benchmark, rows, N, which):
    """As the model trains under bf16 autocast: dropout(bf16 branch) + fp32 residual, the LayerNorm
    in bf16; ours draws the mask in the kernel (and again in the backward: no mask in memory), the
    peer runs F.dropout first. The masks differ (different streams), so the check is on the mask:
    the branch's gradient is zero on about P_DROP of the elements, and 1 / (1 - P_DROP) times the
    residual's elsewhere. Bytes as ``test_add_layer_norm_autocast`` (the peer moves more: its
    dropout's pass and mask)."""
    x, residual, weight, bias = leaves(rows, N, 2)
    residual = residual.detach().float().requires_grad_()
    inputs = [x, residual, weight, bias]
    grads = [torch.randn(rows, N, device=DEVICE, dtype=dt) for dt in (DTYPE, torch.float32)]
    torch.autograd.backward(add_ln_dropout_triton(*inputs), grads)
    dropped = x.grad == 0
    assert abs(dropped.float().mean().item() - P_DROP) < 0.01
    torch.testing.assert_close(x.grad[~dropped].float(), (residual.grad[~dropped] / (1 - P_DROP)),
                               atol=2e-2, rtol=2e-2)  # bf16 rounding of the branch's gradient
    for t in inputs:
        t.grad = None
    nbytes = AUTOCAST_BYTES[which] * rows * N * 2
    ms = {name: cuda_time_ms(make_pass(fn, inputs, grads, which))
          for name, fn in (("triton", add_ln_dropout_triton), ("eager", add_ln_dropout_torch),
                           ("compiled", compiled(add_ln_dropout_torch)))}
    kernel_ms = {name: device_time_ms(make_pass(fn, inputs, grads, which))
                 for name, fn in (("triton", add_ln_dropout_triton), ("eager", add_ln_dropout_torch))}
    benchmark.pedantic(synced(make_pass(add_ln_dropout_triton, inputs, grads, which)), rounds=20, warmup_rounds=3)
    record(benchmark, gbs=round(nbytes / (ms["triton"] * 1e-3) / 1e9, 1), ms=round(ms["triton"], 4),
           pct_copy_gbs=round(100 * nbytes / (ms["triton"] * 1e-3) / 1e9 / measured_copy_gbs(), 1),
           peer="F.dropout, x + residual (fp32), F.layer_norm, .to(bf16) (eager; torch.compile)",
           ratio_vs_eager=round(ms["eager"] / ms["triton"], 3), ratio_vs_compiled=round(ms["compiled"] / ms["triton"], 3),
           kernel_ms=round(kernel_ms["triton"], 4), kernel_ratio_vs_eager=round(kernel_ms["eager"] / kernel_ms["triton"], 3),
           bytes=nbytes)


GELU_SHAPES = [(16384, 2048), (65536, 2048)]  # the seed model's MLP at batch 64 and 256 x 256 tokens
GELU_BYTES = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}  # x element size per (rows, N) element: u in, g out; dg, u in, du out


def bias_gelu_torch(u, bias):
    return F.gelu(u + bias.to(u.dtype), approximate="tanh")


@pytest.mark.benchmark(group="kernels")
@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("rows,N", GELU_SHAPES, ids=[f"{r}x{n}" for r, n in GELU_SHAPES])
def test_bias_gelu(benchmark, rows, N, which):
    """The MLP's bias + tanh-GELU (bf16, fp32 bias), its bias gradient made in the backward's pass,
    against eager and compiled ``F.gelu(u + b)`` (whose backward sums u's gradient over the rows
    for the bias in a pass of its own). In the model the eager peer's bias add is the Linear's
    epilogue, so the forward ratio flatters us; the backward's is the model's."""
    u, _, bias = leaves(rows, N, 1)
    run_case(benchmark, kernels.bias_gelu, bias_gelu_torch, [u, bias], 1, which, GELU_BYTES[which],
             "F.gelu(u + b, approximate='tanh') (eager; torch.compile)", layer_norm=False)
