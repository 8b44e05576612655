"""Text generation with a static KV cache: one prefill pass, then one-token decode steps.

Laid out like gpt-fast: ``prefill`` runs the (left-padded) prompts through the model once and fills
the cache; ``decode_one`` feeds one token per row against the cache. ``generate`` drives them:

* Generated tokens stay on the device in a preallocated buffer. Sampling uses the exponential
  race (argmax of p / E with E ~ Exp(1)), which needs no host sync. Without streaming, the host
  looks at the device only every ``check_every`` steps (to stop once every row has emitted EOS).
* Prompts of different lengths are left-padded; ``cache.start[b]`` is row b's pad length, so the
  model masks the padding keys and counts positions from the first real token.
* Prompts longer than the context (``max_seq_length``) keep only their last ``max_seq_length``
  tokens. An empty prompt starts from EOS.
* When the cache is full and another token must be fed, the oldest tokens are dropped: the cache is
  re-prefilled (positions restarting at 0) with the last ``keep = max(1, max_seq_length // 2)``
  tokens of each row, then decoding goes on. In a batch the cache fills when the longest row does;
  every row then keeps its own last ``keep`` tokens (fewer if it has fewer).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .kvcache import KVCache
from .model import GPT2Model
from .tokenizer import EOS_ID


def check_sampling_args(temperature: float, top_k: int, top_p: float, max_new_tokens: int) -> None:
    """Raise ValueError (one-line message) for settings that make no sense."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top-k must be >= 0 (0 = no limit), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top-p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max-new-tokens must be >= 1, got {max_new_tokens}")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token per row (B,) from logits (B, V): greedy at temperature 0, else top-k then top-p.

    Top-p keeps the most probable tokens until their mass reaches ``top_p`` (always at least one).
    """
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature  # (B, V)
    ids = None
    if top_k and top_k < scores.shape[-1]:
        scores, ids = torch.topk(scores, top_k, dim=-1)  # (B, k), sorted descending
    elif top_p < 1:
        scores, ids = scores.sort(dim=-1, descending=True)
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1:  # probs are sorted here
        mass_before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(mass_before >= top_p, 0.0)
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    choice = (probs / race).argmax(-1)  # (B,): index j with probability probs[j] / sum(probs)
    return choice if ids is None else ids.gather(-1, choice[:, None]).squeeze(-1)


def _last_logits(model: GPT2Model, h: torch.Tensor) -> torch.Tensor:
    return F.linear(h[:, -1], model.wte.weight).float()  # (B, V), tied head, last position only


def prefill(model: GPT2Model, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run left-padded prompts idx (B, T) into an empty cache; return next-token logits (B, V)."""
    cache.pos = 0
    return _last_logits(model, model.hidden_states(idx, cache))


def decode_one(model: GPT2Model, tok: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed one token per row (B, 1) at ``cache.pos``; return next-token logits (B, V)."""
    return _last_logits(model, model.hidden_states(tok, cache))


@torch.no_grad()
def column_major_weights_(model: GPT2Model) -> GPT2Model:
    """Store every weight matrix column-major: same values and shapes, transposed strides. In place.

    ``F.linear(x, W)`` multiplies by ``W.t()``, which is then a contiguous (in, out) matrix; for the
    one-row products of batch-1 decoding MKL runs that layout at close to memory bandwidth, about
    twice as fast as nn.Linear's row-major one (measured on this project's CPUs, LM head included).
    For inference on a CPU: training or CUDA gain nothing from it.
    """
    for p in model.parameters():
        if p.dim() == 2:
            p.data = p.data.t().contiguous().t()
    return model


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) tokens right-aligned with ``pad_id`` in front, and each row's pad length (B,)."""
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad_id, dtype=torch.int64)
    for b, p in enumerate(prompts):
        idx[b, T - len(p):] = torch.tensor(p, dtype=torch.int64)
    start = torch.tensor([T - len(p) for p in prompts], dtype=torch.int64)
    return idx.to(device), start.to(device)


