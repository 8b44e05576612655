"""Flash-decoding: one query per (batch, head) against a fixed-size KV cache, keys split across programs.

``decode_attention(q, k, v, kv_len, kv_start=None, scale=None)`` computes exactly what
``gpt.ops.causal_attention_ref(q, k, v, scale, kv_start, kv_len)`` computes for one query row:

* q is (B, H, 1, D); k and v are (B, H, S, D), the whole fixed-size cache of one layer (any
  strides). Row b attends to slots [kv_start[b], kv_len[b]); later slots (stale or never written)
  are never read. ``kv_len`` is int64 of shape (B,), or (1,) for one length shared by every row;
  ``kv_start`` is int64 (B,) or None (no padding: 0).
* Both live on the device, so a decode step has the same shapes and launches the same grid every
  call (no host slicing, no host sync): CUDA graphs capture it.

Why split: one program per (batch, head) is 8 programs for the seed model at batch 1, on a GPU
with 132 SMs. Flash-decoding cuts the S slots into ``num_splits`` chunks; one program per
(batch * head, chunk) folds its chunk's keys into an unnormalised output with its running max and
sum (online softmax, fp32, base-2 exponentials of log2(e)-scaled scores) and writes them to fp32
scratch; a second kernel rescales each row's partials to their common max and divides by the total
sum. Chunks past a row's length (or before its start) exit at once. When batch * heads alone fill
the GPU, one chunk per row and the first kernel writes the output itself (one launch).

One query row needs no tensor cores: scores are q * k summed over D, the output p * v summed over
the keys, all in fp32 registers (so the kernel also runs in Triton's interpreter in every dtype).
Bytes per step: the row's K and V slots once, 2 * (kv_len - kv_start) * D * element size per
(batch, head); FLOPs: 4 * D per key. It is memory-bound by three orders of magnitude.

Launch variants (what the launcher can pick): ``_decode_split_kernel`` with HEAD_DIM in
{16, 32, 64, 128}, BLOCK_N = 64 for D <= 64 else 32 (16 in the interpreter), HAS_KV_START and
SINGLE_SPLIT each True or False, num_warps = 4, num_stages = 2; ``_decode_combine_kernel`` with the
same HEAD_DIM, SPLITS_P2 = next power of two of num_splits (<= 64), num_warps = 4. Input dtypes
fp16, bf16, fp32.

Registered as the ``tinygpt::decode_attention`` custom op with a fake implementation, so
``torch.compile`` traces it; in eager mode the launcher is called directly (a Python custom op's
dispatch costs more than the kernel, as for the LayerNorm kernels).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import attention
from .host import cdiv, next_power_of_2
from .launch import Direct

SUPPORTED_HEAD_DIMS = attention.SUPPORTED_HEAD_DIMS  # the inputs are checked by attention's rules
MAX_SPLITS = 64
LOG2E = 1.4426950408889634

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fold_keys(
    acc, m_i, l_i, q,
    k_base,  # pointer to K[b, h, 0, 0]
    v_base,  # pointer to V[b, h, 0, 0]
    stride_kt, stride_kd, stride_vt, stride_vd,
    lo, hi, sm_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
):
    """Fold keys [lo, hi) into the running (acc, max, sum) of one query row, BLOCK_N keys at a time.

    Unmasked (MASKED=False) only for whole blocks: the caller passes hi - lo a multiple of BLOCK_N.
    Every block holds at least one key < hi, so the max is finite after the first block.
    """
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
        if MASKED:
            in_range = offs_n < hi
            k = tl.load(k_ptrs, mask=in_range[:, None], other=0.0).to(tl.float32)  # (BLOCK_N, D)
            v = tl.load(v_ptrs, mask=in_range[:, None], other=0.0).to(tl.float32)  # (BLOCK_N, D)
            s = tl.where(in_range, tl.sum(k * q[None, :], 1) * sm_scale_log2, float("-inf"))  # (BLOCK_N,)
        else:
            k = tl.load(k_ptrs).to(tl.float32)
            v = tl.load(v_ptrs).to(tl.float32)
            s = tl.sum(k * q[None, :], 1) * sm_scale_log2
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.math.exp2(m_i - m_new)  # 0 on the first block (m_i = -inf)
        p = tl.math.exp2(s - m_new)  # (BLOCK_N,), 0 where masked
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)  # (D,)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _decode_split_kernel(
    Q,  # (B, H, 1, D) queries, any strides
    K,  # (B, H, S, D) key cache of one layer, any strides
    V,  # (B, H, S, D) value cache of one layer, any strides
    KV_LEN,  # (B,) or (1,) int64: row b attends to slots < KV_LEN[b * stride_len]
    KV_START,  # (B,) int64: row b attends to slots >= KV_START[b]; read only if HAS_KV_START
    O,  # (B, H, 1, D) output, any strides; written only if SINGLE_SPLIT
    PART_O,  # (B * H, num_splits, D) fp32, contiguous: unnormalised partial outputs; written unless SINGLE_SPLIT
    PART_M,  # (B * H, num_splits) fp32, contiguous: partial maxima (log2 domain); written unless SINGLE_SPLIT
    PART_L,  # (B * H, num_splits) fp32, contiguous: partial sums; written unless SINGLE_SPLIT
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_od,
    stride_len, H, chunk, sm_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KV_START: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    end = tl.load(KV_LEN + b * stride_len).to(tl.int32)
    lo = split * chunk
    if HAS_KV_START:
        lo = tl.maximum(lo, tl.load(KV_START + b).to(tl.int32))
    hi = tl.minimum((split + 1) * chunk, end)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d * stride_qd).to(tl.float32)  # (D,)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([], float("-inf"), dtype=tl.float32)
    l_i = tl.full([], 0.0, dtype=tl.float32)
    full_hi = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N  # whole blocks: no bounds checks
    acc, m_i, l_i = _fold_keys(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                               lo, full_hi, sm_scale_log2, HEAD_DIM, BLOCK_N, False)
    acc, m_i, l_i = _fold_keys(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                               full_hi, hi, sm_scale_log2, HEAD_DIM, BLOCK_N, True)
    if SINGLE_SPLIT:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)  # no allowed key: zeros
        tl.store(O + b * stride_ob + h * stride_oh + offs_d * stride_od, o.to(O.dtype.element_ty))
    else:
        part = bh.to(tl.int64) * tl.num_programs(1) + split
        tl.store(PART_O + part * HEAD_DIM + offs_d, acc)
        tl.store(PART_M + part, m_i)
        tl.store(PART_L + part, l_i)


@triton.jit
def _decode_combine_kernel(
    PART_O,  # (B * H, num_splits, D) fp32, contiguous: unnormalised partial outputs
    PART_M,  # (B * H, num_splits) fp32, contiguous: partial maxima (-inf: the chunk had no key)
    PART_L,  # (B * H, num_splits) fp32, contiguous: partial sums
    O,  # (B, H, 1, D) output, any strides; written
    stride_ob, stride_oh, stride_od,
    H, num_splits,
    HEAD_DIM: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    """out = sum_s exp2(m_s - m) acc_s / sum_s exp2(m_s - m) l_s, with m the largest partial max."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_s < num_splits
    rows = bh.to(tl.int64) * num_splits + offs_s
    m = tl.load(PART_M + rows, mask=ok, other=float("-inf"))  # (SPLITS_P2,)
    l = tl.load(PART_L + rows, mask=ok, other=0.0)
    m_max = tl.max(m, 0)
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)  # a row with no allowed key at all
    w = tl.math.exp2(m - m_ref)  # 0 for empty chunks
    total = tl.sum(l * w, 0)
    acc = tl.load(PART_O + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)  # (D,)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d * stride_od, o.to(O.dtype.element_ty))


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

