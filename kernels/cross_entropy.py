"""The tied LM head fused with cross-entropy and next-token accuracy, forward and backward.

``linear_cross_entropy(h, weight, targets)`` computes what ``gpt.ops.linear_cross_entropy_ref``
computes -- the mean cross-entropy of the logits ``h @ weight.T`` over targets != ignore_index, how
many of those targets are the (first-index) argmax of their logits, and the count -- without ever
holding the (N, V) logits: rows go through in chunks of ``CHUNK_ELEMENTS // V``, and for each chunk

1. cuBLAS makes the chunk's logits, ``h_c @ W.T`` (M, V), in the compute dtype (over the vocabulary
   padded with zero weight rows to a multiple of 128, ``VOCAB_MULTIPLE``: aligned GEMMs);
2. ``_ce_rows_kernel`` (one program per row) keeps per-lane running maxima, sums of exponentials
   and first indices of the max over vocabulary tiles in fp32 (each thread's lanes are whole 16-byte
   vectors, so a tile folds in without a shuffle or a barrier; the lanes are reduced once a row),
   with the target's logit, writes the row's loss lse - logit[target] and whether the argmax hit the
   target, then overwrites the row with the unscaled gradient softmax - onehot(target) (zeros for an
   ignored row and over the padding columns), going over the tiles backwards so that it starts on
   those still in L2;
3. cuBLAS makes the chunk's dh = G @ W and G.T @ h_c, widened into an fp32 dW by the first chunk
   and added to it by every later one -- on CUDA where torch can, inside the GEMM, which then writes
   and accumulates fp32 itself (``_gemms_into_fp32``).

The backward only scales: the forward makes the mean loss's dh and dW (each row's h and dh weighed
by counted / count: (M, C) operands, never the (M, V) chunk), and the backward multiplies them by
the upstream gradient (no host sync for the count anywhere).

Why the gradients are made in the forward (Liger-Kernel's choice), in FLOPs and bytes: the head
costs three (N, V, C) GEMMs of 2NVC FLOPs each (logits, dh, dW). Recomputing the logits in the
backward -- the alternative that frees dW between forward and backward -- is a fourth, +33% of the
head's FLOPs; at N = 8,192, C = 512, V = 50,257 that is 0.42 TFLOP, ~0.6 ms of an H100 at 700
TFLOP/s, to save holding a V x C fp32 buffer (103 MB, the size of the weight's own .grad) for the
length of a forward. Every chunk's logits are written once by the GEMM, read twice (the second
time partly from L2) and written once by the row kernel, and read by the two gradient GEMMs: 6
passes of M x V x 2 bytes (bf16) per chunk, against ~24 such passes for eager (the bf16 logits;
their fp32 copy; log-softmax reading it twice and writing fp32; argmax; the zero-filled fp32
gradient; log-softmax's backward; the cast back to bf16; the two gradient GEMMs). The GEMMs run at C M / (C + M) FLOP/byte (the logits write
dominates their bytes): ~470 at C = 512, M = 5,336, above an H100's ~300 FLOP/byte ridge. dW costs a
read and a write of V x C fp32 and a half-precision partial per chunk, 12 V C bytes against the
chunk's 6 M V C FLOPs: M / 2 FLOP/byte, so chunks are large on a GPU: 5,336 rows at V = 50,304
(padded), 512 MiB of bf16 logits, 2/3 of eager's bf16 logits alone at N = 8,192, 1/6 at N =
32,768. With 2,668-row chunks an H200 spent 92 us of each chunk's ~900 on that fp32 add (run 3's
ncu.txt), three times a step at the seed's 8,192 rows, after zero-filling dW; now the first chunk
widens its partial into dW and the seed's step has one add (not yet measured). The same profile
had the row kernel at 254 us a chunk (3.2 TB/s over its 3 passes, 51% L2 hits, 24 warps per SM
for its 80 registers, and its ragged last tile in 2-byte loads: 13% excess sectors); the per-lane
form above compiles to 40 registers (48 warps per SM) with every logit load 16 bytes wide (not yet
measured; ``bench/test_bench_cross_entropy.py::test_row_kernel`` sweeps tiles and warps, and a
persistent grid of one 32-warp program per SM, which keeps 132 rows in flight instead of hundreds,
so that pass 2 reads from L2). The chunks run in order and each dW update is one GEMM: no atomics,
bitwise reproducible.

Under autocast the caller passes the compute dtype (the model passes ``gpt.ops.lm_head_dtype``,
autocast's dtype, as ``F.linear`` would cast to): h and W are cast to it for the GEMMs; softmax
statistics, the loss and dW stay fp32; dh comes back in h's dtype and dW in the weight's.

Layering as in ``kernels/layernorm.py``: the ``@triton.jit`` row kernel, a launcher that validates
and picks BLOCK_V / num_warps, the chunk loop, a ``torch.library`` custom op with a fake (so
``torch.compile`` traces it) and autograd, and the public ``linear_cross_entropy``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import attention
from .host import cdiv, next_power_of_2
from .launch import Direct

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CHUNK_ELEMENTS = 1 << 28  # logits per row chunk: 512 MiB in bf16 (5,336 rows at V = 50,304, padded)
# The GEMMs run over the vocabulary padded with zero weight rows to a multiple of VOCAB_MULTIPLE
# (50,257 -> 50,304, nanoGPT's padding): an odd V is unaligned on each GEMM's contiguous dimension (the
# logits' columns, dh's reduction, dW's rows), which keeps cuBLAS off its 16-byte tensor-core kernels.
VOCAB_MULTIPLE = 128
MAX_BLOCK_V = 4096  # vocabulary tile of the row kernel: 16 fp32 values per thread over 8 warps
LOG2E = tl.constexpr(1.4426950408889634)  # a global a @triton.jit function may read


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile(
    base,  # pointer to the row's first logit
    start, V, VP,
    ROWS: tl.constexpr, VEC: tl.constexpr, MASKED: tl.constexpr,
):
    """The logits [start, start + ROWS * VEC) as a (ROWS, VEC) tile, each thread holding whole rows of
    VEC adjacent logits (one 16-byte vector), in fp32 base-2 units, and their column indices. Only
    the last, ragged tile is masked: its load stops at VP (the row's padded width, a multiple of 16,
    so the masked load stays vectorized) and the columns in [V, VP) become -inf."""
    offs = start + tl.arange(0, ROWS)[:, None] * VEC + tl.arange(0, VEC)[None, :]  # (ROWS, VEC)
    if MASKED:
        x = tl.load(base + offs, mask=offs < VP, other=0.0).to(tl.float32)
        x = tl.where(offs < V, x * LOG2E, -float("inf"))
    else:
        x = tl.load(base + offs).to(tl.float32) * LOG2E
    return x, offs


@triton.jit
def _stats_tile(
    base,  # pointer to the row's first logit
    start, V, VP,
    m, s, best,  # (ROWS,) per-lane running max (base 2), sum of 2^(x - m), first index of the max
    ROWS: tl.constexpr, VEC: tl.constexpr, MASKED: tl.constexpr,
):
    """Fold one tile into the per-lane statistics. Lane r sees columns r * VEC + [0, VEC) of every
    tile, so the reductions here run over a thread's own registers: no shuffle, no barrier."""
    x, offs = _tile(base, start, V, VP, ROWS, VEC, MASKED)
    tile_max = tl.max(x, axis=1)  # (ROWS,)
    tile_arg = tl.argmax(x, axis=1, tie_break_left=True)  # (ROWS,) column within the lane's vector
    lane_start = start + tl.arange(0, ROWS) * VEC
    best = tl.where(tile_max > m, lane_start + tile_arg, best)  # a later tile wins only when strictly larger
    m_new = tl.maximum(m, tile_max)
    m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # a lane with nothing real yet: no inf - inf
    s = s * tl.math.exp2(m - m_ref) + tl.sum(tl.math.exp2(x - m_ref[:, None]), axis=1)
    return m_new, s, best


