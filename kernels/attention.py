"""Fused causal attention (FlashAttention-2 style), forward and backward, with KV-cache support.

``causal_attention(q, k, v, scale=None, kv_start=None)`` computes exactly what
``gpt.ops.causal_attention_ref`` computes without ever writing the (Tq, Tk) score matrix:

* q is (B, H, Tq, D), k and v are (B, H, Tk, D) with Tk >= Tq. Query i sits at absolute position
  i + (Tk - Tq) and attends to keys j <= i + (Tk - Tq): Tq == Tk is ordinary causal attention,
  Tq == 1 one decode step against a KV cache, 1 < Tq < Tk a chunked prefill.
* ``kv_start`` (int64, shape (B,)) masks keys j < kv_start[b] of batch row b (left-padded prompts).
  A query row with no allowed key outputs zeros.
* Any strides (views of a fused qkv projection or slices of a KV cache go in without copies).

Forward: one program per (query block, batch*head) keeps a running max and sum (online softmax in
fp32, base-2 exponentials of log2(e)-scaled scores), visits only key blocks below the causal limit
(blocks every row may fully see run without masking), and saves the log-sum-exp for backward.
Backward (FlashAttention-2): a pre-pass computes delta = rowsum(dO * O); one kernel accumulates
dK and dV per key block over the query blocks that see it; another accumulates dQ per query block
over its key blocks. Every output element is written by one program: no atomics, bitwise
deterministic. The grid is (batch*head, block) with the longest causal blocks launched first.

Dropout on the probabilities (``dropout_p``, training): the forward drops them from the values'
sum only (softmax's normalizer and the saved log-sum-exp stay those of every probability) and
scales by the inverse keep rate once per row; the backward's delta = rowsum(dO * O) is unchanged,
dV takes the kept probabilities and dP the kept entries of dO V^T. Every kernel draws the mask again
from the call's seed (``_dropout_keep``: a function of the seed and the element, not of the block
shape), so nothing is stored between forward and backward.

Launch configurations: fixed under Triton's interpreter (TRITON_INTERPRET=1); on CUDA, autotuned
once per (head dim, power-of-two query / key length buckets, dtype, kv_start or not) from a list
aimed at Hopper, pruned by head dim and a shared-memory estimate. ``python -m kernels.compile_check``
compiles every configuration the launchers can pick for sm_90 and sm_80 without a GPU and checks
it (no register spills, shared memory within the limit and the estimate, tensor cores).

The op is registered with ``torch.library.custom_op`` (forward and backward ops, fake
implementations, autograd), so ``torch.compile`` traces through it; in eager mode the launchers are
called directly (custom-op dispatch costs more than the kernel at decoding sizes). One-query decode
steps against a fixed-size cache have their own split-K kernel: ``kernels/decode_attention.py``.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .host import cdiv, dropout_seed, next_power_of_2
from .launch import Direct

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_AUTOTUNE_KEY = ["HEAD_DIM", "TQ_BUCKET", "TK_BUCKET", "HAS_KV_START", "HAS_DROPOUT"]  # + tensor dtypes (added by triton)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dropout_keep(
    seed,  # the call's dropout seed (int64 scalar)
    bh, offs_m, start_n, threshold,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Whether attention dropout keeps the probability of query ``offs_m[i]`` (BLOCK_M,) for key
    start_n + j, j < BLOCK_N, in head ``bh``: a (BLOCK_M, BLOCK_N) mask that depends on the seed and
    the element only, never on the block shape, so the forward and both backward kernels draw the
    same one. One Philox4x32-10 draw, counter (key // 16, query, bh, 0), gives 4 x 32 random bits:
    16 8-bit uniforms, for keys 16 g .. 16 g + 15 (four from each word, low byte first). A
    probability is kept when its uniform is >= ``threshold`` = dropout_p * 2^8 (rounded), i.e. with
    probability 1 - threshold / 2^8. Sixteen decisions a draw, as FlashAttention makes them, not
    ``tl.rand``'s one or ``tl.rand4x``'s four: Philox's ~100 integer instructions a draw would
    otherwise outweigh the tile's softmax. start_n is a multiple of BLOCK_N (a multiple of 16)."""
    groups = start_n // 16 + tl.arange(0, BLOCK_N // 16)
    zero = tl.zeros((BLOCK_M, BLOCK_N // 16), dtype=tl.int32)
    r0, r1, r2, r3 = tl.philox(seed, zero + groups[None, :], zero + offs_m[:, None], zero + bh, zero)
    # tl.join stacks on a new last axis, so join(join(a0, a2), join(a1, a3)) holds a_(2 x + y) at
    # [..., x, y]: the words' index k, then the bytes' b, make key 16 g + 4 k + b byte b of r_k[g].
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # (M, N // 16, 2, 2)
    u = tl.join(tl.join(words & 0xFF, (words >> 16) & 0xFF), tl.join((words >> 8) & 0xFF, words >> 24))
    u = tl.reshape(u, (BLOCK_M, BLOCK_N)).to(tl.int32)  # 8-bit values
    return u >= threshold


@triton.jit
def _fwd_inner(
    acc, m_i, l_i, q,
    k_base,  # pointer to K[b, h, 0, 0]
    v_base,  # pointer to V[b, h, 0, 0]
    stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m, lo, hi, causal_offset, kv_start, Tk, sm_scale_log2,
    seed, bh, drop_threshold,  # dropout (HAS_DROPOUT): the call's seed, the head, the keep threshold
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    """Fold key blocks [lo, hi) into the running (acc, max, sum) of one query block. With dropout the
    sum is softmax's, over every probability, and acc sums the kept ones' values only (the caller
    scales by 1 / (1 - p))."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
        if MASKED:
            in_range = offs_n[:, None] < Tk
            k = tl.load(k_ptrs, mask=in_range, other=0.0)  # (BLOCK_N, D)
            v = tl.load(v_ptrs, mask=in_range, other=0.0)  # (BLOCK_N, D)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale_log2  # (BLOCK_M, BLOCK_N)
        if MASKED:
            allowed = (offs_n[None, :] <= offs_m[:, None] + causal_offset) & (offs_n[None, :] >= kv_start)
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = m_new
        alpha = tl.math.exp2(m_i - m_ref)
        p = tl.math.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            p = tl.where(_dropout_keep(seed, bh, offs_m, start_n, drop_threshold, BLOCK_M, BLOCK_N), p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    Q,  # (B, H, Tq, D) queries, any strides
    K,  # (B, H, Tk, D) keys, any strides
    V,  # (B, H, Tk, D) values, any strides
    O,  # (B, H, Tq, D) output, any strides; written
    LSE,  # (B, H, Tq) fp32, contiguous; written: log2-domain log-sum-exp of scaled scores (+inf: empty row)
    KV_START,  # (B,) int64 first allowed key of each batch row; read only if HAS_KV_START
    SEED,  # (1,) int64 the call's dropout seed; read only if HAS_DROPOUT
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, Tq, Tk, sm_scale_log2,
    drop_threshold,  # dropout_p * 2^8: a probability is kept when its 8-bit uniform is >= this
    keep_scale,  # 1 / (1 - drop_threshold / 2^8): the kept probabilities' scale
    TQ_BUCKET, TK_BUCKET,  # autotuning key only
    HEAD_DIM: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # heaviest (last) query blocks start first
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    causal_offset = Tk - Tq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Tq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    hi = tl.minimum((pid_m + 1) * BLOCK_M + causal_offset, Tk)  # causal limit of the block's last row
    if HAS_KV_START:
        kv_start = tl.load(KV_START + b).to(tl.int32)
        lo = (kv_start // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                   offs_m, lo, hi, causal_offset, kv_start, Tk, sm_scale_log2, seed, bh, drop_threshold,
                                   HEAD_DIM, BLOCK_M, BLOCK_N, True, DOT_PRECISION, HAS_DROPOUT)
    else:
        # Key blocks ending at or before the first row's causal limit are fully visible to every row.
        full_hi = ((pid_m * BLOCK_M + causal_offset + 1) // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                   offs_m, 0, full_hi, causal_offset, 0, Tk, sm_scale_log2, seed, bh, drop_threshold,
                                   HEAD_DIM, BLOCK_M, BLOCK_N, False, DOT_PRECISION, HAS_DROPOUT)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                   offs_m, full_hi, hi, causal_offset, 0, Tk, sm_scale_log2, seed, bh, drop_threshold,
                                   HEAD_DIM, BLOCK_M, BLOCK_N, True, DOT_PRECISION, HAS_DROPOUT)

    empty = l_i == 0.0  # no allowed key: output zeros, and lse = +inf makes every P zero in backward
    l_safe = tl.where(empty, 1.0, l_i)
    if HAS_DROPOUT:
        o = acc * (keep_scale / l_safe)[:, None]
    else:
        o = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
             o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta_kernel(
    O,  # (B, H, Tq, D) forward output, any strides
    DO,  # (B, H, Tq, D) gradient of the output, any strides
    DELTA,  # (B, H, Tq) fp32, contiguous; written: rowsum(dO * O)
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, Tq,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(1)
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < Tq
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                mask=row_ok, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=row_ok, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * Tq + offs_m, tl.sum(o * do, 1), mask=offs_m < Tq)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v,
    q_base,  # pointer to Q[b, h, 0, 0]
    do_base,  # pointer to dO[b, h, 0, 0]
    lse_base,  # pointer to LSE[b, h, 0]
    delta_base,  # pointer to DELTA[b, h, 0]
    stride_qt, stride_qd, stride_dot, stride_dod,
    offs_n, lo, hi, causal_offset, kv_start, Tq, sm_scale_log2,
    seed, bh, start_n, drop_threshold, keep_scale,  # dropout (HAS_DROPOUT); start_n: the key block's first key
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    """Accumulate one key block's dK (unscaled) and dV over query blocks [lo, hi). With dropout, dV
    takes the kept probabilities (scaled) and dP the kept entries of dO V^T (scaled): the gradient
    through the forward's mask, drawn again."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Tq
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                     mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))  # padding rows: P = 0
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * sm_scale_log2  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            allowed = (offs_n[:, None] <= offs_m[None, :] + causal_offset) & (offs_n[:, None] >= kv_start)
            p_t = tl.where(allowed, p_t, 0.0)
        if HAS_DROPOUT:
            keep_t = tl.trans(_dropout_keep(seed, bh, offs_m, start_n, drop_threshold, BLOCK_M, BLOCK_N))
            dv += tl.dot(tl.where(keep_t, p_t * keep_scale, 0.0).to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
            dp_t = tl.where(keep_t, dp_t * keep_scale, 0.0)
        else:
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,  # (B, H, Tq, D) queries, any strides
    K,  # (B, H, Tk, D) keys, any strides
    V,  # (B, H, Tk, D) values, any strides
    DO,  # (B, H, Tq, D) gradient of the output, any strides
    LSE,  # (B, H, Tq) fp32, contiguous: forward log-sum-exp (log2 domain)
    DELTA,  # (B, H, Tq) fp32, contiguous: rowsum(dO * O)
    DK,  # (B, H, Tk, D) gradient of keys, any strides; written
    DV,  # (B, H, Tk, D) gradient of values, any strides; written
    KV_START,  # (B,) int64 first allowed key of each batch row; read only if HAS_KV_START
    SEED,  # (1,) int64 the forward's dropout seed; read only if HAS_DROPOUT
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    H, Tq, Tk, sm_scale, sm_scale_log2,
    drop_threshold, keep_scale,  # the forward's dropout, as in _attn_fwd_kernel
    TQ_BUCKET, TK_BUCKET,  # autotuning key only
    HEAD_DIM: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(1)  # heaviest (first) key blocks start first
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    causal_offset = Tk - Tq
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n[:, None] < Tk
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=key_ok, other=0.0)  # (BLOCK_N, D)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=key_ok, other=0.0)  # (BLOCK_N, D)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + bh.to(tl.int64) * Tq
    delta_base = DELTA + bh.to(tl.int64) * Tq

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    start_n = pid_n * BLOCK_N
    # The first query that sees any key of this block: i + causal_offset >= pid_n * BLOCK_N.
    lo = (tl.maximum(pid_n * BLOCK_N - causal_offset, 0) // BLOCK_M) * BLOCK_M
    if HAS_KV_START:
        kv_start = tl.load(KV_START + b).to(tl.int32)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                 stride_qt, stride_qd, stride_dot, stride_dod,
                                 offs_n, lo, Tq, causal_offset, kv_start, Tq, sm_scale_log2,
                                 seed, bh, start_n, drop_threshold, keep_scale,
                                 HEAD_DIM, BLOCK_M, BLOCK_N, True, DOT_PRECISION, HAS_DROPOUT)
    else:
        # Query blocks whose first row already sees the block's last key need no causal mask.
        full_lo = tl.cdiv(tl.maximum((pid_n + 1) * BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M
        mid = tl.minimum(full_lo, Tq)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                 stride_qt, stride_qd, stride_dot, stride_dod,
                                 offs_n, lo, mid, causal_offset, 0, Tq, sm_scale_log2,
                                 seed, bh, start_n, drop_threshold, keep_scale,
                                 HEAD_DIM, BLOCK_M, BLOCK_N, True, DOT_PRECISION, HAS_DROPOUT)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                 stride_qt, stride_qd, stride_dot, stride_dod,
                                 offs_n, mid, Tq, causal_offset, 0, Tq, sm_scale_log2,
                                 seed, bh, start_n, drop_threshold, keep_scale,
                                 HEAD_DIM, BLOCK_M, BLOCK_N, False, DOT_PRECISION, HAS_DROPOUT)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=key_ok)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=key_ok)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse, delta,
    k_base,  # pointer to K[b, h, 0, 0]
    v_base,  # pointer to V[b, h, 0, 0]
    stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m, lo, hi, causal_offset, kv_start, Tk, sm_scale_log2,
    seed, bh, drop_threshold, keep_scale,  # dropout (HAS_DROPOUT)
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    """Accumulate one query block's dQ (unscaled) over key blocks [lo, hi); with dropout dP keeps
    the forward's kept entries of dO V^T (scaled)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
        if MASKED:
            in_range = offs_n[:, None] < Tk
            k = tl.load(k_ptrs, mask=in_range, other=0.0)  # (BLOCK_N, D)
            v = tl.load(v_ptrs, mask=in_range, other=0.0)  # (BLOCK_N, D)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale_log2  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            allowed = (offs_n[None, :] <= offs_m[:, None] + causal_offset) & (offs_n[None, :] >= kv_start)
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, start_n, drop_threshold, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q,  # (B, H, Tq, D) queries, any strides
    K,  # (B, H, Tk, D) keys, any strides
    V,  # (B, H, Tk, D) values, any strides
    DO,  # (B, H, Tq, D) gradient of the output, any strides
    LSE,  # (B, H, Tq) fp32, contiguous: forward log-sum-exp (log2 domain)
    DELTA,  # (B, H, Tq) fp32, contiguous: rowsum(dO * O)
    DQ,  # (B, H, Tq, D) gradient of queries, any strides; written
    KV_START,  # (B,) int64 first allowed key of each batch row; read only if HAS_KV_START
    SEED,  # (1,) int64 the forward's dropout seed; read only if HAS_DROPOUT
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    H, Tq, Tk, sm_scale, sm_scale_log2,
    drop_threshold, keep_scale,  # the forward's dropout, as in _attn_fwd_kernel
    TQ_BUCKET, TK_BUCKET,  # autotuning key only
    HEAD_DIM: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # heaviest (last) query blocks start first
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    causal_offset = Tk - Tq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Tq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    lse = tl.load(LSE + bh.to(tl.int64) * Tq + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * Tq + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    hi = tl.minimum((pid_m + 1) * BLOCK_M + causal_offset, Tk)
    if HAS_KV_START:
        kv_start = tl.load(KV_START + b).to(tl.int32)
        lo = (kv_start // BLOCK_N) * BLOCK_N
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                           offs_m, lo, hi, causal_offset, kv_start, Tk, sm_scale_log2,
                           seed, bh, drop_threshold, keep_scale,
                           HEAD_DIM, BLOCK_M, BLOCK_N, True, DOT_PRECISION, HAS_DROPOUT)
    else:
        full_hi = ((pid_m * BLOCK_M + causal_offset + 1) // BLOCK_N) * BLOCK_N
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                           offs_m, 0, full_hi, causal_offset, 0, Tk, sm_scale_log2,
                           seed, bh, drop_threshold, keep_scale,
                           HEAD_DIM, BLOCK_M, BLOCK_N, False, DOT_PRECISION, HAS_DROPOUT)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                           offs_m, full_hi, hi, causal_offset, 0, Tk, sm_scale_log2,
                           seed, bh, drop_threshold, keep_scale,
                           HEAD_DIM, BLOCK_M, BLOCK_N, True, DOT_PRECISION, HAS_DROPOUT)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------


class _Config(triton.Config):
    """BLOCK_M query rows by BLOCK_N key rows, for head dims up to ``max_head_dim`` (above it the
    compiled kernel spills registers on sm_80 or sm_90: see ``kernels.compile_check``), and with
    dropout up to ``dropout_max_head_dim`` (its mask's registers; dropout runs on sm_90 only).

    The two limits live in slots, outside the instance ``__dict__``: Triton's autotune disk cache
    (``cache_results``) writes ``config.__dict__`` and rebuilds ``triton.Config(**that)``, which
    takes Triton's own fields only."""

    __slots__ = ("max_head_dim", "dropout_max_head_dim")

    def __init__(self, block_m: int, block_n: int, warps: int, stages: int,
                 max_head_dim: int = max(SUPPORTED_HEAD_DIMS), dropout_max_head_dim: Optional[int] = None):
        super().__init__({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        self.max_head_dim = max_head_dim
        self.dropout_max_head_dim = max_head_dim if dropout_max_head_dim is None else dropout_max_head_dim

    def head_dim_limit(self, dropout: bool) -> int:
        return self.dropout_max_head_dim if dropout else self.max_head_dim


# The interpreter ignores warps and stages; uneven blocks exercise the block-boundary logic.
_INTERPRET_FWD = [_Config(32, 16, 4, 1)]
_INTERPRET_DKDV = [_Config(16, 32, 4, 1)]
_INTERPRET_DQ = [_Config(32, 16, 4, 1)]

# CUDA candidates, aimed at Hopper and checked for sm_90 and sm_80 by kernels.compile_check (no
# register spills, shared memory within the block limit, tensor cores in every dot: the table is in
# bench/results/2026-11-26-static/compile.md). On sm_90 a dot runs on wgmma when its rows (BLOCK_M
# here and in dQ, BLOCK_N in dK/dV) fill 64-row warpgroups, else on mma. BLOCK_M == 16 only decodes.
_CUDA_FWD = [  # BLOCK_M query rows are held; BLOCK_N key rows stream
    # Two warpgroups of 64 query rows (wgmma), 64-key blocks, K/V in a 3-stage pipeline. With 4 warps
    # this tile spilled at D >= 64 on sm_90 (a (128, D) fp32 accumulator and (128, 64) scores over
    # 128 threads): removed.
    _Config(128, 64, 8, 3),
    # Twice the keys per step: half the loop trips and rescales; its shared memory (estimate) keeps
    # it to D <= 64.
    _Config(128, 128, 8, 3),
    # One warpgroup of 64 rows: twice the programs, for short sequences or few heads (at D = 128 on
    # sm_80 it sits at 255 registers without spilling).
    _Config(64, 64, 4, 3),
    # The smallest tiles and the deepest pipeline: the lightest footprint at every head dim.
    _Config(64, 32, 4, 4),
    # Decoding (query bucket 16): one 16-row mma tile, long key blocks to stream the cache. With
    # dropout (training on sequences of <= 16) both spilled 8 bytes at D = 128 on sm_90 (Triton 3.6
    # or 3.9): there the prune falls back to its smallest configuration.
    _Config(16, 64, 4, 3, dropout_max_head_dim=64), _Config(16, 128, 4, 3, dropout_max_head_dim=64),
]
_CUDA_DKDV = [  # BLOCK_N key rows are held; BLOCK_M query rows stream
    # 128 held key rows (two warpgroups) reuse K/V over the most queries. At D = 128 its two
    # (128, 128) fp32 accumulators spill on sm_80 (with kv_start): D <= 64 only.
    _Config(32, 128, 8, 2, max_head_dim=64),
    # 64 held rows, 32 streamed, over 8 warps: the one configuration that compiles without spills at
    # every head dim on both archs under Triton 3.6 and 3.9 (the sm_80 backward is register-bound).
    _Config(32, 64, 8, 3),
    # The same tile on one warpgroup: 4 warps reach 255 registers at D = 128 on sm_80 (spilling 8
    # bytes under Triton 3.6): D <= 64 only.
    _Config(32, 64, 4, 3, max_head_dim=64),
    # Backward of sequences up to 16 tokens.
    _Config(16, 64, 4, 2),
    # Removed: (64, 128, 8 warps, 2 stages) and (64, 64, 4 warps, 2 stages) spilled at D = 128 on
    # sm_90 and D >= 64 on sm_80; (64, 64, 8 warps) with 2 or 3 stages still spilled on sm_80 at
    # D = 32 or 64 (Triton 3.6 or 3.9).
]
_CUDA_DQ = [  # BLOCK_M query rows are held; BLOCK_N key rows stream
    # Two warpgroups of query rows, short key steps.
    _Config(128, 32, 8, 2),
    # Longer key steps with 3 stages; (128, 64) with 2 stages spilled on sm_80 at D = 32 and 128, and
    # this one with dropout at D = 128 on sm_90 (16 bytes, Triton 3.9).
    _Config(128, 64, 8, 3, dropout_max_head_dim=64),
    # One warpgroup; with dropout at D = 128 it spilled 8 bytes on sm_90 under Triton 3.6.
    _Config(64, 64, 4, 2, dropout_max_head_dim=64),
    # Backward of sequences up to 16 tokens; 3 stages, as the mma path keeps num_stages - 1 buffers.
    _Config(16, 64, 4, 3),
]


def _shared_memory_limit() -> int:
    """Opt-in shared memory per block of the device Triton launches on: the limit its loader enforces."""
    active = triton.runtime.driver.active
    return active.utils.get_device_properties(active.get_current_device())["max_shared_mem"]


class _Prune:
    """``early_config_prune`` of one attention kernel: the configurations that fit the launch.

    Kept: BLOCK_M == 16 exactly when decoding (query bucket 16), head dim within the configuration's
    ``max_head_dim`` (``dropout_max_head_dim`` with dropout), and the shared-memory estimate within the device's per-block limit. fp32
    (tests only: its dots run on FMA, compile slowly and spill) gets the one smallest of those.
    If none fits, the smallest configuration within its head dim.
    """

    def __init__(self, held_rows: str, streamed_rows: str, held_tiles: int):
        self.held_rows = held_rows  # the block whose (rows, D) tiles are loaded once
        self.streamed_rows = streamed_rows  # the block loaded afresh on every step of the inner loop
        self.held_tiles = held_tiles  # tiles loaded once: Q (forward); Q and dO (dQ); K and V (dK/dV)

    def estimate(self, config: triton.Config, args: dict) -> int:
        """Shared-memory bytes of ``config`` for the launch arguments ``args`` (name -> value).

        The held tiles, ``num_stages`` buffers of the two streamed tiles (the pipeline; sm_80 and the
        mma path keep one fewer) and of two fp32 statistics per streamed row (dK/dV's lse and delta),
        and 2 KiB for barriers and static shared memory; with dropout 2 bytes per score of the tile,
        the mask's layout conversions (1-1.6 bytes measured on sm_90). ``kernels.compile_check``
        holds it to 1-2x the compiled kernels' shared memory on sm_90 and sm_80.
        """
        d, elem = args["HEAD_DIM"], args["Q"].element_size()
        held, streamed = config.kwargs[self.held_rows], config.kwargs[self.streamed_rows]
        stages = config.num_stages
        mask = 2 * held * streamed if args.get("HAS_DROPOUT") else 0
        return (self.held_tiles * held * d + stages * 2 * streamed * d) * elem + stages * 2 * streamed * 4 + mask + 2048

    def __call__(self, configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        budget = _shared_memory_limit()
        decoding = args["TQ_BUCKET"] <= 16
        within = [c for c in configs if args["HEAD_DIM"] <= c.head_dim_limit(bool(args.get("HAS_DROPOUT")))]
        fitting = [c for c in within
                   if self.estimate(c, args) <= budget and (c.kwargs["BLOCK_M"] == 16) == decoding]
        smallest = min(fitting or within, key=lambda c: self.estimate(c, args))
        return fitting if fitting and args["Q"].element_size() < 4 else [smallest]


_prune_fwd = _Prune(held_rows="BLOCK_M", streamed_rows="BLOCK_N", held_tiles=1)
_prune_dkdv = _Prune(held_rows="BLOCK_N", streamed_rows="BLOCK_M", held_tiles=2)
_prune_dq = _Prune(held_rows="BLOCK_M", streamed_rows="BLOCK_N", held_tiles=2)


def _tuned(kernel, interpret_configs, cuda_configs, prune):
    if _INTERPRET:
        return triton.autotune(configs=interpret_configs, key=_AUTOTUNE_KEY)(kernel)
    # cache_results: a key's choice is written to Triton's cache directory and read back by the next
    # process (train.py, sample.py, evaluate.py), which then starts without benchmarking every
    # configuration again (125 ms each by Triton's default). Not in the interpreter (Triton's rule).
    return triton.autotune(configs=cuda_configs, key=_AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": prune}, cache_results=True)(kernel)


class _Tuned:
    """An autotuned kernel, launched through Triton's ``Autotuner`` on the first call of each tuning
    key and then with the configuration the autotuner chose, past both the autotuner and the JIT's
    per-call dispatch (``kernels.launch.Direct``).

    The autotuner's per-call work (dicts of the kernel's ~40 arguments, the dtype of each) took
    16 us a launch on this project's CPU, under Triton 3.6 and 3.9 alike, as much as the JIT's own
    dispatch (bench/test_bench_host.py::test_dispatched_host_us); on a GPU the host sets the pace of
    these launches at the model's sizes. ``key`` must separate what the autotuner's key separates
    (``_AUTOTUNE_KEY`` and the tensor arguments' dtypes): the launchers pass the head dim, the length
    buckets, whether there is a ``kv_start``, and the dtypes of q (and dO). A launch whose autotuner
    chose nothing (``kernels.compile_check`` compiles every configuration instead) records nothing.
    ``grid`` takes the launch's constexprs (the chosen configuration's among them).
    """

    def __init__(self, tuner):
        self.tuner = tuner
        self.direct = Direct(tuner.fn)
        self.chosen: dict[tuple, dict] = {}  # tuning key -> the chosen configuration's kwargs

    def launch(self, grid, key: tuple, *args, **kwargs) -> None:
        config = self.chosen.get(key)
        if config is not None:
            kwargs.update(config)
            self.direct.launch(grid(kwargs), args, kwargs)
            return
        self.tuner.best_config = None
        self.tuner[grid](*args, **kwargs)
        if self.tuner.best_config is not None:
            self.chosen[key] = self.tuner.best_config.all_kwargs()


_attn_fwd = _Tuned(_tuned(_attn_fwd_kernel, _INTERPRET_FWD, _CUDA_FWD, _prune_fwd))
_attn_bwd_dkdv = _Tuned(_tuned(_attn_bwd_dkdv_kernel, _INTERPRET_DKDV, _CUDA_DKDV, _prune_dkdv))
_attn_bwd_dq = _Tuned(_tuned(_attn_bwd_dq_kernel, _INTERPRET_DQ, _CUDA_DQ, _prune_dq))
_attn_bwd_delta = Direct(_attn_bwd_delta_kernel)  # not tuned: one fixed configuration
_TUNED = (_attn_fwd, _attn_bwd_dkdv, _attn_bwd_dq)
_CUDA_CONFIGS = {  # by kernel name, for kernels.compile_check
    "_attn_fwd_kernel": _CUDA_FWD, "_attn_bwd_dkdv_kernel": _CUDA_DKDV, "_attn_bwd_dq_kernel": _CUDA_DQ,
}


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _launchable(device: torch.device) -> bool:
    """Whether the kernels run on tensors of this device: CUDA, or the CPU under Triton's interpreter."""
    return device.type == "cuda" or (_INTERPRET and device.type == "cpu")


def _check_qkv(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: Optional[torch.Tensor]) -> None:
    """One-line ValueErrors, prefixed with ``name``, for q, k, v (and kv_start) that no attention
    kernel here takes: shapes, head dim, dtypes, devices. Shared by causal and decode attention."""
    qs, ks, dtype, device = q.shape, k.shape, q.dtype, q.device
    if (kv_start is None and len(qs) == len(ks) == 4 and ks == v.shape and qs[0] == ks[0] and qs[1] == ks[1]
            and qs[3] == ks[3] and qs[3] in SUPPORTED_HEAD_DIMS and dtype in SUPPORTED_DTYPES
            and k.dtype == dtype and v.dtype == dtype and k.device == device and v.device == device
            and _launchable(device)):
        return  # (the usual call, checked in one expression: a call's host time sets the pace on a GPU)
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name}: {arg} must be (B, H, T, D), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{name}: k {tuple(k.shape)} and v {tuple(v.shape)} disagree: their shapes differ")
    B, H, _, D = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (B, H, D):
        raise ValueError(f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on (B, H, D)")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{name}: head dim {D} not supported (one of {SUPPORTED_HEAD_DIMS})")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name}: q, k, v must share one dtype of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{name}: q, k, v on different devices ({q.device}, {k.device}, {v.device})")
    if not _launchable(q.device):
        raise ValueError(f"{name}: tensors on {q.device} need CUDA (or CPU with TRITON_INTERPRET=1)")
    if kv_start is not None:
        if kv_start.dtype != torch.int64 or tuple(kv_start.shape) != (B,) or kv_start.device != q.device:
            raise ValueError(f"{name}: kv_start must be int64 of shape ({B},) on {q.device}, got "
                             f"{kv_start.dtype} {tuple(kv_start.shape)} on {kv_start.device}")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: Optional[torch.Tensor]) -> None:
    """Raise a one-line ValueError for anything the kernels do not support."""
    _check_qkv("causal_attention", q, k, v, kv_start)
    Tq, Tk = q.shape[2], k.shape[2]
    if Tq < 1 or Tk < Tq:
        raise ValueError(f"causal_attention: need 1 <= Tq <= Tk, got Tq={Tq}, Tk={Tk}")


def _bucket(n: int) -> int:
    """Power-of-two length bucket (the autotuning key), so configs are tuned once per bucket."""
    return max(16, next_power_of_2(n))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs (testing) get full-precision dots; fp16/bf16 use tensor cores regardless."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    """The 4 strides of a (B, H, T, D) tensor (one call: a launch passes 16-24 of them)."""
    return t.stride()


def _new_output(q: torch.Tensor) -> torch.Tensor:
    """(B, H, Tq, D) viewing a (B, Tq, H, D) buffer, so the model's merge of heads is free."""
    B, H, Tq, D = q.shape
    return torch.empty_strided((B, H, Tq, D), (Tq * H * D, D, H * D, 1), dtype=q.dtype, device=q.device)


DROPOUT_BITS = 8  # dropout_p is rounded to a multiple of 2^-8 (see _dropout_keep)


def _dropout_args(dropout_p: float) -> tuple[int, float]:
    """The kernels' (threshold, keep scale) for ``dropout_p`` in [0, 1): a probability is dropped with
    probability threshold / 2^8, dropout_p rounded to a multiple of 2^-8 (0.1 -> 26 / 256 =
    0.1016), and the kept ones are scaled by the inverse of that exact keep rate (FlashAttention
    keeps where an 8-bit uniform is <= floor(255 (1 - dropout_p)) and scales by 1 / (1 - dropout_p))."""
    threshold = min(round(dropout_p * (1 << DROPOUT_BITS)), (1 << DROPOUT_BITS) - 1)
    return threshold, (1 << DROPOUT_BITS) / ((1 << DROPOUT_BITS) - threshold)


def _attention_forward(q, k, v, scale: float, kv_start: Optional[torch.Tensor], dropout_p: float = 0.0,
                       seed: Optional[torch.Tensor] = None):
    """Launch the forward kernel: returns the output (B, H, Tq, D) and the log2-domain lse (B, H, Tq).
    With ``seed`` ((1,) int64), dropout of probability ``dropout_p`` on the attention probabilities."""
    _check_inputs(q, k, v, kv_start)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    o = _new_output(q)
    lse = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)

    def grid(meta):
        return B * H, cdiv(Tq, meta["BLOCK_M"])

    tq, tk, has_start, has_dropout = _bucket(Tq), _bucket(Tk), kv_start is not None, seed is not None
    _attn_fwd.launch(
        grid, (D, tq, tk, has_start, has_dropout, q.dtype),
        q, k, v, o, lse, q if kv_start is None else kv_start, q if seed is None else seed,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        H, Tq, Tk, scale * LOG2E, *_dropout_args(dropout_p), tq, tk,
        HEAD_DIM=D, HAS_KV_START=has_start, HAS_DROPOUT=has_dropout, DOT_PRECISION=_dot_precision(q.dtype),
    )
    return o, lse


def _attention_backward(do, q, k, v, o, lse, scale: float, kv_start: Optional[torch.Tensor],
                        dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None, out=None):
    """Launch the delta pre-pass, the dK/dV kernel and the dQ kernel: returns (dq, dk, dv), written
    into ``out`` (three (B, H, T, D) tensors of any strides) if given. ``dropout_p`` and ``seed``:
    the forward's (its mask is drawn again)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    delta = torch.empty_like(lse)
    _attn_bwd_delta[(B * H, cdiv(Tq, 64))](
        o, do, delta, *_strides(o), *_strides(do), H, Tq, HEAD_DIM=D, BLOCK_M=64,
    )
    dq, dk, dv = out if out is not None else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    starts, seeds = q if kv_start is None else kv_start, q if seed is None else seed
    tq, tk, has_start, has_dropout = _bucket(Tq), _bucket(Tk), kv_start is not None, seed is not None
    key = (D, tq, tk, has_start, has_dropout, q.dtype, do.dtype)
    dropout = _dropout_args(dropout_p)
    common = dict(HEAD_DIM=D, HAS_KV_START=has_start, HAS_DROPOUT=has_dropout, DOT_PRECISION=_dot_precision(q.dtype))

    def grid_keys(meta):
        return B * H, cdiv(Tk, meta["BLOCK_N"])

    def grid_queries(meta):
        return B * H, cdiv(Tq, meta["BLOCK_M"])

    _attn_bwd_dkdv.launch(
        grid_keys, key,
        q, k, v, do, lse, delta, dk, dv, starts, seeds,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        H, Tq, Tk, scale, scale * LOG2E, *dropout, tq, tk, **common,
    )
    _attn_bwd_dq.launch(
        grid_queries, key,
        q, k, v, do, lse, delta, dq, starts, seeds,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        H, Tq, Tk, scale, scale * LOG2E, *dropout, tq, tk, **common,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# torch.library ops (traceable by torch.compile) and autograd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("tinygpt::causal_attention_fwd", mutates_args=())
def _causal_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                          kv_start: Optional[torch.Tensor], dropout_p: float, seed: Optional[torch.Tensor]
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_forward(q, k, v, scale, kv_start, dropout_p, seed)


@_causal_attention_fwd.register_fake
def _causal_attention_fwd_fake(q, k, v, scale, kv_start, dropout_p, seed):
    _check_inputs(q, k, v, kv_start)
    B, H, Tq, _ = q.shape
    return _new_output(q), q.new_empty(B, H, Tq, dtype=torch.float32)


@torch.library.custom_op("tinygpt::causal_attention_bwd", mutates_args=())
def _causal_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                          lse: torch.Tensor, scale: float, kv_start: Optional[torch.Tensor], dropout_p: float,
                          seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attention_backward(do, q, k, v, o, lse, scale, kv_start, dropout_p, seed)


@_causal_attention_bwd.register_fake
def _causal_attention_bwd_fake(do, q, k, v, o, lse, scale, kv_start, dropout_p, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, kv_start, dropout_p, seed = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, kv_start, seed)
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, kv_start, seed = ctx.saved_tensors
    dq, dk, dv = _causal_attention_bwd(do, q, k, v, o, lse, ctx.scale, kv_start, ctx.dropout_p, seed)
    return dq, dk, dv, None, None, None, None


_causal_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerCausalAttention(torch.autograd.Function):
    """The same forward and backward with the launchers called directly: in eager mode a Python
    custom op's dispatch costs more than the kernel at decoding sizes (as for the LayerNorm kernels).
    Under torch.compile the custom ops above are used."""

    @staticmethod
    def forward(ctx, q, k, v, scale, kv_start, dropout_p, seed):
        o, lse = _attention_forward(q, k, v, scale, kv_start, dropout_p, seed)
        ctx.save_for_backward(q, k, v, o, lse, kv_start, seed)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kv_start, seed = ctx.saved_tensors
        dq, dk, dv = _attention_backward(do, q, k, v, o, lse, ctx.scale, kv_start, ctx.dropout_p, seed)
        return dq, dk, dv, None, None, None, None


def _split_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, T, D): views of a fused projection's (B, T, 3, H, D) output."""
    return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))


