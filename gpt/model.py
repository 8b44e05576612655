"""GPT-2 decoder: a plain-PyTorch reference path and a Triton fast path, chosen in one place.

The architecture is OpenAI's GPT-2 (pre-LayerNorm blocks, learned positions, tanh-GELU MLP, final
LayerNorm, LM head tied to the token embedding, biases everywhere), with parameter names that map
one-to-one onto ``transformers.GPT2LMHeadModel`` (see ``gpt/hf.py``).

The three hot ops -- LayerNorm, residual add fused with LayerNorm, and causal attention -- are
looked up through ``select_ops(impl, device)``. ``impl="torch"`` gives the readable reference math
below; ``impl="triton"`` gives the kernels in ``kernels/``; ``impl="auto"`` picks Triton on CUDA
and torch elsewhere. ``model.impl`` can be changed at any time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig

IMPLS = ("auto", "torch", "triton")


# ----------------------------------------------------------------------------------------------
# Reference ops: written to be read, and the float64-checkable definition of what kernels compute.
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


def attention_mask(Tq: int, Tk: int, device, kv_start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean mask of allowed (query, key) pairs: key j <= i + (Tk - Tq), and j >= kv_start[b].

    Shape (Tq, Tk), or (B, 1, Tq, Tk) with kv_start (left-padded batches: keys before a row's
    start are padding).
    """
    i = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)
    j = torch.arange(Tk, device=device)[None, :]
    allowed = j <= i  # (Tq, Tk)
    if kv_start is not None:
        allowed = allowed & (j >= kv_start.view(-1, 1, 1, 1))  # (B, 1, Tq, Tk)
    return allowed


def causal_attention_ref(q, k, v, scale=None, kv_start=None, dropout_p: float = 0.0):
    """Explicit causal softmax attention.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D) with Tk >= Tq. Query i sits at absolute position
    i + (Tk - Tq), so Tq == Tk is ordinary causal attention and Tq == 1 is one decode step against
    a cache. Rows with no allowed key (padding queries) output zeros.
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    att = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    allowed = attention_mask(Tq, Tk, q.device, kv_start)
    att = att.masked_fill(~allowed, float("-inf"))
    att = torch.softmax(att.float(), dim=-1).to(q.dtype)
    att = torch.nan_to_num(att, nan=0.0)  # fully masked rows -> 0
    if dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p, training=True)
    return att @ v  # (B, H, Tq, D)


class Ops(NamedTuple):
    """The hot ops of one implementation, with the signatures the model calls."""

    name: str
    layer_norm: Callable  # (x, weight, bias, eps) -> y
    add_layer_norm: Callable  # (x, residual, weight, bias, eps) -> (LN(x + residual), x + residual)
    attention: Callable  # (q, k, v, scale=None, kv_start=None) -> y, shapes as causal_attention_ref


TORCH_OPS = Ops("torch", layer_norm_ref, add_layer_norm_ref, causal_attention_ref)


def triton_ops() -> Ops:
    """The Triton kernels (imported lazily so the reference path never needs triton)."""
    import kernels

    return Ops("triton", kernels.layer_norm, kernels.add_layer_norm, kernels.causal_attention)


def select_ops(impl: str, device: torch.device) -> Ops:
    """The one place that maps ``impl`` to an implementation of every hot op."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if device.type == "cuda" else "torch"
    return triton_ops() if impl == "triton" else TORCH_OPS


# ----------------------------------------------------------------------------------------------
# KV cache: static, preallocated, written in place by prefill and decode.
# ----------------------------------------------------------------------------------------------


