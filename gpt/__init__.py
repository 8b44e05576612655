"""A from-scratch GPT-2 for TinyStories: model, tokenizer, data, training and sampling."""

from .config import PRESETS, GPTConfig, TrainConfig, get_preset
from .generate import generate_text
from .kvcache import KVCache
from .model import GPT2Model
from .ops import select_ops

__all__ = ["GPT2Model", "GPTConfig", "TrainConfig", "PRESETS", "get_preset", "KVCache",
           "select_ops", "generate_text"]