class _EagerPackedAttention(torch.autograd.Function):
    """Causal attention of the q, k, v packed in one (B, T, 3, H, D) tensor, whose backward writes
    dq, dk and dv into one (B, T, 3, H, D) gradient. Attention over the three views would hand
    autograd three gradients, which the views' backward stacks into one: a copy of the whole fused
    projection's gradient every layer and step."""

    @staticmethod
    def forward(ctx, qkv, scale, dropout_p, seed):
        o, lse = _attention_forward(*_split_qkv(qkv), scale, None, dropout_p, seed)
        ctx.save_for_backward(qkv, o, lse, seed)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        return o

    @staticmethod
    def backward(ctx, do):
        qkv, o, lse, seed = ctx.saved_tensors
        dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)  # (B, T, 3, H, D)
        _attention_backward(do, *_split_qkv(qkv), o, lse, ctx.scale, None, ctx.dropout_p, seed,
                            out=_split_qkv(dqkv))
        return dqkv, None, None, None


DROPOUT_MIN_CAPABILITY = (9, 0)  # below Hopper the dropout variants spill registers (kernels.compile_check)


def _dropout(dropout_p: float, device: torch.device) -> tuple[float, Optional[torch.Tensor]]:
    """(dropout_p, the call's seed or None without dropout), dropout_p and the device checked."""
    p = float(dropout_p)
    if p == 0.0:
        return p, None
    if not 0.0 < p < 1.0:
        raise ValueError(f"causal_attention: dropout_p must be in [0, 1), got {dropout_p}")
    # Not under torch.compile, whose graph the device query would break: train.py's --compile runs
    # checked the device before tracing (gpt.ops.triton_covers).
    if not torch.compiler.is_compiling() and not dropout_supported(device):
        have = ".".join(map(str, _cuda_capability(torch.device(device))))
        raise ValueError(f"causal_attention: dropout_p > 0 needs compute capability "
                         f"{'.'.join(map(str, DROPOUT_MIN_CAPABILITY))} or newer (Hopper); this GPU has {have}")
    return p, dropout_seed(device)


