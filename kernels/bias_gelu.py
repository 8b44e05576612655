"""The MLP's bias add and tanh-GELU, forward and backward, with the bias gradient made in the backward's pass.

GPT-2's MLP is ``c_proj(gelu(c_fc(x)))``. Eagerly, the backward of ``gelu(x @ W.T + b)`` reads the
GELU's input and the upstream gradient and writes the input's gradient (one elementwise kernel),
then reads that gradient again to sum it over the rows for the bias (a reduction). Here the first
Linear runs without its bias and ``bias_gelu(u, b) = gelu(u + b)`` is one pass each way: the
forward reads u once and writes the GELU once (the bias added in fp32 on the way), and the
backward reads the upstream gradient and u once, writes u's gradient once, and sums it over its
rows in fp32 per program as it goes (the bias gradient: those partial sums, summed once by
``torch.sum``, no atomics, reproducible run to run). One read of the (M, N) gradient fewer a
layer and step: at the seed model's 2,048-wide MLP, a third of the GELU backward's traffic.

gelu(z) = 0.5 z (1 + tanh(k (z + 0.044715 z^3))), k = sqrt(2 / pi), torch's ``approximate="tanh"``;
tanh(a) is computed as sign(a) (1 - exp(-2 |a|)) / (1 + exp(-2 |a|)) in fp32.

Layering as ``kernels.layernorm``: ``@triton.jit`` kernels, launchers (validation, tiles), an
``autograd.Function``, the public ``bias_gelu``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import attention
from .host import cdiv
from .launch import Direct
from .layernorm import _num_sms, _rows

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_N = 256  # columns a program covers: 16-byte loads of bf16 over 4 warps, 8 rows a tile
ROWS = 8  # rows a tile: (8, 256) values, 16 a thread


@triton.jit
def _gelu_parts(z):
    """tanh-GELU of z (fp32) and its derivative."""
    k: tl.constexpr = 0.7978845608028654  # sqrt(2 / pi)
    inner = k * (z + 0.044715 * z * z * z)
    e = tl.exp(-2.0 * tl.abs(inner))  # in (0, 1]: no overflow
    t = tl.where(inner >= 0, 1.0, -1.0) * (1.0 - e) / (1.0 + e)  # tanh(inner)
    gelu = 0.5 * z * (1.0 + t)
    slope = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * z * z)
    return gelu, slope


@triton.jit
def _bias_gelu_fwd_kernel(
    U,  # pointer to the first Linear's output without its bias (M, N), row stride stride_u, unit column stride
    B,  # pointer to the bias (N,)
    G,  # pointer to the output gelu(u + b) (M, N), contiguous
    stride_u,
    M,
    N,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program (i, j): rows [i * ROWS, ...) and columns [j * BLOCK_N, ...)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g, _ = _gelu_parts(u + b[None, :])
    tl.store(G + rows[:, None] * N + cols[None, :], g.to(G.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    DG,  # pointer to the upstream gradient (M, N), row stride stride_dg, unit column stride
    U,  # pointer to the forward's u (M, N), row stride stride_u, unit column stride
    B,  # pointer to the bias (N,)
    DU,  # pointer to u's gradient (M, N), contiguous, in u's dtype
    DBP,  # pointer to the per-program partial bias gradients (P, N), fp32
    stride_dg,
    stride_u,
    M,
    N,
    rows_per_program,  # a multiple of ROWS
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program (p, j): rows [p * rows_per_program, ...) of columns [j * BLOCK_N, ...), ROWS at a time:
    du = dg * gelu'(u + b), and du summed over the rows in fp32 into DBP[p, columns]."""
    p = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)  # summed over its rows once, after the loop
    start = p.to(tl.int64) * rows_per_program
    for first in range(start, tl.minimum(start + rows_per_program, M), ROWS):
        rows = first + tl.arange(0, ROWS)
        mask = (rows < M)[:, None] & col_ok[None, :]
        u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dg = tl.load(DG + rows[:, None] * stride_dg + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        _, slope = _gelu_parts(u + b[None, :])
        du = dg * slope  # 0 where masked: dg loaded as 0
        tl.store(DU + rows[:, None] * N + cols[None, :], du.to(DU.dtype.element_ty), mask=mask)
        acc += du
    tl.store(DBP + p * N + cols, tl.sum(acc, axis=0), mask=col_ok)


_bias_gelu_fwd = Direct(_bias_gelu_fwd_kernel)
_bias_gelu_bwd = Direct(_bias_gelu_bwd_kernel)


def _check(u: torch.Tensor, bias: torch.Tensor) -> None:
    if u.dim() == 0 or u.dtype not in _DTYPES or bias.dtype not in _DTYPES:
        raise ValueError(f"bias_gelu: u must have at least 1 dim and float dtypes (float32, float16, bfloat16), "
                         f"got u {u.dtype} {tuple(u.shape)}, bias {bias.dtype}")
    if bias.shape != u.shape[-1:]:
        raise ValueError(f"bias_gelu: bias must have shape ({u.shape[-1]},) to match u's last dim, got {tuple(bias.shape)}")
    if bias.device != u.device:
        raise ValueError(f"bias_gelu: bias is on {bias.device} but u is on {u.device}")
    if not attention._launchable(u.device):
        raise ValueError(f"bias_gelu: tensors on {u.device} need CUDA (or CPU with TRITON_INTERPRET=1)")


def _forward(u: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    N = u.shape[-1]
    M = u.numel() // N if N else 0
    g = torch.empty_like(u, memory_format=torch.contiguous_format)
    if M and N:
        u2, stride_u = _rows(u)
        _bias_gelu_fwd[(cdiv(M, ROWS), cdiv(N, BLOCK_N))](u2, bias.contiguous(), g, stride_u, M, N,
                                                          ROWS=ROWS, BLOCK_N=BLOCK_N, num_warps=4)
    return g


def _backward(dg: torch.Tensor, u: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u's gradient in u's dtype, the bias gradient (N,) fp32)."""
    N = u.shape[-1]
    M = u.numel() // N if N else 0
    du = torch.empty_like(u, memory_format=torch.contiguous_format)
    if not (M and N):
        return du, torch.zeros(N, dtype=torch.float32, device=u.device)
    col_blocks = cdiv(N, BLOCK_N)
    # At 72 registers on sm_90 (the compile table) 7 programs of 4 warps share an SM: about four
    # waves of them, so that a last partial wave costs little, each over at least 8 tiles of rows, so
    # that the (P, N) fp32 partials stay small next to the activations.
    programs = cdiv(_num_sms(u.device.index) * 28 if u.is_cuda else 4, col_blocks)
    rows_per_program = max(cdiv(cdiv(M, programs), ROWS), min(cdiv(M, ROWS), 8)) * ROWS
    programs = cdiv(M, rows_per_program)
    partials = torch.empty((programs, N), dtype=torch.float32, device=u.device)
    dg2, stride_dg = _rows(dg)
    u2, stride_u = _rows(u)
    _bias_gelu_bwd[(programs, col_blocks)](dg2, u2, bias.contiguous(), du, partials, stride_dg, stride_u, M, N,
                                           rows_per_program, ROWS=ROWS, BLOCK_N=BLOCK_N, num_warps=4)
    return du, partials.sum(0)


class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, bias):
        ctx.save_for_backward(u, bias)
        return _forward(u, bias)

    @staticmethod
    def backward(ctx, dg):
        u, bias = ctx.saved_tensors
        du, db = _backward(dg, u, bias)
        return du, db.to(bias.dtype)


def bias_gelu(u: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.gelu(u + bias, approximate="tanh")`` in u's dtype (the sum and the GELU in fp32), in one pass;
    differentiable in u and bias, whose gradient the backward sums in the same pass as u's."""
    _check(u, bias)
    if torch.compiler.is_compiling():  # traced as the plain ops (inductor fuses them itself)
        return torch.nn.functional.gelu(u + bias.to(u.dtype), approximate="tanh")
    if torch.is_grad_enabled() and (u.requires_grad or bias.requires_grad):
        return BiasGeluFunction.apply(u, bias)
    return _forward(u, bias)
