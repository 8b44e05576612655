"""Fused LayerNorm, and the pre-LN block's residual add fused with the next LayerNorm, forward and backward.

Each direction is one pass over the activations: the forward reads x (and the residual) once and
writes y (and x + residual) once; the backward reads x and dy (and d(x + residual)) once and writes
dx once. Statistics are fp32 whatever the input dtype; mean and 1/std are saved for the backward.
y may be written in another dtype than x (``out_dtype``: under autocast, the bf16 its next Linear
reads), and its gradient then arrives in that dtype.
dweight and dbias are accumulated per program in fp32 over a fixed block of rows and the partials
summed by one ``torch.sum`` -- no atomics, so they are bitwise reproducible run to run.

Layering: ``@triton.jit`` kernels; launchers that validate input and pick BLOCK_N / num_warps;
``torch.library`` custom ops (``tinygpt::layer_norm_fwd`` ...) with fake implementations so that
``torch.compile`` traces through them; ``autograd.Function``s; the public ``layer_norm`` and
``add_layer_norm``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from . import attention
from .host import cdiv, dropout_seed, next_power_of_2
from .launch import Direct

MAX_N = 8192  # the whole row lives in registers: 8192 fp32 values over 16 warps is 16 per thread
MAX_DX2_BLOCK = 4096  # the widest row whose backward writes its gradient in two dtypes without spilling
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dropout_keep(Seed, rows, N, p, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Whether dropout keeps each element of ``rows`` (ROWS,) x BLOCK_N columns in a call: one Philox
    draw of the call's seed per 4 columns of a row (``tl.rand4x``: 4 uniform values a draw, a quarter
    of ``tl.rand``'s integer work, which would outweigh these kernels' memory time), counter
    row * cdiv(N, 4) + column // 4 (32-bit: the stream repeats past 2^34 elements), kept with
    probability 1 - p. The backward draws the same mask again instead of reading a saved one."""
    groups = tl.arange(0, BLOCK_N // 4)
    counters = (rows[:, None] * ((N + 3) // 4) + groups[None, :]).to(tl.int32)  # (ROWS, BLOCK_N // 4)
    r0, r1, r2, r3 = tl.rand4x(tl.load(Seed), counters)
    u = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (ROWS, BLOCK_N))  # column 4 j + k: r_k[j]
    return u >= p


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # pointer to the input rows (M, N), row stride stride_x, unit column stride
    R,  # pointer to the residual rows (M, N), row stride stride_r; read only when HAS_RESIDUAL
    S,  # pointer to the output X + R (M, N), contiguous; written only when HAS_RESIDUAL
    Y,  # pointer to the normalized output (M, N), contiguous
    W,  # pointer to the weight (N,)
    B,  # pointer to the bias (N,)
    Stats,  # pointer to the per-row statistics (2, M), fp32: the mean, then 1 / sqrt(var + eps)
    Seed,  # pointer to the dropout's seed (1,), int64; read only when HAS_DROPOUT
    stride_x,
    stride_r,
    M,
    N,
    eps,
    p,  # the dropout's probability of zeroing an element of x (HAS_DROPOUT)
    HAS_RESIDUAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,  # x replaced by dropout(x) before the add (needs HAS_RESIDUAL)
    ROWS: tl.constexpr,  # rows per program: one (ROWS, BLOCK_N) tile
    BLOCK_N: tl.constexpr,
):
    """ROWS rows per program: y = (x - mean) * rstd * w + b, with x replaced by x + r when fused
    (by dropout(x) + r with HAS_DROPOUT). The weight and bias are read once for the tile's rows."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]  # (ROWS, BLOCK_N)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            x = tl.where(_dropout_keep(Seed, rows, N, p, ROWS, BLOCK_N), x * (1.0 / (1.0 - p)), 0.0)
        s = (x + r).to(S.dtype.element_ty)  # rounded like torch's x + r, and normalized as stored
        tl.store(S + rows[:, None] * N + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    mean = tl.sum(x, axis=1) / N  # (ROWS,)
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Stats + rows, mean, mask=row_ok)
    tl.store(Stats + M + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd_kernel(
    X,  # pointer to the forward's normalized input rows (M, N) (x + r when fused), row stride stride_x
    DY,  # pointer to the upstream grad of the normalized output (M, N), row stride stride_dy
    DS,  # pointer to the upstream grad of the sum output (M, N), row stride stride_ds; read only when HAS_DS
    DX,  # pointer to the grad wrt the normalized input (M, N), contiguous, in its own dtype
    DX2,  # pointer to the same grad in a second dtype (M, N), contiguous; written only when HAS_DX2
    W,  # pointer to the weight (N,)
    Stats,  # pointer to the per-row statistics saved by the forward (2, M), fp32: mean, 1 / sqrt(var + eps)
    DWB,  # pointer to this launch's per-program partial grads (2, P, N), fp32: weight's, then bias's
    Seed,  # pointer to the forward's dropout seed (1,), int64; read only when HAS_DROPOUT
    stride_x,
    stride_dy,
    stride_ds,
    M,
    N,
    rows_per_program,
    p,  # the forward's dropout probability (HAS_DROPOUT)
    HAS_DS: tl.constexpr,
    HAS_DX2: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,  # DX2 is the gradient of the dropped-out branch: dx * keep / (1 - p)
    BLOCK_N: tl.constexpr,
):
    """Program p handles rows [p * rows_per_program, ...) in order: dx per row (in one dtype, or two:
    add + LayerNorm's gradient for a bf16 branch and an fp32 residual; with HAS_DROPOUT the second
    through the forward's dropout mask, drawn again from its seed), dw / db summed in fp32.

    With xhat = (x - mean) * rstd and g = w * dy:
    dx = rstd * (g - xhat * mean(g * xhat) - mean(g)) (+ ds), dw = sum_rows dy * xhat, db = sum_rows dy.
    """
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Stats + row)
        rstd = tl.load(Stats + M + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        g = w * dy
        c1 = tl.sum(xhat * g, axis=0) / N
        c2 = tl.sum(g, axis=0) / N
        dx = (g - (xhat * c1 + c2)) * rstd
        if HAS_DS:
            dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DX2:
            dx2 = dx
            if HAS_DROPOUT:
                keep = tl.reshape(_dropout_keep(Seed, row + tl.arange(0, 1), N, p, 1, BLOCK_N), (BLOCK_N,))
                dx2 = tl.where(keep, dx * (1.0 / (1.0 - p)), 0.0)
            tl.store(DX2 + row * N + cols, dx2.to(DX2.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    tl.store(DWB + pid * N + cols, dw, mask=mask)
    tl.store(DWB + (tl.num_programs(0) + pid) * N + cols, db, mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers: validate, flatten to (M, N) rows, pick block sizes, launch.
# ----------------------------------------------------------------------------------------------

# Launched past the JIT's per-call dispatch after the first launch of each signature (kernels.launch).
_layer_norm_fwd = Direct(_layer_norm_fwd_kernel)
_layer_norm_bwd = Direct(_layer_norm_bwd_kernel)


@functools.lru_cache(maxsize=None)
def _block_and_warps(N: int) -> tuple[int, int]:
    """A power-of-two block covering the row, and enough warps for about 8-16 values per thread."""
    block = next_power_of_2(N)
    return block, min(max(block // 256, 1), 16)


@functools.lru_cache(maxsize=None)
def _tile(N: int) -> tuple[int, int, int]:
    """The forward's (BLOCK_N, ROWS, num_warps). Rows up to 1,024 wide go several to a program, as
    many as make 2,048 values (at most 64 rows) over 4 warps, so that the weight and bias are read
    once for them: one row a program read its fp32 weight and bias (4 KiB at N = 512, from L2) for
    every 1 KiB bf16 row it normalized. Wider rows go one to a program (``_block_and_warps``). The
    backward reads the weight once a program already, and goes a row at a time."""
    block, warps = _block_and_warps(N)
    if block <= 1024:
        return block, min(2048 // block, 64), 4
    return block, 1, warps


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """t as rows of its last dim with unit column stride, and the stride between rows: t itself when
    contiguous (no view made: a view costs a call ~1 us of host time), else a 2-D view when one
    exists, else a contiguous copy."""
    if t.is_contiguous():
        return t, t.shape[-1]
    t2 = t.reshape(-1, t.shape[-1])
    if t2.stride(-1) != 1 and t2.shape[-1] != 1:
        t2 = t2.contiguous()
    return t2, t2.stride(0)


def _check(name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
           residual: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> None:
    """Shapes, dtypes and devices of a call's tensors, then whether their device can run a kernel."""
    if out_dtype is not None and out_dtype not in _DTYPES:
        raise TypeError(f"{name}: out_dtype {out_dtype} not supported (float32, float16, bfloat16)")
    if x.dim() == 0:
        raise ValueError(f"{name}: input must have at least 1 dim, got a scalar")
    N = x.shape[-1]
    if not 1 <= N <= MAX_N:
        raise ValueError(f"{name}: normalized size {N} outside the supported range [1, {MAX_N}]")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name}: input dtype {x.dtype} not supported (float32, float16, bfloat16)")
    for pname, p in (("weight", weight), ("bias", bias)):
        if p.shape != (N,):
            raise ValueError(f"{name}: {pname} must have shape ({N},) to match the input's last dim, "
                             f"got {tuple(p.shape)}")
        if p.dtype not in _DTYPES:
            raise TypeError(f"{name}: {pname} dtype {p.dtype} not supported (float32, float16, bfloat16)")
        if p.device != x.device:
            raise ValueError(f"{name}: {pname} is on {p.device} but the input is on {x.device}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"{name}: residual shape {tuple(residual.shape)} != input shape {tuple(x.shape)}")
        if residual.dtype not in _DTYPES:
            raise TypeError(f"{name}: residual dtype {residual.dtype} not supported (float32, float16, bfloat16)")
        if residual.device != x.device:
            raise ValueError(f"{name}: residual is on {residual.device} but the input is on {x.device}")
    if not attention._launchable(x.device):  # the one rule (the compile check stands in for it)
        raise ValueError(f"{name}: tensors on {x.device} need CUDA (or CPU with TRITON_INTERPRET=1)")


def _forward(x, residual, weight, bias, eps: float, out_dtype: Optional[torch.dtype],
             seed: Optional[torch.Tensor] = None, p: float = 0.0):
    """Launch the forward on x (or x + residual; dropout(x, p) + residual with a ``seed``, see
    ``kernels.host.dropout_seed``): returns (y, s or None, stats), y in ``out_dtype`` (None: s's dtype, x's
    without a residual), stats the (2, M) fp32 mean and 1 / std of the rows."""
    N = x.shape[-1]
    M = x.numel() // N
    s_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty_like(x, dtype=out_dtype or s_dtype, memory_format=torch.contiguous_format)
    s = None if residual is None else torch.empty_like(x, dtype=s_dtype, memory_format=torch.contiguous_format)
    stats = torch.empty((2, M), dtype=torch.float32, device=x.device)
    weight, bias = weight.contiguous(), bias.contiguous()  # (N,), unit stride (no-ops for parameters)
    if M > 0:
        x2, stride_x = _rows(x)
        r2, stride_r = (x2, stride_x) if residual is None else _rows(residual)
        block, rows, warps = _tile(N)
        _layer_norm_fwd[(cdiv(M, rows),)](
            x2, r2, y if s is None else s, y, weight, bias, stats, stats if seed is None else seed,
            stride_x, stride_r, M, N, eps, p,
            HAS_RESIDUAL=residual is not None, HAS_DROPOUT=seed is not None, ROWS=rows, BLOCK_N=block,
            num_warps=warps,
        )
    return y, s, stats


def _backward(dy, ds, x, weight, stats, dtypes: tuple, seed: Optional[torch.Tensor] = None, p: float = 0.0):
    """Launch the backward: returns (dx in each of ``dtypes``, one or two; (2, N) fp32 with dweight
    and dbias as its rows). Both dtypes come from the one pass, no cast kernel, for rows up to
    MAX_DX2_BLOCK wide; wider rows get the second by a cast. With the forward's dropout ``seed``
    the second is the dropped-out branch's gradient (two dtypes, rows up to MAX_DX2_BLOCK)."""
    N = x.shape[-1]
    M = x.numel() // N
    x2, stride_x = _rows(x)
    dy2, stride_dy = _rows(dy)
    ds2, stride_ds = (dy2, stride_dy) if ds is None else _rows(ds)
    weight = weight.contiguous()  # (N,)
    block, warps = _block_and_warps(N)
    # A second dtype written by the kernel needs registers that rows of 8,192 do not have (it
    # spilled there, at 128 registers: the compile check); those get it by a cast.
    written = dtypes if block <= MAX_DX2_BLOCK else dtypes[:1]
    dxs = tuple(torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format) for dtype in written)
    # About 32 resident warps per SM to hide memory latency (the 50% occupancy these 64-register
    # kernels allow: the compile table's warps/SM), but at least 8 rows per program so that the
    # (P, N) fp32 partials (read again by the final sum) stay small next to the activations. Aiming
    # at 16 warps with 16 rows, the H200 ran 16,384 x 512 as 1,024 programs: 0.48 waves, 14.7 warps
    # per SM achieved, 40% of DRAM bandwidth (run 3's ncu.txt).
    programs = _num_sms(x.device.index) * max(1, 32 // warps) if x.is_cuda else 4
    rows_per_program = max(cdiv(M, programs), min(M, 8), 1)
    programs = max(cdiv(M, rows_per_program), 1)
    # dw's and db's (P, N) partials in one buffer, summed by one reduction: on an H200 the two sums
    # of separate buffers took 11.0 and 10.5 us at 16,384 x 512, half the backward (run 3's ncu.txt).
    partials = torch.empty((2, programs, N), dtype=torch.float32, device=x.device)
    _layer_norm_bwd[(programs,)](
        x2, dy2, ds2, dxs[0], dxs[-1], weight, stats, partials, stats if seed is None else seed,
        stride_x, stride_dy, stride_ds, M, N, rows_per_program, p,
        HAS_DS=ds is not None, HAS_DX2=len(dxs) == 2, HAS_DROPOUT=seed is not None, BLOCK_N=block,
        num_warps=warps,
    )
    return dxs + tuple(dxs[0].to(dtype) for dtype in dtypes[len(written):]), partials.sum(1)


# ----------------------------------------------------------------------------------------------
# Custom ops: what torch.compile sees (opaque calls with fake implementations for shapes).
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("tinygpt::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                       out_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, stats = _forward(x, None, weight, bias, eps, out_dtype)
    return y, stats


def _fake_stats(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((2, x.numel() // x.shape[-1]), dtype=torch.float32)


@_layer_norm_fwd_op.register_fake
def _(x, weight, bias, eps, out_dtype):
    return torch.empty_like(x, dtype=out_dtype or x.dtype, memory_format=torch.contiguous_format), _fake_stats(x)


@torch.library.custom_op("tinygpt::add_layer_norm_fwd", mutates_args=())
def _add_layer_norm_fwd_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           eps: float, out_dtype: Optional[torch.dtype]
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, s, stats = _forward(x, residual, weight, bias, eps, out_dtype)
    return y, s, stats


@_add_layer_norm_fwd_op.register_fake
def _(x, residual, weight, bias, eps, out_dtype):
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return (torch.empty_like(x, dtype=out_dtype or dtype, memory_format=torch.contiguous_format),
            torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format), _fake_stats(x))


@torch.library.custom_op("tinygpt::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(dy: torch.Tensor, ds: Optional[torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
                       stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    (dx,), dwdb = _backward(dy, ds, x, weight, stats, (x.dtype,))
    return dx, dwdb


@_layer_norm_bwd_op.register_fake
def _(dy, ds, x, weight, stats):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((2, x.shape[-1]), dtype=torch.float32)


# In eager mode the launchers are called directly: a Python custom op's dispatch cost ~140 us a call
# on this project's shared CPU (5 us for the direct call), more than the kernel takes at GPT-2
# sizes on a GPU. Under torch.compile the ops are used.
def _fwd(x, residual, weight, bias, eps, out_dtype, seed=None, p=0.0):
    if not torch.compiler.is_compiling():
        return _forward(x, residual, weight, bias, eps, out_dtype, seed, p)
    if residual is None:
        y, stats = torch.ops.tinygpt.layer_norm_fwd(x, weight, bias, eps, out_dtype)
        return y, None, stats
    return torch.ops.tinygpt.add_layer_norm_fwd(x, residual, weight, bias, eps, out_dtype)


def _bwd(dy, ds, x, weight, stats, dtypes: tuple, seed=None, p=0.0):
    """dx in each of ``dtypes`` (x's dtype first) and dweight / dbias; under torch.compile (no
    dropout there: ``add_layer_norm``) one dtype from the op and casts for the others."""
    if not torch.compiler.is_compiling():
        return _backward(dy, ds, x, weight, stats, dtypes, seed, p)
    dx, dwdb = torch.ops.tinygpt.layer_norm_bwd(dy, ds, x, weight, stats)
    return tuple(dx.to(dtype) for dtype in dtypes), dwdb


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        y, _, stats = _fwd(x, None, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x, weight, stats)
        ctx.param_dtypes = (weight.dtype, bias.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, stats = ctx.saved_tensors
        (dx,), dwdb = _bwd(dy, None, x, weight, stats, (x.dtype,))
        dw, db = dwdb[0], dwdb[1]  # (indexing: iterating a tensor unbinds it, ~2 us of host time)
        return dx, dw.to(ctx.param_dtypes[0]), db.to(ctx.param_dtypes[1]), None, None


class AddLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, out_dtype, p):
        seed = dropout_seed(x.device) if p > 0 else None
        y, s, stats = _fwd(x, residual, weight, bias, eps, out_dtype, seed, p)
        ctx.save_for_backward(s, weight, stats, seed)
        ctx.dtypes = (x.dtype, residual.dtype, weight.dtype, bias.dtype)
        ctx.p = p
        return y, s

    @staticmethod
    def backward(ctx, dy, ds):
        s, weight, stats, seed = ctx.saved_tensors
        x_dtype, r_dtype, w_dtype, b_dtype = ctx.dtypes
        # The grad of x + residual goes to both, each in its own dtype. The kernel writes it in the
        # sum's dtype and in x's when that differs (under autocast: the fp32 residual stream and a
        # bf16 branch), so the backward runs no cast kernel; a third dtype (fp16 + bf16) is cast.
        # After dropout x's gradient is always the second, through the mask.
        dtypes = (s.dtype,) if x_dtype == s.dtype and seed is None else (s.dtype, x_dtype)
        dsums, dwdb = _bwd(dy, ds, s, weight, stats, dtypes, seed, ctx.p)
        dw, db = dwdb[0], dwdb[1]
        dr = dsums[0] if r_dtype == s.dtype else dsums[0].to(r_dtype)
        dx = dsums[-1] if x_dtype == dtypes[-1] else dsums[0].to(x_dtype)
        return dx, dr, dw.to(w_dtype), db.to(b_dtype), None, None, None


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def _needs_graph(*tensors: torch.Tensor) -> bool:
    """Whether the call goes through autograd (a gradient may be needed, or torch.compile traces the
    custom ops); otherwise the launcher is called directly: an autograd node costs ~7 us of host time
    a call, more than the kernel at decoding sizes."""
    return torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """LayerNorm over the last dim (size up to MAX_N); statistics in fp32, output in ``out_dtype``
    (None: x's dtype).

    Any leading dims and strides; weight and bias are (N,) in any float dtype (fp32 masters under
    autocast), and their gradients come back in their own dtypes. ``out_dtype`` is for a consumer
    that would cast the output anyway (a Linear under autocast): the kernel writes it rounded once,
    as that cast would, and takes its gradient in that dtype, with no cast kernel either way.
    """
    _check("layer_norm", x, weight, bias, out_dtype=out_dtype)
    if _needs_graph(x, weight, bias):
        return LayerNormFunction.apply(x, weight, bias, float(eps), out_dtype)
    y, _, _ = _forward(x, None, weight, bias, float(eps), out_dtype)  # eager inference: no autograd node at all
    return y


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-5, out_dtype: Optional[torch.dtype] = None,
                   dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(LayerNorm(x + residual), x + residual) in one pass; the sum in x + residual's promoted dtype,
    the LayerNorm in ``out_dtype`` (None: the sum's), as ``layer_norm``.

    ``dropout_p``: x is dropout(x) first (the pre-LN block's dropout on a branch's output before
    the residual add), fused: the mask is drawn in the kernel from a seed the call takes from
    torch's generator (so a CUDA graph draws a new one every replay) and drawn again in the
    backward, never stored. Not the stream ``F.dropout`` draws. Rows wider than MAX_DX2_BLOCK or
    narrower than 4, and calls under torch.compile, run ``F.dropout`` before the fused add instead.
    """
    _check("add_layer_norm", x, weight, bias, residual, out_dtype)
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"add_layer_norm: dropout_p must be in [0, 1), got {dropout_p}")
    if p > 0 and (torch.compiler.is_compiling() or not 4 <= x.shape[-1] <= MAX_DX2_BLOCK):
        x, p = torch.nn.functional.dropout(x, p), 0.0
    if _needs_graph(x, residual, weight, bias):
        return AddLayerNormFunction.apply(x, residual, weight, bias, float(eps), out_dtype, p)
    seed = dropout_seed(x.device) if p > 0 else None
    y, s, _ = _forward(x, residual, weight, bias, float(eps), out_dtype, seed, p)
    return y, s