def dropout_supported(device) -> bool:
    """Whether the kernels draw attention dropout on ``device``: a CUDA GPU of compute capability
    ``DROPOUT_MIN_CAPABILITY`` or newer (on Ampere the dropout variants of the backward kernels
    spill registers at head dims 64 and 128, which ``kernels.compile_check`` forbids), or the CPU
    under Triton's interpreter."""
    device = torch.device(device)
    if device.type != "cuda":
        return _launchable(device)
    return _cuda_capability(device) >= DROPOUT_MIN_CAPABILITY


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    """(major, minor) of CUDA device ``index``, asked once (a launch's host time counts)."""
    return torch.cuda.get_device_capability(index)


def causal_attention_qkv(qkv: torch.Tensor, scale: Optional[float] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """``causal_attention(q, k, v, dropout_p=dropout_p)`` of q, k, v = qkv[:, :, 0], [1], [2]
    transposed to (B, H, T, D), from the fused projection's output qkv (B, T, 3, H, D) as the model
    trains; output (B, H, T, D). Differentiable in qkv, whose gradient the kernels write in one piece."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"causal_attention_qkv: qkv must be (B, T, 3, H, D), got shape {tuple(qkv.shape)}")
    if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and qkv.requires_grad):
        return causal_attention(*_split_qkv(qkv), scale=scale, dropout_p=dropout_p)
    scale = 1.0 / math.sqrt(qkv.shape[-1]) if scale is None else float(scale)
    return _EagerPackedAttention.apply(qkv, scale, *_dropout(dropout_p, qkv.device))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                     kv_start: Optional[torch.Tensor] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal softmax attention of q (B, H, Tq, D) over k, v (B, H, Tk, D); output (B, H, Tq, D).

    Same semantics as ``gpt.ops.causal_attention_ref`` (query i attends to keys
    j <= i + Tk - Tq and j >= kv_start[b]; rows with no allowed key give zeros). ``scale`` defaults
    to 1 / sqrt(D). Differentiable in q, k and v.

    ``dropout_p``: dropout on the attention probabilities (softmax's normalizer is over all of them;
    the kept ones are scaled by 1 / (1 - p)), as the reference's ``F.dropout`` but drawn in the
    kernels: the mask comes from Philox with a seed the call takes from torch's generator (so
    ``torch.manual_seed`` reproduces it and a CUDA graph draws a new one every replay), it is drawn
    again in the backward and never stored, and dropout_p is rounded to a multiple of 2^-8
    (``_dropout_keep``: 16 decisions a Philox draw, as FlashAttention's). Not the stream ``F.dropout`` draws.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    dropout_p, seed = _dropout(dropout_p, q.device)
    if torch.compiler.is_compiling():
        return _causal_attention_fwd(q, k, v, scale, kv_start, dropout_p, seed)[0]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _EagerCausalAttention.apply(q, k, v, scale, kv_start, dropout_p, seed)
    return _attention_forward(q, k, v, scale, kv_start, dropout_p, seed)[0]  # eager inference: no autograd node at all