# Launched past the JIT's per-call dispatch after the first launch of each signature (kernels.launch).
_decode_split = Direct(_decode_split_kernel)
_decode_combine = Direct(_decode_combine_kernel)


def _check_inputs(q, k, v, kv_len, kv_start) -> None:
    """Raise a one-line ValueError for anything the kernels do not support."""
    if q.dim() == 4 and q.shape[2] != 1:
        raise ValueError(f"decode_attention: one query row per (batch, head), got Tq={q.shape[2]}")
    attention._check_qkv("decode_attention", q, k, v, kv_start)
    B = q.shape[0]
    if kv_len.dtype != torch.int64 or kv_len.dim() != 1 or kv_len.shape[0] not in (1, B) or kv_len.device != q.device:
        raise ValueError(f"decode_attention: kv_len must be int64 of shape ({B},) or (1,) on {q.device}, got "
                         f"{kv_len.dtype} {tuple(kv_len.shape)} on {kv_len.device}")


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _block_n(head_dim: int) -> int:
    if _INTERPRET:
        return 16  # small blocks: the tests reach partial and whole blocks at small lengths
    return 64 if head_dim <= 64 else 32  # (BLOCK_N, D) fp32 K and V tiles of 16 KB over 4 warps


def plan_splits(rows: int, slots: int, block_n: int, device: torch.device, num_splits: Optional[int] = None):
    """(num_splits, chunk): ``slots`` cut into num_splits chunks of ``chunk`` slots (a multiple of block_n).

    Default: enough programs for two per SM (one chunk per row when ``rows`` = batch * heads fill
    the GPU), at most one chunk per key block and MAX_SPLITS. Depends only on the shapes, so a
    captured decode step replays the same grid. ``num_splits`` overrides it (tests).
    """
    blocks = cdiv(slots, block_n)
    if num_splits is None:
        programs = 2 * _sm_count(device) if device.type == "cuda" else 4
        num_splits = cdiv(programs, rows)
    num_splits = max(1, min(num_splits, blocks, MAX_SPLITS))
    chunk = cdiv(blocks, num_splits) * block_n
    return cdiv(slots, chunk), chunk


