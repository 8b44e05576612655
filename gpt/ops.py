"""The model's hot ops: plain-PyTorch reference math, and the table that picks an implementation.

Every op here has a Triton kernel in ``kernels/`` with the same signature and semantics; the
reference is the definition the kernels are tested against (in float64) and the path that runs on a
CPU. ``select_ops(impl, device)`` is the one place that maps ``impl`` ("torch", "triton", or
"auto": Triton on CUDA, torch elsewhere) to an ``Ops`` table; both tables are built once.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

IMPLS = ("auto", "torch", "triton")


# ----------------------------------------------------------------------------------------------
# Reference math: written to be read, and the float64-checkable definition of what kernels compute.
# ----------------------------------------------------------------------------------------------


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim, statistics in fp32 (or higher), output in x's dtype."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    mean = xf.mean(dim=-1, keepdim=True)
    var = ((xf - mean) ** 2).mean(dim=-1, keepdim=True)  # biased variance, as LayerNorm uses
    y = (xf - mean) * torch.rsqrt(var + eps)
    return (y * weight.to(y.dtype) + bias.to(y.dtype)).to(x.dtype)


def add_layer_norm_ref(x, residual, weight, bias, eps):
    """The pre-LN block's residual add and the next LayerNorm: returns (LN(x + residual), x + residual)."""
    s = x + residual
    return layer_norm_ref(s, weight, bias, eps), s


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


def layer_norm_fused(x, weight, bias, eps):
    """``layer_norm_ref`` as one ATen kernel (same fp32 statistics, same output dtype)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_layer_norm_fused(x, residual, weight, bias, eps):
    s = x + residual
    return layer_norm_fused(s, weight, bias, eps), s


def causal_attention_fused(q, k, v, scale=None, kv_start=None, kv_len=None, dropout_p: float = 0.0):
    """``causal_attention_ref`` through ``F.scaled_dot_product_attention`` (one fused kernel; fully
    masked rows give zeros there too). One query without a mask needs no causal mask at all."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    mask, causal = None, False
    if kv_start is not None or kv_len is not None:
        mask = attention_mask(Tq, Tk, q.device, kv_start, kv_len)
    elif Tq == Tk:
        causal = Tq > 1
    elif Tq > 1:
        mask = attention_mask(Tq, Tk, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale)


# ----------------------------------------------------------------------------------------------
# The ops tables
# ----------------------------------------------------------------------------------------------


class Ops(NamedTuple):
    """The hot ops of one implementation, with the signatures the model calls."""

    name: str
    layer_norm: Callable  # (x, weight, bias, eps) -> y
    add_layer_norm: Callable  # (x, residual, weight, bias, eps) -> (LN(x + residual), x + residual)
    attention: Callable  # (q, k, v, scale=None, kv_start=None, kv_len=None, dropout_p=0.0) -> y, as causal_attention_ref


TORCH_OPS = Ops("torch", layer_norm_ref, add_layer_norm_ref, causal_attention_ref)
# The same math as fused ATen kernels: fewer, larger ops for CPU decoding, where each small op's
# dispatch is a visible share of a token's time. Checked against TORCH_OPS in tests/test_generate.py.
TORCH_FUSED_OPS = TORCH_OPS._replace(name="torch-fused", layer_norm=layer_norm_fused,
                                     add_layer_norm=add_layer_norm_fused, attention=causal_attention_fused)


@functools.cache
def triton_ops() -> Ops:
    """The Triton kernels, imported on first use (so the reference path never needs triton)."""
    import kernels

    def attention(q, k, v, scale=None, kv_start=None, kv_len=None, dropout_p: float = 0.0):
        if dropout_p > 0.0:  # the kernel has no dropout: refuse rather than silently skip it
            raise ValueError(f"attention dropout {dropout_p} is not supported by impl='triton'; "
                             "set attn_dropout=0 or use impl='torch'")
        if kv_len is not None:  # the static decode step: split-K over the fixed cache
            return kernels.decode_attention(q, k, v, kv_len, kv_start=kv_start, scale=scale)
        return kernels.causal_attention(q, k, v, scale=scale, kv_start=kv_start)

    return Ops("triton", kernels.layer_norm, kernels.add_layer_norm, attention)


def resolve_impl(impl: str, device: torch.device) -> str:
    """"torch" or "triton" for ``impl`` on ``device`` ("auto": Triton on CUDA, torch elsewhere)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    return impl


def select_ops(impl: str | Ops, device: torch.device) -> Ops:
    """The one place that maps ``impl`` to an implementation of every hot op.

    An ``Ops`` table is returned as is: tests mix implementations that way, e.g.
    ``TORCH_OPS._replace(name="attn-triton", attention=triton_ops().attention)``.
    """
    if isinstance(impl, Ops):
        return impl
    return triton_ops() if resolve_impl(impl, device) == "triton" else TORCH_OPS
