"""The seed project's model and training recipe, rewritten from its description as a peer to measure against.

Model: post-LN blocks (``x = LN(x + drop(attn(x)))``, then the same around the MLP), sinusoidal
positions added to token embeddings scaled by sqrt(d_model), dropout 0.1, q/k/v/o projections without
bias, exact-GELU MLP, a final LayerNorm, LM head tied to the token embedding.

Recipe: every story on its own row, truncated/padded to 256 tokens with EOS (``gpt.data.story_rows``); the loss ignores token id
0 -- as the seed did. Token 0 is "!" in GPT-2's vocabulary and the padding is EOS (50256), so the seed
trained on padding (predicting EOS after EOS) and never on "!". Reproduced faithfully here. Batch 4 x
accumulation 8, AdamW (lr 2e-4, weight decay 0.01 on every parameter, betas (0.9, 0.95)), 500 warmup
steps then cosine to 0, gradient clipping at 1.0.

Initialisation is not part of the description. PyTorch's defaults (N(0, 1) embeddings, scaled by
sqrt(d_model) and tied to the head) make a fresh model predict its input token with a logit near
d_model, an initial loss of hundreds of nats: a handicap the seed may not have had. To keep the
comparison fair to the seed, embeddings and linear weights start from GPT-2's N(0, 0.02) instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.data import SEED_IGNORE_INDEX
from gpt.model import LMLoss


@dataclass(frozen=True)
class SeedRecipe:
    seq_len: int = 256
    batch_size: int = 4
    grad_accum: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.95)
    warmup_steps: int = 500
    grad_clip: float = 1.0


def sinusoidal_positions(length: int, d_model: int) -> torch.Tensor:
    """The Transformer paper's table: sin on even features, cos on odd ones. (length, d_model)"""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


class SeedAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        H = self.num_heads
        q, k, v = (p(x).view(B, T, H, C // H).transpose(1, 2) for p in (self.q, self.k, self.v))  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // H)  # (B, nh, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = torch.softmax(att.masked_fill(~causal, float("-inf")), dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(B, T, C))


class SeedBlock(nn.Module):
    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.attn = SeedAttention(d_model, num_heads)
        self.ln1 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.ln2 = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = self.ln1(x + self.drop(self.attn(x)))
        return self.ln2(x + self.drop(self.mlp(x)))


class SeedGPT(nn.Module):
    """The seed's decoder. ``model(idx, targets, ignore_index=...)`` returns an ``LMLoss`` like ours;
    ``seed_loss(model)`` is the seed's training loss (ignoring ``SEED_IGNORE_INDEX``)."""

    def __init__(self, vocab_size: int = 50257, d_model: int = 512, num_heads: int = 8, num_layers: int = 6,
                 d_ff: int = 2048, max_len: int = 1024, dropout: float = 0.1):
        super().__init__()
        self.d_model = d_model
        self.embed = nn.Embedding(vocab_size, d_model)  # also the LM head (tied)
        self.register_buffer("pos", sinusoidal_positions(max_len, d_model), persistent=False)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(SeedBlock(d_model, num_heads, d_ff, dropout) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(d_model)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, ignore_index: int = -1):
        T = idx.shape[1]
        x = self.drop(self.embed(idx) * math.sqrt(self.d_model) + self.pos[:T])  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.embed.weight)  # (B, T, vocab)
        if targets is None:
            return logits
        flat_t = targets.reshape(-1)
        flat = logits.reshape(-1, logits.shape[-1])
        counted = flat_t != ignore_index
        loss = F.cross_entropy(flat.float(), flat_t, ignore_index=ignore_index)
        return LMLoss(loss, ((flat.argmax(-1) == flat_t) & counted).sum(), counted.sum())


class SeedBatches:
    """Shuffled story rows, epoch after epoch: x = row[:-1], y = row[1:] (the seed's shift)."""

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int = 0):
        self.rows, self.batch_size = torch.from_numpy(rows), batch_size
        self.rng = np.random.default_rng(seed)
        self.order, self.pos = self.rng.permutation(len(rows)), 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.batch_size > len(self.order):
            self.order, self.pos = self.rng.permutation(len(self.rows)), 0
        batch = self.rows[self.order[self.pos:self.pos + self.batch_size]]
        self.pos += self.batch_size
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


def seed_optimizer(model: nn.Module, recipe: SeedRecipe = SeedRecipe()) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, betas=recipe.betas)


def seed_lr(step: int, total_steps: int, recipe: SeedRecipe = SeedRecipe()) -> float:
    """Linear warmup over 500 steps, then cosine to 0 at ``total_steps``."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = min(1.0, (step - recipe.warmup_steps) / max(1, total_steps - recipe.warmup_steps))
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * progress))


def seed_loss(model: SeedGPT):
    """``model`` as the seed trained it: ``(x, y) -> LMLoss`` ignoring target id 0, for ``train_step``."""
    return lambda x, y: model(x, y, ignore_index=SEED_IGNORE_INDEX)
