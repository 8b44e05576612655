"""The KV cache the sampler decodes against: static, preallocated, written in place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import GPTConfig


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
