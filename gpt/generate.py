"""Text generation with a static KV cache: one prefill pass, then a fixed-shape decode step.

Laid out like gpt-fast. A ``Decoder`` holds what decoding runs: the model (a decode copy when the
weights need another layout, dtype or int8; never a change to the caller's model), its LM head,
and the decode step, compiled when asked. ``Decoder.prefill`` runs the (left-padded) prompts
through the model once and fills the cache (host positions, sliced cache); ``Decoder.step`` feeds
one token per row at the cache's device position against the whole fixed-size cache, masked by the
written length and each row's start (same shapes every call: on CUDA it is replayed from a CUDA
graph by default, or compiled when asked). ``generate`` drives them:

* Generated tokens stay on the device in a preallocated buffer. Sampling draws by inverse
  transform (a uniform against the cumulative sum), which needs no host sync; a graphed decode
  step draws inside its graph (``Sampler``), so a token costs one replay. Without streaming,
  the host looks at the device only every ``check_every`` steps (to stop once every row has
  emitted EOS).
* Prompts of different lengths are left-padded; ``cache.start[b]`` is row b's pad length, so the
  model masks the padding keys and counts positions from the first real token. A batch without
  padding has ``cache.start = None`` and takes the attention's unmasked path.
* Prompts longer than the context (``max_seq_length``) keep only their last ``max_seq_length``
  tokens. An empty prompt starts from EOS.
* When the cache is full and another token must be fed, the oldest tokens are dropped: the cache is
  re-prefilled (positions restarting at 0) with the last ``keep = max(1, max_seq_length // 2)``
  tokens of each row, then decoding goes on. In a batch the cache fills when the longest row does;
  every row then keeps its own last ``keep`` tokens (fewer if it has fewer).
* Ctrl-C raises ``GenerationInterrupted`` (a ``KeyboardInterrupt``) carrying the tokens so far.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .graphstep import Captured, run_on
from .hardware import DTYPES, default_dtype
from .kvcache import KVCache
from .model import GPT2Model
from .ops import select_ops
from .quantize import Int8Linear, quantize_linears_
from .tokenizer import EOS_ID

QUANTIZE = ("int8",)


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


def sampling_distribution(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """What ``sample_next`` draws from: (probs (B, m), ids (B, m)) over candidate tokens, or
    (probs (B, V), None) for the whole vocabulary. Temperature > 0.

    probs = softmax(logits / temperature) restricted to the ``top_k`` most probable tokens (0: all)
    and renormalised over them, then cut to the most probable of those until their mass reaches
    ``top_p`` (always at least one; the rest get 0, not renormalised: the draw normalises).

    Cheap at batch 1 over 50,257 logits: one ``topk`` pass picks the k survivors (sorted), and the
    temperature, softmax and top-p cut run on those only. Top-p without top-k looks at the top 64
    tokens first, then 4x more until their mass reaches top_p (on a CPU, where the check is free;
    a GPU sorts the vocabulary rather than wait for the host), and sorts the vocabulary only for a
    nucleus wider than an eighth of it.
    """
    V = logits.shape[-1]
    scores = logits.float() / temperature  # (B, V)
    if top_k and top_k < V:
        scores, ids = torch.topk(scores, top_k, dim=-1)  # (B, k), sorted descending
        probs = torch.softmax(scores, dim=-1)
    elif top_p < 1:
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # normalise over the whole vocabulary
        m = V if scores.device.type != "cpu" else min(64, V)
        while True:
            top, ids = torch.topk(scores, m, dim=-1) if m < V else scores.sort(dim=-1, descending=True)
            probs = (top - lse).exp()
            if m == V or bool((probs.sum(-1) >= top_p).all()):  # the nucleus lies inside the top m
                break
            m = 4 * m if 4 * m <= V // 8 else V  # a wide nucleus: sorting everything is cheaper
    else:
        return torch.softmax(scores, dim=-1), None
    if top_p < 1:  # probs are sorted here
        mass_before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(mass_before >= top_p, 0.0)
    return probs, ids


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token per row (B,) from logits (B, V): greedy at temperature 0, else one draw from
    ``sampling_distribution`` by inverse transform (a uniform against the float64 cumulative sum:
    no host sync, one random number per row)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs, ids = sampling_distribution(logits, temperature, top_k, top_p)
    cdf = probs.double().cumsum(-1)  # (B, m); float64: the tail's probabilities keep their digits
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator)
    choice = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1)  # (B, 1)
    return (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)


class Sampler(NamedTuple):
    """How the next tokens (B,) are drawn from logits (B, V): ``sample_next`` with these arguments.
    A graphed ``Decoder`` captures it with the decode step (no launches of its own per token) when it
    draws from torch's default generator, which CUDA graphs advance on every replay; with a
    ``generator`` of its own it runs after the replay."""

    temperature: float
    top_k: int = 0
    top_p: float = 1.0
    generator: Optional[torch.Generator] = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return sample_next(logits, self.temperature, self.top_k, self.top_p, self.generator)


class RowLinear(nn.Module):
    """A linear layer of a CPU bf16 decode copy (and its LM head, over the tied embedding): a single
    row -- batch-1 decoding -- goes through ``torch.mv``, more rows through ``F.linear``. On this
    project's CPU (Xeon, AMX) one bf16 row through ``F.linear`` took a slow GEMM path: 95-127 us at
    the seed's layer sizes and 2.6 ms for the head, against 52-67 us and 1.4 ms by ``torch.mv`` (the
    same rounding: both accumulate in fp32 and round the output once), so bf16 decoding ran slower
    than fp32 before this. Shares the weight and bias tensors; copies nothing."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.weight, self.bias = weight, bias  # (N, K), (N,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        y = torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], -1)  # (..., N)
        return y if self.bias is None else y + self.bias


