"""Exact conversion between our GPT2Model and transformers' GPT2LMHeadModel.

transformers stores GPT-2's projections as ``Conv1D`` with weights (in, out); ours are
``nn.Linear`` with weights (out, in), so those four matrices are transposed; everything else maps
by name. transformers is imported lazily: the model itself does not need it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import GPTConfig
from .model import GPT2Model

_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_config(config: GPTConfig):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.max_seq_length,
        n_embd=config.d_model,
        n_layer=config.num_layers,
        n_head=config.num_heads,
        n_inner=config.d_ff,
        activation_function="gelu_new",  # tanh approximation, as ours
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.attn_dropout,
        layer_norm_epsilon=config.layer_norm_eps,
        bos_token_id=50256,
        eos_token_id=50256,
        tie_word_embeddings=True,
    )


def config_from_hf(hf) -> GPTConfig:
    if getattr(hf, "model_type", "gpt2") != "gpt2":
        raise ValueError(f"not a GPT-2 config (model_type={hf.model_type!r})")
    if hf.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"unsupported activation {hf.activation_function!r} (need tanh GELU)")
    return GPTConfig(
        vocab_size=hf.vocab_size,
        max_seq_length=hf.n_positions,
        num_layers=hf.n_layer,
        num_heads=hf.n_head,
        d_model=hf.n_embd,
        d_ff=hf.n_inner or 4 * hf.n_embd,
        dropout=hf.resid_pdrop,
        attn_dropout=hf.attn_pdrop,
        layer_norm_eps=hf.layer_norm_epsilon,
    )


def _hf_key(ours: str) -> str:
    return "lm_head.weight" if ours == "lm_head.weight" else "transformer." + ours


def from_transformers(hf_model, impl: str = "auto") -> GPT2Model:
    """Our model with exactly the weights of a ``GPT2LMHeadModel``."""
    model = GPT2Model(config_from_hf(hf_model.config), impl=impl)
    hf_sd = hf_model.state_dict()
    sd = {}
    for name in model.state_dict():
        w = hf_sd[_hf_key(name)]
        sd[name] = w.t() if name.endswith(_TRANSPOSED) else w
    model.load_state_dict(sd)
    return model.to(next(hf_model.parameters()).device)


def to_transformers(model: GPT2Model):
    """A ``GPT2LMHeadModel`` with exactly our weights (LM head tied to wte, as ours)."""
    from transformers import GPT2LMHeadModel

    hf_model = GPT2LMHeadModel(hf_config(model.config))
    sd = {}
    for name, w in model.state_dict().items():
        sd[_hf_key(name)] = (w.t() if name.endswith(_TRANSPOSED) else w).clone()
    missing, unexpected = hf_model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith(".attn.bias")
               and not k.endswith(".attn.masked_bias")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping mismatch: missing={missing}, unexpected={unexpected}")
    hf_model.tie_weights()
    return hf_model.to(model.wte.weight.device).eval()


def export_hf(model: GPT2Model, directory: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``AutoModelForCausalLM.from_pretrained`` loads."""
    directory = Path(directory)
    to_transformers(model).save_pretrained(directory, safe_serialization=True)
    return directory


def load_hf(directory: str | Path, impl: str = "auto") -> GPT2Model:
    """Our model from a transformers GPT-2 directory (ours or OpenAI's)."""
    from transformers import GPT2LMHeadModel

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a transformers model directory")
    model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    if model_type != "gpt2":
        raise ValueError(f"{directory} holds a {model_type!r} model, not GPT-2")
    return from_transformers(GPT2LMHeadModel.from_pretrained(directory, torch_dtype=torch.float32), impl=impl)
