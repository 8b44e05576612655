"""The model's hot ops: plain-PyTorch reference math, and the table that picks an implementation.

Every op here has a Triton kernel in ``kernels/`` with the same signature and semantics; the
reference is the definition the kernels are tested against (in float64) and the path that runs on a
CPU. ``select_ops(impl, device)`` is the one place that maps ``impl`` ("torch", "triton", or
"auto": Triton on CUDA, torch elsewhere) to an ``Ops`` table; both tables are built once.

The torch table runs attention through ``F.scaled_dot_product_attention`` wherever that computes
exactly what the explicit ``causal_attention_ref`` does (no ``kv_start``, no dropout, a full causal
square or a single decode query): no (T, T) mask or score tensor in memory, which made the reference
attention a large part of a CPU training step. The explicit math stays the documented definition
and the fallback for everything else. A CPU training call in half precision runs SDPA on fp32
copies where torch's half-precision backward is the slower one (``_cpu_training_upcast``).
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

IMPLS = ("auto", "torch", "triton")


# ----------------------------------------------------------------------------------------------
# Reference math: written to be read, and the float64-checkable definition of what kernels compute.
# ----------------------------------------------------------------------------------------------


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """LayerNorm over the last dim (biased variance), statistics in fp32 (or higher), output in
    ``out_dtype`` (None: x's dtype).

    torch's fused ``F.layer_norm`` on x upcast to at least fp32: one kernel forward and one backward
    instead of the dozen elementwise ops (and their saved tensors) of the written-out formula
    ``(x - mean) / sqrt(var + eps) * weight + bias``.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    y = F.layer_norm(x.to(dtype), x.shape[-1:], weight.to(dtype), bias.to(dtype), eps)
    return y.to(out_dtype or x.dtype)


def add_layer_norm_ref(x, residual, weight, bias, eps, out_dtype: Optional[torch.dtype] = None,
                       dropout_p: float = 0.0):
    """The pre-LN block's residual add and the next LayerNorm: returns (LN(x + residual), x + residual),
    with x = dropout(x) first when ``dropout_p`` > 0 (the branch's dropout, drawn by ``F.dropout``)."""
    if dropout_p > 0.0:
        x = F.dropout(x, p=dropout_p, training=True)
    s = x + residual
    return layer_norm_ref(s, weight, bias, eps, out_dtype), s


def compute_dtype(device_type: str) -> Optional[torch.dtype]:
    """Autocast's dtype where autocast is on for ``device_type``, else None: the dtype a LayerNorm
    writes its output in when a Linear (which autocast casts to that dtype) reads it next."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def attention_mask(Tq: int, Tk: int, device, kv_start: Optional[torch.Tensor] = None,
                   kv_len: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean mask of allowed (query, key) pairs: key j <= the query's position, and j >= kv_start[b].

    Query i sits at position i + (Tk - Tq); with ``kv_len`` (a fixed-size cache whose first
    kv_len[b] slots are written) at kv_len[b] - Tq + i, so the slots after it are never seen.
    Shape (Tq, Tk), or (B, 1, Tq, Tk) with kv_start or kv_len (left-padded batches: keys before a
    row's start are padding).
    """
    i = torch.arange(Tq, device=device)[:, None]
    j = torch.arange(Tk, device=device)[None, :]
    if kv_len is None:
        allowed = j <= i + (Tk - Tq)  # (Tq, Tk)
    else:
        allowed = j <= i + (kv_len.view(-1, 1, 1, 1) - Tq)  # (B, 1, Tq, Tk)
    if kv_start is not None:
        allowed = allowed & (j >= kv_start.view(-1, 1, 1, 1))  # (B, 1, Tq, Tk)
    return allowed


def causal_attention_ref(q, k, v, scale=None, kv_start=None, kv_len=None, dropout_p: float = 0.0):
    """Explicit causal softmax attention, with dropout on the probabilities when ``dropout_p > 0``.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D) with Tk >= Tq. Query i sits at absolute position
    i + (Tk - Tq), so Tq == Tk is ordinary causal attention and Tq == 1 is one decode step against
    a cache. With ``kv_len`` ((B,) or (1,) int64), k and v are whole fixed-size caches of which row
    b's first kv_len[b] slots are written: query i sits at kv_len[b] - Tq + i and later slots are
    masked (the static decode step: same shapes every call). Rows with no allowed key (padding
    queries) output zeros.
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    att = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    allowed = attention_mask(Tq, Tk, q.device, kv_start, kv_len)
    att = att.masked_fill(~allowed, float("-inf"))
    att = torch.softmax(att.float(), dim=-1).to(q.dtype)
    att = torch.nan_to_num(att, nan=0.0)  # fully masked rows -> 0
    if dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p, training=True)
    return att @ v  # (B, H, Tq, D)


def causal_attention_torch(q, k, v, scale=None, kv_start=None, kv_len=None, dropout_p: float = 0.0):
    """The torch table's attention: ``causal_attention_ref``'s semantics through torch's fused kernel.

    ``F.scaled_dot_product_attention`` (flash-style on a CPU: no (Tq, Tk) score matrix in memory,
    forward or backward; fully masked rows give zeros, as in the reference). A full causal square
    or one query with every key visible needs no mask tensor (``is_causal``, or nothing); left
    padding (``kv_start``), a fixed-size cache (``kv_len``) and a chunk of queries after a cache
    (SDPA's ``is_causal`` aligns top-left, ours bottom-right) pass the reference's boolean mask.
    With dropout the explicit reference runs (the same dropout stream as the documented math).
    """
    if dropout_p > 0.0:
        return causal_attention_ref(q, k, v, scale, kv_start, kv_len, dropout_p)
    Tq, Tk = q.shape[-2], k.shape[-2]
    mask = None
    if not (kv_start is None and kv_len is None and (Tq == Tk or Tq == 1)):
        mask = attention_mask(Tq, Tk, q.device, kv_start, kv_len)
    half = _cpu_training_upcast(q, k, v)
    if half is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and Tq > 1, scale=scale)
    with torch.autocast("cpu", enabled=False):  # (autocast would cast the fp32 operands back)
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                           is_causal=mask is None and Tq > 1, scale=scale)
    return y.to(half)


def _cpu_training_upcast(q, k, v) -> Optional[torch.dtype]:
    """The half dtype a CPU training call's attention would run in, where running it in fp32 is
    faster; else None.

    torch 2.13's CPU flash attention is slow to differentiate in half precision at small head dims
    and short contexts: at the ``tiny`` preset's shape (16, 4, 128, 32), bf16 forward + backward took
    15-20 ms against 4.7 ms for the same call on fp32 copies of q, k, v (casts included), 4.3x; bf16
    won back only at head dim 64 from 256 tokens (1.0x at 256 and 0.6x at 1,024 tokens), and fp16
    was never the faster (fp32 1.0-2.8x faster; `bench/test_bench_train.py::test_cpu_attention_training`).
    Inference calls (no gradient) stay in half precision, whose forward is the faster one.
    fp32 is also the more exact: the result is rounded to the half dtype once.
    """
    if q.device.type != "cpu" or not torch.is_grad_enabled() or not (q.requires_grad or k.requires_grad
                                                                     or v.requires_grad):
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
    if dtype == torch.float16 or (dtype == torch.bfloat16 and (q.shape[-1] <= 32 or k.shape[-2] <= 128)):
        return dtype
    return None


# ----------------------------------------------------------------------------------------------
# The tied LM head and cross-entropy, without the (N, V) logits
# ----------------------------------------------------------------------------------------------

# Rows per chunk = LCE_CHUNK_BYTES // (V x the compute dtype's size): 667 rows of the 50,257-token
# vocabulary in fp32, 1,335 in bf16. On this project's CPU (one thread) the chunk's fp32 GEMMs run
# as fast from ~128 rows as from all 2,048 (120-150 GFLOP/s: dW.addmm_ accumulates in place), but
# bf16's dW update -- a bf16 partial, converted and added into the fp32 accumulator, ~100 ms a
# chunk -- wants few chunks (73 GFLOP/s at 166 rows, ~190 from 600).
LCE_CHUNK_BYTES = 128 << 20
# The fp32 softmax statistics run over blocks of LCE_BLOCK_ELEMENTS logits (41 rows, 8 MiB): a block
# that stays in cache makes the five elementwise passes ~30% cheaper than over a whole chunk.
LCE_BLOCK_ELEMENTS = 1 << 21
# On a GPU, and in half precision, the head's GEMMs run over the vocabulary padded with zero weight
# rows to a multiple of LCE_VOCAB_MULTIPLE (50,257 -> 50,304, as nanoGPT pads its embedding): the
# extra logits are 0, never enter the softmax (the row statistics see the first V columns) and add
# nothing to dh. An odd V puts the vocabulary on a GEMM's contiguous dimension unaligned (the
# logits' columns, dh's reduction, dW's rows), which keeps cuBLAS off its 16-byte-aligned
# tensor-core kernels. On this project's CPU a 1,335-row bf16 chunk's logits GEMM takes 54 ms padded
# against 74 ms (dh and dW: the same), while fp32 gains nothing there and the padded copy of the
# weight costs ~35 ms a step: a CPU pads in half precision only.
LCE_VOCAB_MULTIPLE = 128


def vocab_padded(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (V, C) head weight in ``dtype``; on a GPU or in half precision with zero rows appended up
    to a multiple of LCE_VOCAB_MULTIPLE rows."""
    V, C = weight.shape
    pads = weight.device.type != "cpu" or dtype in (torch.float16, torch.bfloat16)
    Vp = -(-V // LCE_VOCAB_MULTIPLE) * LCE_VOCAB_MULTIPLE if pads else V
    if Vp == V:
        return weight.to(dtype)
    w = weight.new_empty((Vp, C), dtype=dtype)
    w[:V].copy_(weight)
    w[V:].zero_()
    return w


def lm_head_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the LM head multiplies in: autocast's, when autocast is on for h's device (as
    ``F.linear`` would cast), else the promotion of h's and the weight's dtypes.

    Under bf16 autocast the hidden states and ``wte.weight`` (the fp32 master) are both cast to
    bf16 for the GEMMs; the softmax statistics, the loss and the weight-gradient accumulation
    across row chunks stay in fp32, and the gradients come back in h's and the weight's own dtypes.
    """
    return compute_dtype(h.device.type) or torch.promote_types(h.dtype, weight.dtype)


def linear_cross_entropy_unfused(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1,
                                 dtype: Optional[torch.dtype] = None):
    """The textbook head: all (N, V) logits, ``F.cross_entropy`` and ``argmax``, as the model computed
    it before the fused op. Same contract as ``linear_cross_entropy_ref`` (the logits in ``dtype``,
    the loss in fp32 or wider, 0 when every target is ignored); the peer the tests and benchmarks
    hold the fused implementations against (``TORCH_OPS._replace(linear_cross_entropy=...)``).
    """
    dtype = torch.promote_types(h.dtype, weight.dtype) if dtype is None else dtype
    with torch.autocast(h.device.type, enabled=False):
        logits = F.linear(h.reshape(-1, h.shape[-1]).to(dtype), weight.to(dtype))  # (N, V)
    flat_t = targets.reshape(-1)
    counted = flat_t != ignore_index
    z = logits.to(torch.promote_types(dtype, torch.float32))
    loss = F.cross_entropy(z, flat_t, ignore_index=ignore_index, reduction="sum") / counted.sum().clamp(min=1)
    correct = ((logits.argmax(-1) == flat_t) & counted).sum()
    return loss, correct, counted.sum()


def _blocks_on(device: torch.device) -> bool:
    """Whether the softmax statistics go in cache-sized blocks of rows, finding argmax hits with a
    host sync per block (a CPU's way), or over the whole chunk with a plain argmax (a GPU's: there the
    block loop's ~15 launches and a sync per 41 rows made an H200's step 62 ms slower than the
    textbook head's)."""
    return device.type == "cpu"


def _cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, counted: torch.Tensor, write_grad: bool):
    """Summed loss and argmax hits of a chunk of logits (M, V), statistics in fp32 (or wider).

    On a CPU rows go in blocks of LCE_BLOCK_ELEMENTS logits (``_blocks_on``). With ``write_grad`` the
    chunk is overwritten, in its own dtype, with d(row loss)/d(logits) = softmax - onehot(target) --
    on every row: the rows not counted (whose ``targets`` hold a stand-in) are for the caller to mask.
    """
    M, V = logits.shape
    stat = torch.promote_types(logits.dtype, torch.float32)
    blocked = _blocks_on(logits.device)
    rows = max(1, LCE_BLOCK_ELEMENTS // V if blocked else M)
    buf = None if logits.dtype == stat else logits.new_empty((min(rows, M), V), dtype=stat)
    loss = logits.new_zeros((), dtype=stat)
    hits = torch.zeros((), dtype=torch.int64, device=logits.device)
    for b0 in range(0, M, rows):
        x, t, keep = logits[b0:b0 + rows], targets[b0:b0 + rows], counted[b0:b0 + rows]  # (B, V), (B,), (B,)
        x_t = x.gather(1, t[:, None]).squeeze(1)  # (B,) target logits
        m = x.amax(dim=-1)  # (B,) row maxima, exact in any dtype
        if blocked:
            # A hit needs the target at the row's maximum, and no earlier token there (torch.argmax's
            # first index): the row's maximum over the tokens before the target is below m. Only
            # rows with the target at m are looked at, one slice each: on a CPU a max with indices
            # (argmax) is ~5x slower than amax, and 11 such rows of a 41-row block took 0.9 ms
            # through ``x[maybe].max(dim=-1)`` against 0.3 ms so.
            maybe = (keep & (x_t == m)).nonzero().squeeze(1)
            hits += sum(target == 0 or bool(x[r, :target].amax() < m[r])
                        for r, target in zip(maybe.tolist(), t[maybe].tolist()))
        else:
            hits += ((x.argmax(dim=-1) == t) & keep).sum()
        z = x.sub_(m[:, None]) if buf is None else buf[: len(t)].copy_(x).sub_(m.to(stat)[:, None])  # (B, V), stat
        e = z.exp_()
        s = e.sum(dim=-1)
        loss += torch.where(keep, m.to(stat) + s.log() - x_t.to(stat), 0.0).sum()
        if write_grad:
            e.mul_((1.0 / s)[:, None])  # the softmax
            if buf is not None:
                x.copy_(e)  # rounded once to the logits' dtype
            x[torch.arange(len(t), device=x.device), t] -= 1
    return loss, hits


_CPU_CHUNKS = threading.local()  # this thread's logits buffer for each dtype (``_chunk_buffer``)


def _chunk_buffer(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised (M, Vp) tensor for a chunk of logits. On a CPU, one buffer per thread and
    dtype, kept from call to call: glibc serves every allocation above 32 MiB with fresh pages, and
    faulting in a fresh 128 MiB chunk took 45-50 ms on this project's CPU (a bf16 chunk's logits
    GEMM itself: 36 ms), once per training step and per validation forward. The buffer only lives
    inside one call's forward (nothing returned or saved views it), so reusing it is safe; the
    thread-local keeps concurrent calls apart. Held for the process's life (at most
    LCE_CHUNK_BYTES). Elsewhere (a GPU's caching allocator does this already, and under
    ``torch.compile``) a plain allocation."""
    if device.type != "cpu" or torch.compiler.is_compiling():
        return torch.empty(shape, dtype=dtype, device=device)
    held = getattr(_CPU_CHUNKS, "buffers", None)
    if held is None:
        held = _CPU_CHUNKS.buffers = {}
    numel = shape[0] * shape[1]
    if dtype not in held or held[dtype].numel() < numel:
        with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
            held[dtype] = torch.empty(numel, dtype=dtype)
    return held[dtype][:numel].view(shape)


class _LinearCrossEntropyRef(torch.autograd.Function):
    """Row chunks of logits; dh and dweight computed in the same pass (see linear_cross_entropy_ref)."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, dtype: torch.dtype, need_dh: bool, need_dw: bool):
        N, C = h.shape
        V = weight.shape[0]
        stat = torch.promote_types(dtype, torch.float32)  # softmax statistics, loss, row weights
        w = vocab_padded(weight, dtype)  # (Vp, C), zero rows past V (Vp = V in fp32 on a CPU)
        Vp = w.shape[0]
        counted = targets != ignore_index  # (N,)
        count = counted.sum()
        safe = torch.where(counted, targets, 0)  # ignored rows read logit 0, then count for nothing
        # The gradients made here are the mean loss's: row r weighs counted[r] / count. The weights
        # go into the (M, C) operands of the gradient GEMMs, never over the (M, V) chunk.
        row_weight = counted.to(stat) / count.clamp(min=1)  # (N,)
        loss = h.new_zeros((), dtype=stat)
        correct = torch.zeros((), dtype=torch.int64, device=h.device)
        dh = torch.empty(N, C, dtype=h.dtype, device=h.device) if need_dh else None
        dw_dtype = torch.promote_types(weight.dtype, torch.float32)  # fp32 accumulation across chunks
        dw = torch.zeros(Vp, C, dtype=dw_dtype, device=h.device) if need_dw and N == 0 else None
        rows = max(1, LCE_CHUNK_BYTES // (Vp * w.element_size()))
        # One chunk of logits, reused chunk after chunk and, on a CPU, call after call
        # (``_chunk_buffer``), and the half-precision dW partial likewise.
        buf = _chunk_buffer((min(rows, N), Vp), dtype, h.device)
        part = None
        with torch.autocast(h.device.type, enabled=False):  # every dtype here is chosen explicitly
            for r0 in range(0, N, rows):
                r1 = min(r0 + rows, N)
                hc = h[r0:r1].to(dtype)  # (M, C)
                g = torch.mm(hc, w.t(), out=buf[: r1 - r0])  # (M, Vp) logits, then their gradient in place
                chunk_loss, chunk_correct = _cross_entropy_rows(g[:, :V], safe[r0:r1], counted[r0:r1],
                                                                need_dh or need_dw)
                loss += chunk_loss
                correct += chunk_correct
                rw = row_weight[r0:r1, None]  # (M, 1)
                if need_dh:
                    dh[r0:r1] = (g @ w) * rw  # (M, C)
                if need_dw:  # chunk after chunk in row order: deterministic
                    hw = (h[r0:r1] * rw).to(dtype)  # (M, C), rounded once
                    if dw is None:
                        part = g.t() @ hw  # (Vp, C)
                        dw = part.to(dw_dtype)
                    elif dw.dtype == dtype:
                        dw.addmm_(g.t(), hw)
                    else:  # a half-precision partial (fp32 inside the GEMM), summed in fp32
                        dw += torch.mm(g.t(), hw, out=part)
        ctx.save_for_backward(dh, None if dw is None else dw[:V])
        ctx.dtypes = (h.dtype, weight.dtype)
        ctx.mark_non_differentiable(correct, count)
        return loss / count.clamp(min=1), correct, count

    @staticmethod
    def backward(ctx, dloss, _dcorrect, _dcount):
        dh, dw = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        # The upstream gradient is 1 unless the loss was scaled (gradient accumulation, a loss
        # scaler); then skip the (V, C) multiply -- a free check on a CPU, a sync on a GPU.
        unit = dloss.device.type == "cpu" and not torch.compiler.is_compiling() and dloss.item() == 1.0
        dh = None if dh is None else (dh if unit else dh * dloss).to(h_dtype)
        dw = None if dw is None else (dw if unit else dw * dloss).to(w_dtype)
        return dh, dw, None, None, None, None, None


def _check_lce_args(name: str, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    ignore_index: int) -> None:
    """One-line ValueErrors for inputs ``linear_cross_entropy_ref`` does not take."""
    if h.dim() < 1 or weight.dim() != 2 or h.shape[-1] != weight.shape[1] or weight.shape[0] < 1:
        raise ValueError(f"{name}: need h (..., C) and weight (V, C), got {tuple(h.shape)} and {tuple(weight.shape)}")
    if targets.shape != h.shape[:-1]:
        raise ValueError(f"{name}: targets shape {tuple(targets.shape)} must be h's leading shape {tuple(h.shape[:-1])}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: targets must be int64 or int32, got {targets.dtype}")
    if not (h.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"{name}: h and weight must be floating point, got {h.dtype} and {weight.dtype}")
    if h.device != weight.device or targets.device != h.device:
        raise ValueError(f"{name}: h, weight and targets on different devices "
                         f"({h.device}, {weight.device}, {targets.device})")
    # Range check on CPU only: on CUDA it would cost a host sync per step (the data pipeline checks).
    if targets.device.type == "cpu" and targets.numel() and not torch.compiler.is_compiling():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        if bad.any():
            raise ValueError(f"{name}: target {int(targets[bad][0])} outside the vocabulary "
                             f"[0, {weight.shape[0]}) and not ignore_index ({ignore_index})")


def linear_cross_entropy_ref(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1,
                             dtype: Optional[torch.dtype] = None):
    """Mean cross-entropy of the logits ``h @ weight.T`` against ``targets``, never holding them all.

    h: (..., C) final hidden states; weight: (V, C), the tied embedding; targets: h's leading shape.
    Returns ``(loss, correct, count)`` as ``LMLoss``: the mean loss over targets != ignore_index
    (fp32, fp64 for fp64 inputs; 0 when every target is ignored), how many of those targets are the
    argmax of their logits, and how many there are. "Argmax" is torch's: the first index of the
    maximum, so a target tied with an earlier token counts as wrong -- the token greedy decoding
    would pick.

    The logits are made a chunk of rows at a time (``LCE_CHUNK_BYTES``) in ``dtype`` (default: h's
    and the weight's promoted dtype; the model passes ``lm_head_dtype``), their softmax statistics
    in fp32 (fp64 for fp64). The gradients are made in the same pass, while a chunk of logits is at
    hand: softmax - onehot overwrites the chunk, then dh = G @ W and dW += G.T @ h (each row weighed
    by counted / count; an fp32 accumulator, chunks in order: deterministic); the backward only
    scales them by the upstream gradient. Recomputing the logits in the backward instead would cost a fourth
    (N, V, C) GEMM, a third more head FLOPs, to free the dW accumulator (V x C, the size of the
    weight's own .grad) between forward and backward. Peak memory is one chunk of logits, not (N, V).
    On a GPU and in half precision the GEMMs run over the vocabulary padded with zero weight rows
    (``LCE_VOCAB_MULTIPLE``).
    """
    _check_lce_args("linear_cross_entropy_ref", h, weight, targets, ignore_index)
    if dtype is None:
        dtype = torch.promote_types(h.dtype, weight.dtype)
    grad = torch.is_grad_enabled()  # (an autograd.Function's forward sees requires_grad even under no_grad)
    return _LinearCrossEntropyRef.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), int(ignore_index),
                                        dtype, grad and h.requires_grad, grad and weight.requires_grad)


# ----------------------------------------------------------------------------------------------
# The ops tables
# ----------------------------------------------------------------------------------------------


class Ops(NamedTuple):
    """The hot ops of one implementation, with the signatures the model calls."""

    name: str
    layer_norm: Callable  # (x, weight, bias, eps, out_dtype=None) -> y
    # (x, residual, weight, bias, eps, out_dtype=None, dropout_p=0.0) -> (LN(x' + residual), x' + residual)
    # with x' = dropout(x, dropout_p), as add_layer_norm_ref
    add_layer_norm: Callable
    attention: Callable  # (q, k, v, scale=None, kv_start=None, kv_len=None, dropout_p=0.0) -> y, as causal_attention_ref
    # (h, weight, targets, ignore_index=-1, dtype=None) -> (loss, correct, count), as linear_cross_entropy_ref
    linear_cross_entropy: Callable
    # (qkv (B, T, 3, nh, hs), dropout_p=0.0) -> y (B, nh, T, hs): ``attention`` of the fused
    # projection's q, k, v without a cache, with qkv's gradient made in one piece; None: the model
    # calls ``attention`` on the three views (whose gradients autograd then stacks, a copy)
    attention_qkv: Optional[Callable] = None
    # (u, bias) -> gelu(u + bias) (tanh), the MLP's first Linear run without its bias, with the bias
    # gradient made in the GELU backward's pass; None: the Linear adds its bias, then F.gelu
    bias_gelu: Optional[Callable] = None


TORCH_OPS = Ops("torch", layer_norm_ref, add_layer_norm_ref, causal_attention_torch, linear_cross_entropy_ref)


@functools.cache
def triton_ops() -> Ops:
    """The Triton kernels, imported on first use (so the reference path never needs triton)."""
    import kernels

    def attention(q, k, v, scale=None, kv_start=None, kv_len=None, dropout_p: float = 0.0):
        if kv_len is not None:  # the static decode step (inference: no dropout): split-K over the fixed cache
            return kernels.decode_attention(q, k, v, kv_len, kv_start=kv_start, scale=scale)
        return kernels.causal_attention(q, k, v, scale=scale, kv_start=kv_start, dropout_p=dropout_p)

    return Ops("triton", kernels.layer_norm, kernels.add_layer_norm, attention, kernels.linear_cross_entropy,
               kernels.causal_attention_qkv, kernels.bias_gelu)


def resolve_impl(impl: str, device: torch.device, config=None, training: bool = True) -> str:
    """"torch" or "triton" for ``impl`` on ``device``. "auto": Triton on CUDA where the kernels cover
    the model (``config``, a ``GPTConfig``: a supported head dim, and in ``training`` with attention
    dropout a Hopper GPU), torch elsewhere, so a model the kernels cannot run still runs (e.g. the
    tiny preset's head dim 8)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if torch.device(device).type != "cuda":
            return "torch"
        return "triton" if config is None or triton_covers(config, device, training) else "torch"
    return impl


def triton_covers(config, device, training: bool = True) -> bool:
    """Whether the Triton kernels run this model (a ``GPTConfig``) on ``device``: a head dim they
    have, and for training with attention dropout a device whose kernels draw it
    (``kernels.attention.dropout_supported``; evaluation and decoding draw none)."""
    from kernels.attention import SUPPORTED_HEAD_DIMS, dropout_supported

    return config.head_dim in SUPPORTED_HEAD_DIMS and (
        not training or config.attn_dropout == 0 or dropout_supported(device))


def select_ops(impl: str | Ops, device: torch.device, config=None, training: bool = True) -> Ops:
    """The one place that maps ``impl`` to an implementation of every hot op (``training``: whether
    the forward applies dropout, which "auto" weighs with ``config``, see ``resolve_impl``).

    An ``Ops`` table is returned as is: tests mix implementations that way, e.g.
    ``TORCH_OPS._replace(name="attn-triton", attention=triton_ops().attention)``.
    """
    if isinstance(impl, Ops):
        return impl
    return triton_ops() if resolve_impl(impl, device, config, training) == "triton" else TORCH_OPS
