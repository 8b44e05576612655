"""Model and training configuration: plain dataclasses, named presets, dict round-trips.

The model config goes into every checkpoint as a plain dict (``asdict``), so checkpoints load with
``torch.load(..., weights_only=True)`` and can be rebuilt with ``GPTConfig.from_dict``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

SEED_NUM_STORIES = 270_000  # the seed's protocol: the first 270,000 stories, split 70/20/10


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of a GPT-2 decoder. Defaults are the seed's model."""

    vocab_size: int = 50257  # GPT-2 BPE: 50,000 merges + 256 bytes + <|endoftext|>
    max_seq_length: int = 256  # context length: rows of the learned position table
    num_layers: int = 6  # transformer blocks
    num_heads: int = 8  # attention heads; d_model must divide evenly by it
    d_model: int = 512  # residual stream width
    d_ff: int = 2048  # MLP hidden width (GPT-2 uses 4 * d_model)
    dropout: float = 0.1  # on embeddings, attention output and MLP output (the seed used 0.1)
    attn_dropout: float = 0.0  # on attention probabilities (GPT-2 checkpoints: 0.1; our presets: 0)
    layer_norm_eps: float = 1e-5  # GPT-2's epsilon

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_seq_length", "num_layers", "num_heads", "d_model", "d_ff"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig keys: {sorted(unknown)}")
        return cls(**d)

    def num_params(self) -> int:
        """Parameter count by formula (LM head tied to the token embedding, so counted once)."""
        d, f, L = self.d_model, self.d_ff, self.num_layers
        embed = self.vocab_size * d + self.max_seq_length * d
        attn = d * 3 * d + 3 * d + d * d + d  # c_attn + c_proj, with biases
        mlp = d * f + f + f * d + d  # c_fc + c_proj, with biases
        block = attn + mlp + 2 * 2 * d  # two LayerNorms (weight + bias)
        return embed + L * block + 2 * d  # + final LayerNorm

    def flops_per_token(self) -> int:
        """Training FLOPs per token as nanoGPT estimates them: 6N + 12 L d T (N without positions)."""
        n = self.num_params() - self.max_seq_length * self.d_model
        return 6 * n + 12 * self.num_layers * self.d_model * self.max_seq_length


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. Defaults are the seed's recipe, every one of them (the ``seed`` preset:
    batch 4 x accumulation 8, AdamW lr 2e-4, betas (0.9, 0.95), weight decay 0.01 on every parameter,
    500 warmup steps then cosine to 0, clipping at 1.0, patience 3, the first 270,000 stories); the
    other presets change what we prefer (the README lists each difference). ``eval_batch_size`` is
    speed only: evaluation scores do not depend on it."""

    batch_size: int = 4  # sequences per micro-batch
    grad_accum: int = 8  # micro-batches per optimizer step (split across DDP processes)
    lr: float = 2e-4  # peak learning rate
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio (the seed's: to 0)
    weight_decay: float = 0.01  # AdamW weight decay
    weight_decay_on: str = "all"  # 'all' parameters (the seed's AdamW over model.parameters()) or 'matrices' only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # global-norm gradient clipping, 0 = off
    warmup_steps: int = 500  # linear warmup steps, then cosine
    epochs: float = 10.0  # passes over the training tokens when max_steps is 0
    max_steps: int = 0  # optimizer steps; 0 = derive from epochs
    eval_interval: int = 500  # steps between validation passes; 0 = only at the end
    eval_tokens: int = 0  # cap on tokens per validation pass; 0 = the whole split
    eval_batch_size: int = 0  # sequences per validation and test forward pass (scores do not depend on it); 0 = batch_size x grad_accum, on CUDA at least 65,536 tokens' worth
    patience: int = 3  # evaluations without improvement before early stopping, 0 = never
    num_stories: int = SEED_NUM_STORIES  # use the first N stories (0 = all), split 70/20/10 by story


WEIGHT_DECAY_ON = ("all", "matrices")


@dataclass(frozen=True)
class Preset:
    model: GPTConfig
    train: TrainConfig


PRESETS: dict[str, Preset] = {
    # The seed's model and recipe, exactly (our GPT-2 architecture and packed data aside: README).
    "seed": Preset(GPTConfig(), TrainConfig()),
    # Trains usefully on a 2-core CPU in minutes: ~3.4M non-embedding params are small, but the
    # 50,257 x 128 embedding dominates; context 128 keeps attention cheap.
    "tiny": Preset(
        GPTConfig(max_seq_length=128, num_layers=4, num_heads=4, d_model=128, d_ff=512, dropout=0.0),
        TrainConfig(batch_size=16, grad_accum=1, lr=2e-3, min_lr_ratio=0.1, weight_decay=0.1,
                    weight_decay_on="matrices", warmup_steps=20, max_steps=600, eval_interval=100,
                    eval_tokens=65536, num_stories=0),
    ),
    # OpenAI's GPT-2 small (124M).
    "gpt2": Preset(
        GPTConfig(max_seq_length=1024, num_layers=12, num_heads=12, d_model=768, d_ff=3072, dropout=0.0),
        TrainConfig(batch_size=16, grad_accum=4, lr=6e-4, min_lr_ratio=0.1, weight_decay=0.1,
                    weight_decay_on="matrices", warmup_steps=700),
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


__all__ = ["GPTConfig", "TrainConfig", "Preset", "PRESETS", "WEIGHT_DECAY_ON", "get_preset", "replace"]
