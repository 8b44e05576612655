"""The KV cache the sampler decodes against: static (fixed shapes, allocated once, written in place)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import GPTConfig


@dataclass
class KVCache:
    """Keys and values of every layer for ``batch_size`` sequences of up to ``max_len`` tokens.

    Two ways in, like gpt-fast's prefill and decode step:

    * ``update`` (prefill, chunked prefill): T tokens per row at the host position ``pos``; the
      attention sees the slice [0, pos + T), whose length the host knows without asking the device.
    * ``write`` (the static decode step): one token per row at the device position ``length``; the
      attention reads the whole fixed-size cache and masks it by ``length`` (and ``start``). Same
      shapes and no host state every call, so the step can be compiled and captured in a CUDA
      graph. The caller advances the host ``pos`` (``GPT2Model.hidden_states(static=True)`` says how).

    ``start[b]`` is the first real slot of row b in a left-padded batch: earlier keys are masked and
    positions count from it. ``start`` is None for a batch without padding (``padded=False``), and
    the attention then takes its unmasked path.
    """

    k: torch.Tensor  # (L, B, H, max_len, D)
    v: torch.Tensor  # (L, B, H, max_len, D)
    start: Optional[torch.Tensor]  # (B,) int64, or None: no row is padded
    length: torch.Tensor  # (1,) int64: slots written, on the device (what the static step reads)
    pos: int = 0  # slots written, on the host (what prefill reads; kept equal to ``length``)

    @classmethod
    def allocate(cls, config: GPTConfig, batch_size: int, device, dtype, max_len: Optional[int] = None,
                 padded: bool = True):
        max_len = config.max_seq_length if max_len is None else max_len
        if not 1 <= max_len <= config.max_seq_length:
            raise ValueError(f"cache length {max_len} must be in [1, {config.max_seq_length}]")
        shape = (config.num_layers, batch_size, config.num_heads, max_len, config.head_dim)
        return cls(
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(batch_size, device=device, dtype=torch.int64) if padded else None,
            torch.zeros(1, device=device, dtype=torch.int64),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def tensors(self) -> list[torch.Tensor]:
        """The device tensors a compiled decode step mutates or reads (to mark them static)."""
        return [t for t in (self.k, self.v, self.start, self.length) if t is not None]

    def reset(self, pos: int = 0) -> None:
        """Forget everything after slot ``pos`` (host and device positions)."""
        self.pos = pos
        self.length.fill_(pos)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, T, D) at [pos, pos + T) of ``layer``; return views of [0, pos + T)."""
        T = k.shape[2]
        end = self.pos + T
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, 1, D) of ``layer`` at slot ``length``; return the whole caches of the layer
        (B, H, max_len, D) and the number of valid slots, ``length + 1`` (1,)."""
        self.k[layer].index_copy_(2, self.length, k)
        self.v[layer].index_copy_(2, self.length, v)
        return self.k[layer], self.v[layer], self.length + 1