@torch.no_grad()
def generate(model: GPT2Model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: Optional[int] = EOS_ID, generator: Optional[torch.Generator] = None,
             on_token: Optional[Callable[[torch.Tensor], None]] = None,
             check_every: int = 16, decode_fn: Callable = decode_one) -> list[list[int]]:
    """New tokens for each prompt (a list of token ids), stopping at EOS (not included) or after
    ``max_new_tokens``. ``on_token`` (streaming) gets each step's tokens (B,) on the host.
    ``decode_fn`` replaces ``decode_one``, e.g. with ``torch.compile(decode_one, dynamic=True)``.

    Put the model in eval mode first (dropout). See the module docstring for padding, truncation
    and what happens when the context fills.
    """
    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    if not prompts:
        raise ValueError("no prompts")
    config = model.config
    ctx = config.max_seq_length
    keep = max(1, ctx // 2)
    pad_id = 0 if eos_id is None else eos_id
    rows = []
    for p in prompts:
        p = list(p)[-ctx:] or [pad_id]
        bad = [t for t in p if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary [0, {config.vocab_size})")
        rows.append(p)
    weight = model.wte.weight
    idx, start = left_pad(rows, pad_id, weight.device)  # (B, P), (B,)
    B, P = idx.shape
    buf = torch.full((B, P + max_new_tokens), pad_id, dtype=torch.int64, device=weight.device)
    buf[:, :P] = idx  # every token so far, left-padded: the source of re-prefill windows
    dtype = weight.dtype  # under autocast, k and v come out in the autocast dtype: store that
    if torch.is_autocast_enabled(weight.device.type):
        dtype = torch.get_autocast_dtype(weight.device.type)
    cache = KVCache.allocate(config, B, weight.device, dtype, max_len=min(ctx, P + max_new_tokens - 1))
    cache.start.copy_(start)
    done = torch.zeros(B, dtype=torch.bool, device=weight.device)
    logits = prefill(model, idx, cache)
    n = P  # tokens in buf
    for step in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        if eos_id is not None:
            tok = tok.masked_fill(done, eos_id)  # finished rows only repeat EOS
            done |= tok == eos_id
        buf[:, n] = tok
        n += 1
        if on_token is not None:
            on_token(tok.cpu())
        if step == max_new_tokens - 1:
            break
        if eos_id is not None and (on_token is not None or (step + 1) % check_every == 0) and bool(done.all()):
            break  # the only host sync of the loop when not streaming
        if cache.pos == cache.max_len:  # full: restart on the last `keep` tokens of each row
            cache.start.copy_((start - (n - keep)).clamp(min=0))
            logits = prefill(model, buf[:, n - keep:n], cache)
        else:
            logits = decode_fn(model, tok[:, None], cache)
    out = []
    for row in buf[:, P:n].tolist():
        out.append(row[:row.index(eos_id)] if eos_id in row else row)
    return out


def eos_of(tokenizer) -> int:
    """EOS id of our tokenizer (``eos_id``) or a transformers one (``eos_token_id``)."""
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    return EOS_ID if eos is None else eos


class TextStream:
    """Turns streamed token ids into text, holding back tokens that end inside a UTF-8 character."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.write = write
        self.pending: list[int] = []

    def push(self, token: int) -> None:
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if not text.endswith("\ufffd"):  # a partial character decodes to U+FFFD: wait for more
            self.write(text)
            self.pending.clear()

    def flush(self) -> None:
        if self.pending:
            self.write(self.tokenizer.decode(self.pending))
            self.pending.clear()


@torch.no_grad()
def generate_text(model, tokenizer, prompt="Once upon a time", max_length=100, temperature=1.0,
                  device="cpu", top_k=40, top_p=0.95, seed: Optional[int] = None) -> str:
    """Continue ``prompt`` until ``max_length`` tokens in all (prompt included) or EOS; return
    prompt + continuation as text. ``tokenizer`` is ours or a transformers GPT-2 tokenizer.
    Puts the model in eval mode on ``device``; ``seed`` makes the sample reproducible."""
    model.eval()
    model.to(device)
    ids = list(tokenizer.encode(prompt))
    new = max_length - max(1, len(ids))  # an empty prompt starts from EOS, which counts
    if new < 1:
        return prompt
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    out = generate(model, [ids], new, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_id=eos_of(tokenizer), generator=generator)[0]
    return prompt + tokenizer.decode(out)