@triton.jit
def _grad_tile(
    base,  # pointer to the row's first logit; the tile is overwritten with its gradient
    start, V, VP, m, inv_s, target, keep,
    ROWS: tl.constexpr, VEC: tl.constexpr, MASKED: tl.constexpr,
):
    """softmax - onehot(target) over one tile, times keep (0 on an ignored row), in the logits' dtype;
    the masked tile writes zeros over the columns in [V, VP)."""
    x, offs = _tile(base, start, V, VP, ROWS, VEC, MASKED)
    g = tl.math.exp2(x - m) * inv_s - tl.where(offs == target, keep, 0.0)
    if MASKED:
        tl.store(base + offs, g.to(base.dtype.element_ty), mask=offs < VP)
    else:
        tl.store(base + offs, g.to(base.dtype.element_ty))


@triton.jit
def _ce_row(
    LOGITS, TARGETS, LOSS, HIT,  # as in _ce_rows_kernel
    row, stride_row, V, VP, ignore_index,
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
):
    """One row. Pass 1 keeps per-lane online statistics (running max, sum of exponentials, first
    index of the max) over the tiles in vocabulary order and reduces across lanes once, at the end;
    pass 2 writes the gradient in place over the tiles in reverse order, so its first reads are the
    tiles pass 1 read last, the likeliest still in L2."""
    ROWS: tl.constexpr = BLOCK_V // VEC
    base = LOGITS + row * stride_row
    target = tl.load(TARGETS + row)
    counted = target != ignore_index
    safe_target = tl.where(counted, target, 0)
    n_full = V // BLOCK_V  # tiles before this one need no mask
    tail = n_full * BLOCK_V

    m = tl.full((ROWS,), -float("inf"), tl.float32)
    s = tl.zeros((ROWS,), tl.float32)
    best = tl.zeros((ROWS,), tl.int32)
    for t in range(0, n_full):
        m, s, best = _stats_tile(base, t * BLOCK_V, V, VP, m, s, best, ROWS, VEC, False)
    if tail < V:
        m, s, best = _stats_tile(base, tail, V, VP, m, s, best, ROWS, VEC, True)
    row_max = tl.max(m, axis=0)  # base 2; finite: every row has a real logit
    row_sum = tl.sum(s * tl.math.exp2(m - row_max), axis=0)
    first = tl.min(tl.where(m == row_max, best, V), axis=0)  # the first index of the row's max
    x_target = tl.load(base + safe_target).to(tl.float32)
    lse = (row_max + tl.math.log2(row_sum)) / LOG2E  # natural-log log-sum-exp of the row's logits
    tl.store(LOSS + row, tl.where(counted, lse - x_target, 0.0))
    tl.store(HIT + row, (counted & (first == target)).to(tl.int32))

    if WRITE_GRAD:
        keep = counted.to(tl.float32)
        inv_s = keep / row_sum
        if tail < V:
            _grad_tile(base, tail, V, VP, row_max, inv_s, target, keep, ROWS, VEC, True)
        for t in range(0, n_full):
            _grad_tile(base, (n_full - 1 - t) * BLOCK_V, V, VP, row_max, inv_s, target, keep, ROWS, VEC, False)