def _decode_forward(q, k, v, kv_len, kv_start, scale: float, num_splits: Optional[int] = None) -> torch.Tensor:
    _check_inputs(q, k, v, kv_len, kv_start)
    B, H, _, D = q.shape
    S = k.shape[2]
    block_n = _block_n(D)
    splits, chunk = plan_splits(B * H, S, block_n, q.device, num_splits)
    o = attention._new_output(q)  # (B, H, 1, D) viewing (B, 1, H, D)
    single = splits == 1
    if single:  # no scratch: the first kernel writes the output
        part_o = part_m = part_l = o
    else:
        part_o = torch.empty(B * H, splits, D, device=q.device, dtype=torch.float32)
        part_m = torch.empty(B * H, splits, device=q.device, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
    ob, oh, _, od = o.stride()
    _decode_split[(B * H, splits)](
        q, k, v, kv_len, q if kv_start is None else kv_start, o, part_o, part_m, part_l,
        q.stride(0), q.stride(1), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        ob, oh, od,
        0 if kv_len.shape[0] == 1 else kv_len.stride(0), H, chunk, scale * LOG2E,
        HEAD_DIM=D, BLOCK_N=block_n, HAS_KV_START=kv_start is not None, SINGLE_SPLIT=single,
        num_warps=4, num_stages=2,
    )
    if not single:
        _decode_combine[(B * H,)](
            part_o, part_m, part_l, o, ob, oh, od, H, splits,
            HEAD_DIM=D, SPLITS_P2=next_power_of_2(splits), num_warps=4,
        )
    return o


# ----------------------------------------------------------------------------------------------
# Custom op (what torch.compile sees) and the public function
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("tinygpt::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor,
                         kv_start: Optional[torch.Tensor], scale: float, num_splits: Optional[int]) -> torch.Tensor:
    return _decode_forward(q, k, v, kv_len, kv_start, scale, num_splits)


@_decode_attention_op.register_fake
def _(q, k, v, kv_len, kv_start, scale, num_splits):
    _check_inputs(q, k, v, kv_len, kv_start)
    return attention._new_output(q)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor,
                     kv_start: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                     num_splits: Optional[int] = None) -> torch.Tensor:
    """Attention of one query row q (B, H, 1, D) over slots [kv_start[b], kv_len[b]) of the caches
    k, v (B, H, S, D); output (B, H, 1, D) in q's dtype. Inference only (no gradient).

    Same semantics as ``gpt.ops.causal_attention_ref(q, k, v, scale, kv_start, kv_len)``; a row
    with no allowed slot gives zeros. ``scale`` defaults to 1 / sqrt(D); ``num_splits`` overrides
    the launcher's choice of key chunks (see ``plan_splits``).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if torch.compiler.is_compiling():
        return _decode_attention_op(q, k, v, kv_len, kv_start, scale, num_splits)
    return _decode_forward(q, k, v, kv_len, kv_start, scale, num_splits)  # eager: no custom-op dispatch
