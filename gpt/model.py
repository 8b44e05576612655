"""GPT-2 decoder (the model only; its hot ops live in ``gpt/ops.py``, the KV cache in ``gpt/kvcache.py``).

The architecture is OpenAI's GPT-2 (pre-LayerNorm blocks, learned positions, tanh-GELU MLP, final
LayerNorm, LM head tied to the token embedding, biases everywhere), with parameter names that map
one-to-one onto ``transformers.GPT2LMHeadModel`` (see ``gpt/hf.py``).

The hot ops -- LayerNorm, residual add fused with LayerNorm (and the branch's dropout), causal
attention, the MLP's bias + GELU and the LM head with its loss -- come from
``select_ops(model.impl, device)``: ``"torch"`` is the readable reference math, ``"triton"`` the
kernels in ``kernels/``, ``"auto"`` Triton on CUDA and torch elsewhere. ``model.impl`` can be
changed at any time.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig
from .kvcache import KVCache
from .ops import IMPLS, Ops, compute_dtype, lm_head_dtype, select_ops

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

    def forward(self, x: torch.Tensor, ops: Ops, cache: Optional[KVCache] = None, layer: int = 0,
                static: bool = False) -> torch.Tensor:
        B, T, C = x.shape
        H = self.num_heads
        qkv = self.c_attn(x).view(B, T, 3, H, C // H)  # (B, T, 3, nh, hs)
        p = self.attn_dropout if self.training else 0.0
        if cache is None and ops.attention_qkv is not None:  # training, scoring: qkv's grad in one piece
            y = ops.attention_qkv(qkv, dropout_p=p)  # (B, nh, T, hs)
        else:
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, nh, T, hs), strided views
            kv_start = kv_len = None
            if static:  # one token per row at the device position: the whole cache, masked by length
                k, v, kv_len = cache.write(layer, k, v)  # (B, nh, max_len, hs), (1,)
                kv_start = cache.start
            elif cache is not None:
                k, v = cache.update(layer, k, v)  # (B, nh, pos + T, hs)
                kv_start = cache.start
            y = ops.attention(q, k, v, kv_start=kv_start, kv_len=kv_len, dropout_p=p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.c_proj(y)  # (its dropout is the next add + LayerNorm's)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.d_ff)
        self.c_proj = nn.Linear(config.d_ff, config.d_model)

    def forward(self, x: torch.Tensor, ops: Optional[Ops] = None) -> torch.Tensor:
        # A decoding form of the Linear (gpt.quantize.Int8Linear, gpt.generate.RowLinear) keeps its forward.
        if ops is None or ops.bias_gelu is None or type(self.c_fc) is not nn.Linear:
            h = F.gelu(self.c_fc(x), approximate="tanh")  # (B, T, d_ff)
        else:  # the bias added, and its gradient made, in the GELU's own passes
            h = ops.bias_gelu(F.linear(x, self.c_fc.weight), self.c_fc.bias)
        return self.c_proj(h)  # (its dropout is the next add + LayerNorm's)


class Block(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then + mlp(ln_2(.)), with each residual add fused into a LayerNorm.

    ``forward(x, delta)`` takes the residual stream ``x`` and the previous block's output ``delta``
    not yet added to it (None for the first block), and returns this block's ``(delta, x)`` in the
    same form: the block's output is ``x + dropout(delta)``. Carrying the add over to the next
    LayerNorm (``add_layer_norm``) reads and writes the residual stream once per LayerNorm instead
    of twice, and keeps every block a self-contained module (per-block checkpointing, regional
    compile, tests). The branches' dropout (GPT-2's on the attention and MLP outputs) is applied by
    that add + LayerNorm too: the Triton kernel draws the mask itself, in the same pass.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNormParams(config.d_model, config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNormParams(config.d_model, config.layer_norm_eps)
        self.mlp = MLP(config)
        self.dropout = config.dropout  # on the attention's and the MLP's outputs, in training

    def forward(self, x: torch.Tensor, delta: Optional[torch.Tensor], ops: Ops,
                cache: Optional[KVCache] = None, layer: int = 0, static: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        act = compute_dtype(x.device.type)  # under autocast: the LayerNorms write what the Linears read
        p = self.dropout if self.training else 0.0
        if delta is None:
            h = ops.layer_norm(x, self.ln_1.weight, self.ln_1.bias, self.ln_1.eps, act)
        else:
            h, x = ops.add_layer_norm(delta, x, self.ln_1.weight, self.ln_1.bias, self.ln_1.eps, act, p)
        a = self.attn(h, ops, cache, layer, static)
        h, x = ops.add_layer_norm(a, x, self.ln_2.weight, self.ln_2.bias, self.ln_2.eps, act, p)
        return self.mlp(h, ops), x


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
        target = torch.get_default_device()  # where the weights go: the CPU, or a ``with torch.device(...)``'s
        # Shapes first, on the meta device, then one allocation and one draw a weight (``_draw_weights``):
        # the modules' own initialisations (nn.Linear's kaiming draws) would all be overwritten. On
        # this project's CPU the gpt2 preset builds in 0.53-0.78 s so, against 1.19-1.45 s with them
        # (the seed preset: 0.24-0.28 s against 0.35-0.43). The embeddings skip theirs even on the
        # meta device, where a normal_ imports torch._dynamo (~1.3 s).
        with torch.device("meta"):
            self.wte = nn.Embedding(config.vocab_size, config.d_model,  # also the LM head (tied)
                                    _weight=torch.empty(config.vocab_size, config.d_model))
            self.wpe = nn.Embedding(config.max_seq_length, config.d_model,
                                    _weight=torch.empty(config.max_seq_length, config.d_model))
            self.drop = nn.Dropout(config.dropout)
            self.h = nn.ModuleList(Block(config) for _ in range(config.num_layers))
            self.ln_f = LayerNormParams(config.d_model, config.layer_norm_eps)
        if target.type == "meta":  # shapes only (``GPT2Model.uninitialized``)
            return
        self._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=target))
        self._draw_weights()

    @classmethod
    def uninitialized(cls, config: GPTConfig, *, impl: str = "auto", device: torch.device | str = "cpu") -> GPT2Model:
        """A model whose weights are allocated on ``device`` but hold no values yet, for loading
        weights into at once (``gpt.checkpoint``, ``gpt.hf``): no random draws, so ~30x faster to
        build than ``GPT2Model(config)`` (0.007-0.010 s against 0.24-0.28 s at the seed's size on this
        project's 2-core CPU)."""
        with torch.device("meta"):
            model = cls(config, impl=impl)
        # (``to_empty`` would do, but its meta ``empty_like`` imports sympy on first use: ~0.8 s)
        return model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))

    @torch.no_grad()
    def _draw_weights(self) -> None:
        """GPT-2's initialisation, each parameter written once, in module order: Normal(0, 0.02)
        embeddings and Linear weights, the residual projections (c_proj) Normal(0, 0.02 / sqrt(2L)),
        zero biases, unit LayerNorm weights."""
        proj_std = 0.02 / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, proj_std if name.endswith("c_proj") else 0.02)
                module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 0.02)
            elif isinstance(module, LayerNormParams):
                module.weight.fill_(1.0)
                module.bias.zero_()

    @property
    def impl(self) -> str | Ops:
        return self._impl

    @impl.setter
    def impl(self, value: str | Ops) -> None:
        if not isinstance(value, Ops) and value not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS} (or an Ops table), got {value!r}")
        self._impl = value

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_input(self, idx: torch.Tensor, cache: Optional[KVCache], static: bool = False) -> None:
        if static:  # the sampler's own tokens: no range check (4 ops of a ~150-op step)
            if cache is None or idx.dim() != 2 or idx.shape[1] != 1:
                raise ValueError(f"a static decode step takes one token per row (B, 1) and a cache, got "
                                 f"shape {tuple(idx.shape)}")
            if not torch.compiler.is_compiling() and cache.pos >= cache.max_len:  # (the host position
                raise ValueError(f"the cache is full ({cache.max_len} tokens)")  # would specialise a graph)
            return
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

    def hidden_states(self, idx: torch.Tensor, cache: Optional[KVCache] = None, *,
                      static: bool = False) -> torch.Tensor:
        """Final-LayerNorm output (B, T, d_model). With a cache, idx continues at ``cache.pos``.

        ``static=True`` is the decode step: one token per row (B, 1) at the cache's device position
        ``cache.length``, attending to the whole fixed-size cache masked by length. It reads and
        writes device tensors only (same shapes every call: compile it, capture it in a CUDA
        graph) and advances ``cache.length``; the caller adds 1 to the host ``cache.pos``.
        """
        self._check_input(idx, cache, static)
        ops = select_ops(self.impl, idx.device, self.config, self.training)
        B, T = idx.shape
        if static:
            pos = cache.length.view(1, 1)  # (1, 1)
        else:
            pos = torch.arange(T, device=idx.device)
            if cache is not None:
                pos = (pos + cache.pos)[None, :]  # (1, T)
        if cache is not None and cache.start is not None:
            pos = (pos - cache.start[:, None]).clamp_(min=0)  # (B, T) per-row offsets; 0 on padding slots
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        delta = None
        for layer, block in enumerate(self.h):
            delta, x = block(x, delta, ops, cache, layer, static)
        h, _ = ops.add_layer_norm(delta, x, self.ln_f.weight, self.ln_f.bias, self.ln_f.eps,
                                  compute_dtype(x.device.type),  # the head's dtype under autocast
                                  self.config.dropout if self.training else 0.0)  # the last MLP's dropout
        if static:
            cache.length += 1
        elif cache is not None:
            cache.reset(cache.pos + T)
        return h

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                cache: Optional[KVCache] = None, ignore_index: int = -1):
        """Logits (B, T, vocab) when targets is None; else ``LMLoss`` over targets != ignore_index.

        With targets the tied head and the cross-entropy are one op (``ops.linear_cross_entropy``):
        the (B * T, vocab) logits are never held at once, only a chunk of rows at a time, and the
        head computes in the autocast dtype as ``F.linear`` would (see ``gpt.ops.lm_head_dtype``).
        """
        h = self.hidden_states(idx, cache)  # (B, T, C)
        weight = self.wte.weight  # (vocab, C), tied head
        if targets is None:
            return F.linear(h, weight)  # (B, T, vocab)
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must match idx shape {tuple(idx.shape)}")
        ops = select_ops(self.impl, idx.device, self.config, self.training)
        return LMLoss(*ops.linear_cross_entropy(h, weight, targets, ignore_index, lm_head_dtype(h, weight)))