@dataclass
class KVCache:
    """Keys and values of every layer for ``batch_size`` sequences of up to ``max_len`` tokens.

    ``pos`` is the number of positions already written (a host int: no device sync to read it).
    ``start[b]`` is the first real position of row b in a left-padded batch (zeros if unpadded):
    keys before it are masked and positions count from it.
    """

    k: torch.Tensor  # (L, B, H, max_len, D)
    v: torch.Tensor  # (L, B, H, max_len, D)
    start: torch.Tensor  # (B,) int64
    pos: int = 0

    @classmethod
    def allocate(cls, config: GPTConfig, batch_size: int, device, dtype, max_len: Optional[int] = None):
        max_len = config.max_seq_length if max_len is None else max_len
        if not 1 <= max_len <= config.max_seq_length:
            raise ValueError(f"cache length {max_len} must be in [1, {config.max_seq_length}]")
        shape = (config.num_layers, batch_size, config.num_heads, max_len, config.head_dim)
        return cls(
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(batch_size, device=device, dtype=torch.int64),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, T, D) at [pos, pos + T) of ``layer``; return views of [0, pos + T)."""
        T = k.shape[2]
        end = self.pos + T
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class LayerNormParams(nn.Module):
    """LayerNorm's parameters only; the math is the selected implementation's."""

    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))
        self.eps = eps


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model)  # fused q, k, v projection
        self.c_proj = nn.Linear(config.d_model, config.d_model)
        self.attn_dropout = config.attn_dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, ops: Ops, cache: Optional[KVCache], layer: int):
        B, T, C = x.shape
        H = self.num_heads
        qkv = self.c_attn(x).view(B, T, 3, H, C // H)  # (B, T, 3, nh, hs)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, nh, T, hs), strided views
        kv_start = None
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, pos + T, hs)
            kv_start = cache.start
        if ops is TORCH_OPS:
            p = self.attn_dropout if self.training else 0.0
            y = causal_attention_ref(q, k, v, kv_start=kv_start, dropout_p=p)
        else:
            if self.training and self.attn_dropout > 0.0:
                raise ValueError(
                    f"attention dropout {self.attn_dropout} is not supported by impl={ops.name!r}; "
                    "set attn_dropout=0 or use impl='torch'"
                )
            y = ops.attention(q, k, v, kv_start=kv_start)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.d_ff)
        self.c_proj = nn.Linear(config.d_ff, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then + mlp(ln_2(.)). The adds are fused into the next LN."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNormParams(config.d_model, config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNormParams(config.d_model, config.layer_norm_eps)
        self.mlp = MLP(config)


class LMLoss(NamedTuple):
    loss: torch.Tensor  # mean cross-entropy over counted targets (0-d, fp32)
    correct: torch.Tensor  # number of counted targets that are the argmax prediction (0-d)
    count: torch.Tensor  # number of counted targets (targets != ignore_index) (0-d)


class GPT2Model(nn.Module):
    """GPT-2. ``GPT2Model(config)`` or the seed's ``GPT2Model(vocab_size=..., d_model=..., ...)``."""

    def __init__(self, config: Optional[GPTConfig] = None, *, impl: str = "auto", **kwargs):
        super().__init__()
        if config is None:
            config = GPTConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a GPTConfig or keyword sizes, not both")
        self.config = config
        self.impl = impl
        self.wte = nn.Embedding(config.vocab_size, config.d_model)  # also the LM head (tied)
        self.wpe = nn.Embedding(config.max_seq_length, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = LayerNormParams(config.d_model, config.layer_norm_eps)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: residual projections scaled by 1/sqrt(2L)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {value!r}")
        self._impl = value

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_input(self, idx: torch.Tensor, cache: Optional[KVCache]) -> None:
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, time), got shape {tuple(idx.shape)}")
        T = idx.shape[1]
        limit = self.config.max_seq_length if cache is None else cache.max_len - cache.pos
        if T > limit:
            raise ValueError(f"sequence of {T} tokens exceeds the context limit of {limit}")
        if T == 0:
            raise ValueError("empty sequence: need at least 1 token")
        # Range check on CPU tensors (free); on CUDA it would cost a host sync per step, so callers
        # holding host data (the sampler, the data pipeline) check there instead.
        if idx.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} outside the vocabulary [0, {self.config.vocab_size})")

    def hidden_states(self, idx: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        """Final-LayerNorm output (B, T, d_model). With a cache, idx continues at ``cache.pos``."""
        self._check_input(idx, cache)
        ops = select_ops(self.impl, idx.device)
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        if cache is not None:
            pos = (pos + cache.pos)[None, :] - cache.start[:, None]  # (B, T), per-row offsets
            pos = pos.clamp_(min=0)  # padding slots of left-padded rows
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        blocks = list(self.h)
        first = blocks[0].ln_1
        h = ops.layer_norm(x, first.weight, first.bias, first.eps)
        for i, block in enumerate(blocks):
            a = block.attn(h, ops, cache, i)
            h, x = ops.add_layer_norm(a, x, block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
            m = block.mlp(h)
            nxt = blocks[i + 1].ln_1 if i + 1 < len(blocks) else self.ln_f
            h, x = ops.add_layer_norm(m, x, nxt.weight, nxt.bias, nxt.eps)
        if cache is not None:
            cache.pos += T
        return h

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                cache: Optional[KVCache] = None, ignore_index: int = -1):
        """Logits (B, T, vocab) when targets is None; else ``LMLoss`` over targets != ignore_index."""
        h = self.hidden_states(idx, cache)
        logits = F.linear(h, self.wte.weight)  # (B, T, vocab), tied head
        if targets is None:
            return logits
        flat_t = targets.reshape(-1)
        flat = logits.reshape(-1, logits.shape[-1])
        loss = F.cross_entropy(flat, flat_t, ignore_index=ignore_index)  # fp32 math under autocast
        counted = flat_t != ignore_index
        correct = ((flat.argmax(-1) == flat_t) & counted).sum()
        return LMLoss(loss, correct, counted.sum())
