"""Weight-only int8 for decoding: every linear layer and the LM head, per-output-channel scales.

Batch-1 decoding reads every weight once per token, so its speed is weight bytes over memory
bandwidth: int8 weights are a quarter of fp32's bytes. Activations stay in floating point.

Quantisation (symmetric, round to nearest): ``scale[n] = max_k |W[n, k]| / 127`` and
``W_q = round(W / scale)`` in [-127, 127], so each output channel keeps its own range.
``Int8Linear(x) = (x @ W_q.T) * scale + bias``:

* CPU: ``torch.ops.aten._weight_int8pack_mm`` (what gpt-fast uses), which needs bf16 activations
  for its vectorised kernel (fp32 ones take a scalar path about ten times slower) and a reduction
  dim that is a multiple of 16 (other sizes give wrong results in torch 2.13). It runs with unit
  scales and the fp32 scales are applied after it, so only x and the product are rounded to bf16.
  Other sizes and devices: ``F.linear(x, W_q.to(x.dtype)) * scale``, the form ``torch.compile``
  fuses into one kernel on a GPU.

Applied to a decode copy of a model at load time (``gpt.generate.Decoder``), never to the caller's.
The quality bound (test-split perplexity within 1% of fp32) is checked in ``tests/test_quantize.py``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_PACK_MULTIPLE = 16  # _weight_int8pack_mm's reduction dim must be a multiple of this


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_q int8 (N, K) contiguous, scale fp32 (N,)) of a weight (N, K), per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (N,); an all-zero row stays zero
    w_q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    return w_q, scale


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (N, K), fp32 per-output-channel scales and an fp32 bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        w_q, scale = quantize_int8(weight)
        self.register_buffer("weight", w_q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("unit", torch.ones(w_q.shape[0], dtype=torch.bfloat16, device=w_q.device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, K = self.weight.shape
        if x.device.type == "cpu" and K % _PACK_MULTIPLE == 0:
            flat = x.reshape(-1, K).to(torch.bfloat16)  # (M, K)
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.unit).view(*x.shape[:-1], N)
        else:
            y = F.linear(x, self.weight.to(x.dtype))
        if self.bias is None:
            return (y * self.scale).to(x.dtype)
        return torch.addcmul(self.bias, y, self.scale).to(x.dtype)  # bias + y * scale in fp32, one op


@torch.no_grad()
def quantize_linears_(module: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` inside ``module`` by an ``Int8Linear`` of its weights. In place."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear.from_linear(child))
        else:
            quantize_linears_(child)
    return module