@triton.jit
def _ce_rows_kernel(
    LOGITS,  # pointer to the chunk's logits (M, VP), row stride stride_row, unit column stride;
    #          overwritten with softmax - onehot(target) (zeros on ignored rows and past V) when WRITE_GRAD
    TARGETS,  # pointer to the chunk's targets (M,), int64
    LOSS,  # pointer to the per-row loss (M,), fp32; written: lse - logit[target], 0 on ignored rows
    HIT,  # pointer to the per-row accuracy (M,), int32; written: 1 where the argmax is the target
    M,  # rows
    stride_row,
    V,  # the vocabulary: columns [0, V) are logits
    VP,  # the row's width, V <= VP <= stride_row (a multiple of 128 from the chunk loop, so the masked
    #      load stays vectorized): columns [V, VP) are read and ignored, and zeroed with the gradient
    ignore_index,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,  # logits per tile
    VEC: tl.constexpr,  # logits per 16-byte vector: 8 in half precision, 4 in fp32
    PERSISTENT: tl.constexpr,  # False: program p does row p; True: rows p, p + P, ... of the grid's P
):
    """One program per row (the default), or a persistent grid of fewer programs holding fewer rows
    in flight, so that more of pass 2's reads hit L2 (the benchmark's sweep; a loop over rows costs
    registers, hence two forms)."""
    if PERSISTENT:
        for row in range(tl.program_id(0), M, tl.num_programs(0)):
            _ce_row(LOGITS, TARGETS, LOSS, HIT, tl.cast(row, tl.int64), stride_row, V, VP, ignore_index,
                    WRITE_GRAD, BLOCK_V, VEC)
    else:
        _ce_row(LOGITS, TARGETS, LOSS, HIT, tl.program_id(0).to(tl.int64), stride_row, V, VP, ignore_index,
                WRITE_GRAD, BLOCK_V, VEC)


