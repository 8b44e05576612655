"""A from-scratch GPT-2 for TinyStories: model, tokenizer, data, training and sampling."""

from .config import PRESETS, GPTConfig, TrainConfig, get_preset
from .kvcache import KVCache
from .model import GPT2Model
from .ops import select_ops

__all__ = ["GPT2Model", "GPTConfig", "TrainConfig", "PRESETS", "get_preset", "KVCache",
           "select_ops", "generate_text"]


def __getattr__(name: str):
    """``generate_text``, imported on first use: its module brings the data and training modules
    with it (gpt.generate -> gpt.graphstep -> gpt.step -> gpt.data), and importing those with the
    package made ``python -m gpt.data`` warn that gpt.data was already imported."""
    if name == "generate_text":
        from .generate import generate_text

        globals()[name] = generate_text
        return generate_text
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