def _rows_through_mv_(module: nn.Module) -> None:
    """Every ``nn.Linear`` inside ``module`` replaced by a ``RowLinear`` of its tensors. In place."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, RowLinear(child.weight, child.bias))
        else:
            _rows_through_mv_(child)


def _decode_step(model: GPT2Model, lm_head: Optional[nn.Module], tok: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One token per row (B, 1) at the cache's device position -> next-token logits (B, V) in fp32.
    Device work only, same shapes every call: the unit that ``torch.compile`` captures."""
    h = model.hidden_states(tok, cache, static=True)[:, -1]  # (B, C)
    return _head(model, lm_head, h)


def _head(model: GPT2Model, lm_head: Optional[nn.Module], h: torch.Tensor) -> torch.Tensor:
    """Logits in fp32 from final hidden states: the tied embedding, or its decode form (int8, RowLinear)."""
    logits = F.linear(h, model.wte.weight) if lm_head is None else lm_head(h)
    return logits.float()


class _CacheGraph(NamedTuple):
    """A decode step captured over one cache: its static (B, 1) token input, the sampler captured
    with it (None: the graph gives logits), and the graph."""

    cache: KVCache
    tok: torch.Tensor
    sample: Optional[Sampler]
    graph: Captured


def _decode_copy(model: GPT2Model, device: torch.device, dtype: Optional[torch.dtype]) -> GPT2Model:
    """An eval-mode copy of ``model`` on ``device`` (in ``dtype``; None: the model's): each weight
    copied once, straight into its new form (a deepcopy, then ``.to``, copies the fp32 weights
    first: 0.05 s against 0.10 s at the seed's size in bf16 on this project's CPU, each
    ``generate_text`` call)."""
    memo = {id(p): nn.Parameter(p.detach().to(device, dtype, copy=True), p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo).eval()


class Decoder:
    """A model made ready to decode, and its prefill and decode step.

    The caller's model is never changed. When decoding wants the weights otherwise, they live in a
    decode copy (built once here; keep the Decoder to reuse it); else the model itself is run, in
    eval mode and with the decode ops (``running``), and left as it was:

    * ``device`` (None: the model's) moves the copy;
    * ``dtype`` ("fp32", "bf16", "fp16"; None: the model's own) casts the copy;
    * ``quantize="int8"`` makes every linear layer and the LM head weight-only int8
      (``gpt.quantize``; on a CPU through ``_weight_int8pack_mm``).

    On a CPU the torch implementation decodes through torch's fused kernels (``TORCH_OPS``: the
    reference math in fewer ops). fp32 weights need no copy: nn.Linear's row-major layout runs as
    fast as a column-major copy on this project's CPU (measured within 5% at batch 1).

    ``compile=True`` compiles the decode step (``torch.compile(fullgraph=True)``): on CUDA with
    ``mode="reduce-overhead"``, which replays it as a CUDA graph (the cache tensors are marked as
    static addresses, so the graph writes into them in place). Worth it on a GPU, where a small
    model's eager step is launch overhead; on a CPU the first tokens wait for the compilation.

    ``cuda_graph`` (default: on CUDA unless ``compile``) captures the eager step itself -- our
    kernels as they are, no compilation -- in a CUDA graph (``gpt.graphstep.Captured``): the first
    step on a cache runs eagerly (Triton compiles and autotunes), the second is captured over that
    cache and replayed from then on (``_graph_step``). Capturing takes milliseconds where compiling
    takes tens of seconds. The cache spans the whole context and the next generation with the same
    batch size, padding, dtype and impl gets the same cache back (``new_cache``), so its steps
    replay the graph already captured: a decoder kept across ``generate`` calls (``sample.py``'s
    samples) captures once. ``cuda_graph=True`` off CUDA is a ValueError; ``False`` launches every
    step.
    """

    def __init__(self, model: GPT2Model, *, device=None, dtype: Optional[str] = None,
                 quantize: Optional[str] = None, compile: bool = False, cuda_graph: Optional[bool] = None):
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        if quantize is not None and quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
        weight = model.wte.weight
        self.device = weight.device if device is None else _resolve(device)
        if cuda_graph is None:
            cuda_graph = not compile and _captures_graphs(self.device)
        if cuda_graph and compile:
            raise ValueError("cuda_graph and compile do not combine (a compiled step on CUDA is already a CUDA graph)")
        if cuda_graph and not _captures_graphs(self.device):
            raise ValueError(f"cuda_graph needs a CUDA device, got {self.device}")
        move = self.device != weight.device
        cast = dtype is not None and DTYPES[dtype] != weight.dtype
        self.source = model
        self.lm_head = None
        if move or cast or quantize:
            model = _decode_copy(model, self.device, DTYPES[dtype] if cast else None)
            if quantize == "int8":
                for block in model.h:
                    quantize_linears_(block)
                self.lm_head = Int8Linear(model.wte.weight)
            elif self.device.type == "cpu" and model.wte.weight.dtype == torch.bfloat16:
                for block in model.h:
                    _rows_through_mv_(block)
                self.lm_head = RowLinear(model.wte.weight)
        self.model = model
        self.compiled = compile
        self.cuda_graph = cuda_graph
        self.graphed: Optional[_CacheGraph] = None  # the graph of the last cache stepped on
        self._cache: Optional[tuple] = None  # (what it was made for, the last cache): handed out again (graphed)
        self._warmed: Optional[tuple] = None  # (cache, sampler) whose first step ran eagerly
        self._stream: Optional[torch.cuda.Stream] = None  # where graphed steps warm up and are captured
        self._step = _decode_step
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._step = torch.compile(_decode_step, mode=mode, fullgraph=True)

    @property
    def summary(self) -> str:
        """What runs, in words: "fp32", "bf16, int8 weights, compiled", ..."""
        names = {v: k for k, v in DTYPES.items()}
        parts = [names.get(self.model.wte.weight.dtype, str(self.model.wte.weight.dtype))]
        if isinstance(self.lm_head, Int8Linear):
            parts.append("int8 weights")
        if self.compiled:
            parts.append("compiled")
        if self.cuda_graph:
            parts.append("CUDA graph")
        return ", ".join(parts)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (under autocast, the autocast dtype): what the KV cache stores."""
        if torch.is_autocast_enabled(self.device.type):
            return torch.get_autocast_dtype(self.device.type)
        return self.model.wte.weight.dtype

    @contextlib.contextmanager
    def running(self):
        """Eval mode and the decode ops while decoding; the model's mode and ``impl`` restored after."""
        model = self.model
        was_training, impl = model.training, model.impl
        model.impl = select_ops(self.source.impl, self.device, model.config, training=False)  # the caller's choice
        model.eval()
        try:
            yield
        finally:
            model.impl = impl
            model.train(was_training)

    def new_cache(self, batch_size: int, max_len: int, padded: bool) -> KVCache:
        """A cache for ``batch_size`` rows (``prefill`` resets it). A compiled or graphed step always
        gets the full context (one shape). A graphed decoder hands its last cache out again when the
        batch size, padding, dtype and impl agree, so the graph captured over it replays again -- except
        under autocast with its cast cache on (torch's default; ``gpt.hardware.autocast`` has it
        off), whose cached weight casts a graph captured in one autocast region would read after
        the region had freed them."""
        if self.compiled or self.cuda_graph:
            max_len = self.model.config.max_seq_length
        reusable = self.cuda_graph and not (torch.is_autocast_enabled(self.device.type)
                                            and torch.is_autocast_cache_enabled())
        key = (batch_size, padded, self.dtype, self.model.impl)  # the impl: ``running`` follows the caller's
        if reusable and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        cache = KVCache.allocate(self.model.config, batch_size, self.device, self.dtype, max_len=max_len,
                                 padded=padded)
        if self.compiled:
            for t in cache.tensors():
                torch._dynamo.mark_static_address(t)
        if reusable:
            self._cache = (key, cache)
        return cache

    def prefill(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run left-padded prompts idx (B, T) into the cache from slot 0; return next-token logits (B, V)."""
        cache.reset(0)
        h = self.model.hidden_states(idx, cache)[:, -1]
        return _head(self.model, self.lm_head, h)

    def step(self, tok: torch.Tensor, cache: KVCache, sample: Optional[Sampler] = None) -> torch.Tensor:
        """Feed one token per row (B, 1) at ``cache.pos``; return next-token logits (B, V), or with
        ``sample`` the next tokens (B,) drawn from them -- inside the graph of a graphed decoder
        when ``sample`` draws from the default generator."""
        if self.compiled and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's logits have been consumed
        inside = sample if self.cuda_graph and sample is not None and sample.generator is None else None
        if self.cuda_graph:
            out = self._graph_step(tok, cache, inside)
        else:
            out = self._step(self.model, self.lm_head, tok, cache)
        cache.pos += 1
        return out if sample is None or inside is not None else sample(out)

    def _graph_step(self, tok: torch.Tensor, cache: KVCache, sample: Optional[Sampler]) -> torch.Tensor:
        """The step (and ``sample``, if given) as a replay of the cache's graph: its first step runs
        eagerly (on the capture's stream: Triton compiles and autotunes there), its second is
        captured -- over the cache and a static (B, 1) token buffer; the capture records the cache
        writes and ``cache.length += 1`` and runs nothing -- and replayed, as is every later one, in
        this generation and in the next ones ``new_cache`` gives the same cache, with the same
        sampler. The logits (or tokens) come back in the graph's static tensor, which the next
        replay overwrites (stream order reads them first). Another cache or sampler drops the last
        graph and its memory."""
        graphed = self.graphed
        if (graphed is not None and graphed.cache is cache and graphed.tok.shape == tok.shape
                and graphed.sample == sample):
            graphed.tok.copy_(tok)
            return graphed.graph.replay()
        self.graphed = None
        if self._stream is None and self.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.device)

        def step(tok):
            logits = _decode_step(self.model, self.lm_head, tok, cache)
            return logits if sample is None else sample(logits)

        if self._warmed is None or self._warmed[0] is not cache or self._warmed[1] != sample:
            self._warmed = (cache, sample)
            return run_on(self._stream, lambda: step(tok))
        static_tok = tok.clone()
        captured = Captured(lambda: step(static_tok), self._stream)
        self.graphed = _CacheGraph(cache, static_tok, sample, captured)
        return captured.replay()

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of a whole sequence through the decode weights (perplexity checks)."""
        with self.running():
            return _head(self.model, self.lm_head, self.model.hidden_states(idx))


def _captures_graphs(device: torch.device) -> bool:
    """Whether ``device`` captures CUDA graphs (``cuda_graph=True`` is refused elsewhere)."""
    return device.type == "cuda"


def _resolve(device) -> torch.device:
    """``device`` with an index where it has one ("cuda" -> "cuda:0"), so equal devices compare equal."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, list[int]]:
    """(B, T) tokens right-aligned with ``pad_id`` in front, and each row's pad length."""
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad_id, dtype=torch.int64)
    for b, p in enumerate(prompts):
        idx[b, T - len(p):] = torch.tensor(p, dtype=torch.int64)
    return idx.to(device), [T - len(p) for p in prompts]


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``generate``: ``tokens`` holds each row's new tokens so far (as ``generate`` returns them)."""

    def __init__(self, tokens: list[list[int]]):
        super().__init__("generation interrupted")
        self.tokens = tokens


def _rows(buf: torch.Tensor, eos_id: Optional[int]) -> list[list[int]]:
    out = []
    for row in buf.tolist():
        out.append(row[:row.index(eos_id)] if eos_id in row else row)
    return out


@torch.inference_mode()  # no autograd bookkeeping at all: ~8% of a CPU decode step at batch 1 (int8)
def generate(model: GPT2Model | Decoder, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: Optional[int] = EOS_ID, generator: Optional[torch.Generator] = None,
             on_token: Optional[Callable[[torch.Tensor], None]] = None,
             check_every: int = 16) -> list[list[int]]:
    """New tokens for each prompt (a list of token ids), stopping at EOS (not included) or after
    ``max_new_tokens``. ``on_token`` (streaming) gets each step's tokens (B,) on the host.

    ``model`` is a ``GPT2Model`` (run as ``Decoder(model)`` runs it: the model itself, no copy) or a
    ``Decoder`` (for int8, another dtype, a compiled step, or to reuse a decode copy across calls).
    The model runs in eval mode with the decode ops; its own mode and ``impl`` are left as they
    were. See the module docstring for padding, truncation, running past the context and Ctrl-C.
    """
    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    if not prompts:
        raise ValueError("no prompts")
    dec = model if isinstance(model, Decoder) else Decoder(model)
    config = dec.model.config
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
    idx, start = left_pad(rows, pad_id, dec.device)  # (B, P), pad lengths
    B, P = idx.shape
    buf = torch.full((B, P + max_new_tokens), pad_id, dtype=torch.int64, device=dec.device)
    buf[:, :P] = idx  # every token so far, left-padded: the source of re-prefill windows
    n = P  # tokens in buf
    with dec.running():
        cache = dec.new_cache(B, min(ctx, P + max_new_tokens - 1), padded=any(start))
        if cache.start is not None:
            cache.start.copy_(torch.tensor(start))
        done = torch.zeros(B, dtype=torch.bool, device=dec.device)
        sample = Sampler(temperature, top_k, top_p, generator)
        try:
            tok = sample(dec.prefill(idx, cache))  # (B,)
            for step in range(max_new_tokens):
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
                    if cache.start is not None:
                        cache.start.copy_(torch.tensor([max(0, s - (n - keep)) for s in start]))
                    tok = sample(dec.prefill(buf[:, n - keep:n], cache))
                else:
                    tok = dec.step(tok[:, None], cache, sample)  # a graphed decoder samples in its graph
        except KeyboardInterrupt:
            raise GenerationInterrupted(_rows(buf[:, P:n], eos_id)) from None
    return _rows(buf[:, P:n], eos_id)


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


@torch.inference_mode()
def generate_text(model, tokenizer, prompt="Once upon a time", max_length=100, temperature=1.0,
                  device="cpu", top_k=40, top_p=0.95, seed: Optional[int] = None, dtype: str = "auto") -> str:
    """Continue ``prompt`` until ``max_length`` tokens in all (prompt included) or EOS; return
    prompt + continuation as text. ``tokenizer`` is ours or a transformers GPT-2 tokenizer.
    ``model`` is a ``GPT2Model`` (decoded on ``device``: a copy when it lives elsewhere or in
    another dtype; on CUDA its decode step replayed from a CUDA graph, captured on the second
    token) or a ``Decoder`` (kept across calls, it captures once, in its own dtype); it runs in eval
    mode and is left as it was. ``seed`` makes the sample reproducible.

    ``dtype`` ("fp32", "bf16", "fp16") of the decoding; "auto" is ``sample.py``'s default: bf16 on
    CUDA and on a CPU with AMX, else fp32 (``gpt.hardware.default_dtype``). Decoding at batch 1
    reads every weight once a token, so half the bytes go faster: an fp32 seed-sized model decoded
    at 75 tokens/s in fp32 and ~130 in bf16 on this project's 2-core CPU (README, "Measured")."""
    ids = list(tokenizer.encode(prompt))
    new = max_length - max(1, len(ids))  # an empty prompt starts from EOS, which counts
    if new < 1:
        return prompt
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    if not isinstance(model, Decoder):
        if dtype == "auto":
            dtype = default_dtype(device, model.impl if isinstance(model.impl, str) else "auto")
        model = Decoder(model, device=device, dtype=dtype)
    out = generate(model, [ids], new, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_id=eos_of(tokenizer), generator=generator)[0]
    return prompt + tokenizer.decode(out)