# ----------------------------------------------------------------------------------------------
# Launcher and the chunk loop
# ----------------------------------------------------------------------------------------------

_ce_rows_direct = Direct(_ce_rows_kernel)  # past the JIT's per-call dispatch (kernels.launch)


def _block_and_warps(V: int, vec: int) -> tuple[int, int]:
    """The vocabulary tile (a power of two from one 16-byte vector up to MAX_BLOCK_V) and 1-8 warps
    for ~16 values a thread."""
    block = max(min(next_power_of_2(V), MAX_BLOCK_V), vec)
    return block, min(max(block // 512, 1), 8)


def _chunk_rows(V: int) -> int:
    return max(1, CHUNK_ELEMENTS // V)


def _vocab_padded(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (V, C) weight in ``dtype`` with zero rows appended up to a multiple of VOCAB_MULTIPLE."""
    V, C = weight.shape
    Vp = cdiv(V, VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if Vp == V:
        return weight.to(dtype).contiguous()
    w = torch.empty((Vp, C), dtype=dtype, device=weight.device)
    w[:V].copy_(weight)
    w[V:].zero_()
    return w


_FP32_OUT: dict[tuple, bool] = {}  # (device, dtype) -> whether _gemms_into_fp32 found it works


def _gemms_into_fp32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch multiplies half-precision ``dtype`` matrices into an fp32 output on ``device``
    and adds them into an fp32 tensor in place (``torch.addmm(c, a, b, out_dtype=torch.float32, out=c)``):
    then dW takes each chunk's product inside the GEMM's epilogue, in fp32, instead of a rounded
    half-precision partial and an fp32 add (run 3: 92 us of each 2,668-row chunk's ~900, on an
    H200). CUDA only, and only where this torch takes an fp32 ``c`` (versions differ): probed once
    per device and dtype on 16 x 16 ones, both calls (a host sync, in an eager step; during a CUDA
    graph capture an unprobed pair says no, without asking)."""
    if device.type != "cuda":
        return False
    key = (device, dtype)
    if key not in _FP32_OUT:
        if torch.cuda.is_current_stream_capturing():
            return False
        a = torch.ones(16, 16, dtype=dtype, device=device)
        c = torch.ones(16, 16, dtype=torch.float32, device=device)
        try:
            product = torch.mm(a, a, out_dtype=torch.float32)
            torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
            _FP32_OUT[key] = bool((product == 16).all() & (c == 17).all())
        except (RuntimeError, TypeError):
            _FP32_OUT[key] = False
    return _FP32_OUT[key]


def _ce_rows(logits: torch.Tensor, V: int, targets: torch.Tensor, loss: torch.Tensor, hit: torch.Tensor,
             ignore_index: int, write_grad: bool, block: Optional[int] = None, warps: Optional[int] = None,
             programs: Optional[int] = None) -> None:
    """Launch the row kernel on one chunk: (M, VP) logits whose first V columns are the vocabulary,
    (M,) int64 targets, (M,) loss and hits. ``block``, ``warps`` and ``programs`` (a persistent
    grid of that many programs; default one program per row) override the launcher's choice: the
    benchmark's sweep."""
    M, VP = logits.shape
    vec = 16 // logits.element_size()
    default_block, default_warps = _block_and_warps(V, vec)
    persistent = programs is not None and programs < M
    _ce_rows_direct[(programs if persistent else M,)](
        logits, targets, loss, hit, M, logits.stride(0), V, VP, ignore_index,
        WRITE_GRAD=write_grad, BLOCK_V=block or default_block, VEC=vec, PERSISTENT=persistent,
        num_warps=warps or default_warps,
    )


def _forward(h, weight, targets, ignore_index: int, dtype: torch.dtype, need_dh: bool, need_dw: bool):
    """The chunk loop: returns (mean loss fp32, correct, count, dh or (0,), fp32 dW or (0,)), the
    gradients being those of the mean loss (row r weighs counted[r] / count)."""
    N, C = h.shape
    V = weight.shape[0]
    w = _vocab_padded(weight, dtype)  # (Vp, C): zero rows past V
    Vp = w.shape[0]
    counted = targets != ignore_index  # (N,)
    count = counted.sum()
    row_weight = counted.float() / count.clamp(min=1)  # (N,): into the (M, C) GEMM operands
    loss_rows = torch.empty(N, dtype=torch.float32, device=h.device)
    hits = torch.empty(N, dtype=torch.int32, device=h.device)
    dh = torch.empty((N, C) if need_dh else (0,), dtype=h.dtype, device=h.device)
    dw = None  # fp32 (Vp, C): the first chunk's product, then each later chunk's added
    rows = _chunk_rows(Vp)
    buf = torch.empty(min(rows, N), Vp, dtype=dtype, device=h.device)  # one chunk of logits, reused
    fp32_out = need_dw and dtype != torch.float32 and _gemms_into_fp32(h.device, dtype)
    with torch.autocast(h.device.type, enabled=False):  # every dtype here is chosen explicitly
        for r0 in range(0, N, rows):
            r1 = min(r0 + rows, N)
            hc = h[r0:r1].to(dtype)  # (M, C)
            g = torch.mm(hc, w.t(), out=buf[: r1 - r0])  # (M, Vp) logits; 0 past V
            # The row kernel overwrites the first V columns with softmax - onehot (zeros on ignored
            # rows) and the padding columns past V with zeros: they add nothing to dh and dW.
            _ce_rows(g, V, targets[r0:r1], loss_rows[r0:r1], hits[r0:r1], ignore_index, need_dh or need_dw)
            rw = row_weight[r0:r1, None]  # (M, 1)
            if need_dh:
                dh[r0:r1] = (g @ w) * rw  # (M, C)
            if need_dw:  # chunk by chunk in row order: deterministic
                hw = (h[r0:r1] * rw).to(dtype)  # (M, C), rounded once
                if dtype == torch.float32:
                    dw = g.t() @ hw if dw is None else dw.addmm_(g.t(), hw)
                elif fp32_out:  # the GEMM writes, then accumulates into, the fp32 dW itself
                    dw = (torch.mm(g.t(), hw, out_dtype=torch.float32) if dw is None
                          else torch.addmm(dw, g.t(), hw, out_dtype=torch.float32, out=dw))
                else:  # a half-precision partial (fp32 accumulation inside the GEMM), widened or added
                    dw = (g.t() @ hw).float() if dw is None else dw.add_(g.t() @ hw)
    if dw is None:  # no rows, or no dW wanted
        dw = torch.zeros((Vp, C) if need_dw else (0,), dtype=torch.float32, device=h.device)
    loss = loss_rows.sum() / count.clamp(min=1)
    return loss, hits.sum(dtype=torch.int64), count, dh, dw[:V]


def _check(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype,
           ignore_index: int) -> None:
    """Raise a one-line ValueError for anything the kernel does not support."""
    name = "linear_cross_entropy"
    if h.dim() < 1 or weight.dim() != 2 or h.shape[-1] != weight.shape[1] or weight.shape[0] < 1:
        raise ValueError(f"{name}: need h (..., C) and weight (V, C), got {tuple(h.shape)} and {tuple(weight.shape)}")
    if targets.shape != h.shape[:-1]:
        raise ValueError(f"{name}: targets shape {tuple(targets.shape)} must be h's leading shape {tuple(h.shape[:-1])}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: targets must be int64 or int32, got {targets.dtype}")
    for what, dt in (("h", h.dtype), ("weight", weight.dtype), ("compute dtype", dtype)):
        if dt not in _DTYPES:
            raise ValueError(f"{name}: {what} {dt} not supported (float32, float16, bfloat16)")
    if weight.device != h.device or targets.device != h.device:
        raise ValueError(f"{name}: h, weight and targets on different devices ({h.device}, {weight.device}, "
                         f"{targets.device})")
    if not attention._launchable(h.device):  # the one rule (the compile check stands in for it)
        raise ValueError(f"{name}: tensors on {h.device} need CUDA (or CPU with TRITON_INTERPRET=1)")
    # Range check on CPU only: on CUDA it would cost a host sync per step (the data pipeline checks).
    if targets.device.type == "cpu" and targets.numel() and not torch.compiler.is_compiling():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        if bad.any():
            raise ValueError(f"{name}: target {int(targets[bad][0])} outside the vocabulary [0, {weight.shape[0]}) "
                             f"and not ignore_index ({ignore_index})")


# ----------------------------------------------------------------------------------------------
# Custom op (what torch.compile sees) and autograd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("tinygpt::linear_cross_entropy_fwd", mutates_args=())
def _linear_cross_entropy_fwd(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                              dtype: torch.dtype, need_dh: bool, need_dw: bool
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(h, weight, targets, ignore_index, dtype, need_dh, need_dw)


@_linear_cross_entropy_fwd.register_fake
def _linear_cross_entropy_fwd_fake(h, weight, targets, ignore_index, dtype, need_dh, need_dw):
    N, C = h.shape
    V = weight.shape[0]
    count = h.new_empty((), dtype=torch.int64)
    return (h.new_empty((), dtype=torch.float32), torch.empty_like(count), count,
            h.new_empty((N, C) if need_dh else (0,)),
            h.new_empty((V, C) if need_dw else (0,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    h, weight = inputs[:2]
    _, correct, count, dh, dw = output
    ctx.save_for_backward(dh, dw)
    ctx.dtypes = (h.dtype, weight.dtype)
    ctx.mark_non_differentiable(correct, count, dh, dw)


def _backward(ctx, dloss, _dcorrect, _dcount, _ddh, _ddw):
    dh, dw = ctx.saved_tensors  # the mean loss's gradients: times the upstream gradient
    h_dtype, w_dtype = ctx.dtypes
    dh = (dh * dloss).to(h_dtype) if ctx.needs_input_grad[0] else None
    dw = (dw * dloss).to(w_dtype) if ctx.needs_input_grad[1] else None
    return dh, dw, None, None, None, None, None


_linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1,
                         dtype: Optional[torch.dtype] = None):
    """Mean cross-entropy of ``h @ weight.T`` against ``targets``, with accuracy, never holding the logits.

    h: (..., C) final hidden states; weight: (V, C), the tied embedding; targets: h's leading shape
    (int64 or int32), entries equal to ``ignore_index`` not counted. Returns ``(loss, correct,
    count)``: the mean loss over counted targets (fp32; 0, not NaN, when none is counted), how many
    counted targets are the first-index argmax of their logits (as ``torch.argmax``: a target tied
    with an earlier token is wrong), and the count -- the model's ``LMLoss``. ``dtype`` is the GEMMs'
    dtype (default: h's and the weight's promoted dtype; under autocast pass autocast's, as the
    model does). Differentiable in h and weight; gradients are made only when one of them needs one.
    """
    if dtype is None:
        dtype = torch.promote_types(h.dtype, weight.dtype)
    _check(h, weight, targets, dtype, ignore_index)
    grad = torch.is_grad_enabled()
    loss, correct, count, _, _ = _linear_cross_entropy_fwd(
        h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1).to(torch.int64).contiguous(), int(ignore_index),
        dtype, grad and h.requires_grad, grad and weight.requires_grad)
    return loss, correct, count
