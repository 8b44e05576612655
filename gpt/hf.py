"""Exact conversion between our GPT2Model and transformers' GPT2LMHeadModel, and
``load_pretrained``: a model from one of our checkpoints, a transformers directory or a hub name.

transformers stores GPT-2's projections as ``Conv1D`` with weights (in, out); ours are
``nn.Linear`` with weights (out, in), so those four matrices are transposed; everything else maps
by name. transformers is imported lazily: the model itself does not need it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_model
from .config import GPTConfig
from .data import hub_unreachable
from .errors import one_line
from .model import GPT2Model

_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# Our GPTConfig field -> transformers' GPT2Config attribute: the one map both directions use.
_CONFIG_NAMES = {
    "vocab_size": "vocab_size", "max_seq_length": "n_positions", "num_layers": "n_layer", "num_heads": "n_head",
    "d_model": "n_embd", "d_ff": "n_inner", "dropout": "resid_pdrop", "attn_dropout": "attn_pdrop",
    "layer_norm_eps": "layer_norm_epsilon",
}


def hf_config(config: GPTConfig):
    from transformers import GPT2Config

    return GPT2Config(
        **{theirs: getattr(config, ours) for ours, theirs in _CONFIG_NAMES.items()},
        embd_pdrop=config.dropout,  # ours has one dropout for embeddings and residual branches
        activation_function="gelu_new",  # tanh approximation, as ours
        bos_token_id=50256,
        eos_token_id=50256,
        tie_word_embeddings=True,
    )


def config_from_hf(hf) -> GPTConfig:
    if getattr(hf, "model_type", "gpt2") != "gpt2":
        raise ValueError(f"not a GPT-2 config (model_type={hf.model_type!r})")
    if hf.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"unsupported activation {hf.activation_function!r} (need tanh GELU)")
    values = {ours: getattr(hf, theirs) for ours, theirs in _CONFIG_NAMES.items()}
    values["d_ff"] = values["d_ff"] or 4 * hf.n_embd  # GPT-2's configs leave n_inner unset
    return GPTConfig(**values)


def _hf_key(ours: str) -> str:
    return "lm_head.weight" if ours == "lm_head.weight" else "transformer." + ours


def from_transformers(hf_model, impl: str = "auto") -> GPT2Model:
    """Our model with exactly the weights of a ``GPT2LMHeadModel``."""
    model = GPT2Model.uninitialized(config_from_hf(hf_model.config), impl=impl)
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


def load_pretrained(source: str) -> GPT2Model:
    """A model (fp32, on the CPU, impl torch) with the weights of ``source``: a checkpoint of ours
    (a ``.pt`` file, e.g. ``out/gpt2_best_model.pt``), a transformers GPT-2 directory (``export_hf``'s
    or OpenAI's), or a Hugging Face hub name (``gpt2``, ``gpt2-medium``, ``distilgpt2``, ...: downloaded
    once by transformers, which needs the network or its cache). Raises ``CheckpointError`` (one
    line) when it cannot."""
    path = Path(source).expanduser()
    if path.is_file():
        return load_model(path, impl="torch")
    looks_local = path.is_dir() or source.endswith(".pt") or source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local and not path.is_dir():
        raise CheckpointError(f"{source}: no such checkpoint file or model directory")
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if path.is_dir() and not (path / "config.json").is_file():
        raise CheckpointError(f"{source} has no config.json: not a transformers model directory")
    where, offline = (str(path), None) if path.is_dir() else (f"the Hugging Face hub's {source}", hub_unreachable())
    try:  # when the hub does not answer, only a copy transformers cached before will do
        hf_model = GPT2LMHeadModel.from_pretrained(str(path) if path.is_dir() else source, torch_dtype=torch.float32, local_files_only=offline is not None)
    except (OSError, ValueError, KeyError) as e:  # no such repo or cached copy, not GPT-2, unreadable weights
        if offline is not None:
            raise CheckpointError(f"cannot load {source} from the Hugging Face hub, which does not answer ({offline}), "
                                  "and transformers has no cached copy: pass a checkpoint file or a model directory"
                                  ) from None
        raise CheckpointError(f"cannot load a GPT-2 from {where}: {one_line(e)}") from None
    try:
        return from_transformers(hf_model, impl="torch")
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None

