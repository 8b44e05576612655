"""Triton kernels for the GPT-2 hot paths.

Importing this package needs triton but no GPU: kernels compile on first launch. On a CPU, set
``TRITON_INTERPRET=1`` before triton is imported to run them in Triton's interpreter.
"""
from .layernorm import add_layer_norm, layer_norm
from .attention import causal_attention, causal_attention_qkv
from .cross_entropy import linear_cross_entropy
from .decode_attention import decode_attention
from .bias_gelu import bias_gelu

__all__ = ["layer_norm", "add_layer_norm", "causal_attention", "causal_attention_qkv", "decode_attention", "linear_cross_entropy",
           "bias_gelu"]
