"""Sampling speed: our static-cache sampler vs transformers' ``generate`` (and the seed's recomputation).

CPU, the seed-sized model (GPTConfig() defaults, random weights), batch 1 unless named:

* ``test_sample_cpu[fp32|int8|bf16|fp32-batch8]``: greedy, ``generate`` through a ``Decoder`` (fp32:
  the model itself; int8: ``quantize="int8"``; bf16: ``dtype="bf16"``) against
  ``GPT2LMHeadModel.generate`` on the same fp32 weights (``gpt.hf.to_transformers``, use_cache=True,
  min_new_tokens = max_new_tokens so both produce the same count). fp32 must give the very tokens
  transformers gives before anything is timed; int8 and bf16 record how many agree (random weights
  make near-ties, so low-bit argmaxes may differ). fp32 batch 1 also times the seed's sampler (the
  whole context re-run for every token).
* ``test_generate_text_cpu``: the seed's API as users call it, ``generate_text(model, tokenizer,
  prompt, max_length=100, device="cpu")`` with its default sampling (temperature 1, top-k 40,
  top-p 0.95), against transformers ``generate`` with the same settings (do_sample=True); both
  count generated tokens per second. These are the README's headline CPU figures.

Roofline: batch-1 decoding reads every weight it multiplies once per token (fp32: 4 bytes a
parameter; int8: 1 byte plus fp32 scales), so ``bytes per token / memory bandwidth`` bounds
tokens/s. Bandwidth is measured here with a large tensor copy ((read + write) bytes / time).

GPU (CUDA only; skipped with a reason elsewhere): bf16, impl="auto" (Triton kernels), greedy,
batch 1 and 64, the eager decode step, the compiled one (``Decoder(compile=True)``:
``torch.compile(mode="reduce-overhead")``, a CUDA graph per step) and the eager step captured in a
CUDA graph without compiling (``Decoder(cuda_graph=True)``, the default on CUDA; the warm-up
generation pays one eager step and the capture, the timed ones replay that graph), against transformers
``generate`` (bf16, same weights, its default attention) on the same card. Goal: compiled >= 5x
transformers at batch 1. ``test_decode_attention_cuda`` times the split-K decode kernel against the
one-program-per-row FlashAttention kernel and SDPA at batch 1, and checks bf16 against float64.
``test_sampled_decoding_cuda`` times batch 1 with the seed's sampling drawn inside the decode graph
against drawn after each replay (and transformers sampling alike).

    python -m pytest bench/test_bench_sample.py --benchmark-group-by=group -q

CPU numbers are noisy when other processes share the cores.
"""

from __future__ import annotations

import time

import pytest
import torch

from bench.common import best_seconds, cuda_time_ms, record, requires_cuda
from gpt import GPT2Model, GPTConfig, generate_text
from gpt.generate import Decoder, generate
from gpt.hf import to_transformers
from gpt.ops import causal_attention_ref

PROMPT_LEN = 16
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def seed_model():
    torch.manual_seed(0)
    return GPT2Model(GPTConfig(), impl="torch").eval()


@pytest.fixture(scope="module")
def hf_model(seed_model):
    return to_transformers(seed_model)


def cpu_copy_gbs(nbytes: int = 1 << 28) -> float:
    """Host memory bandwidth: (read + write) bytes of a large copy over its time, best of 3."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def bytes_per_token(dec: Decoder) -> int:
    """Weight bytes one batch-1 decode step reads: every block's tensors, the final LayerNorm and
    the LM head (the tied embedding or its int8 copy); the two embedding rows looked up are ignored."""
    model = dec.model
    tensors = [*model.h.parameters(), *model.h.buffers(), *model.ln_f.parameters()]
    head = [model.wte.weight] if dec.lm_head is None else list(dec.lm_head.buffers())
    return sum(t.numel() * t.element_size() for t in tensors + head)


@torch.no_grad()
def hf_generate(hf, prompts: torch.Tensor, new_tokens: int, **sampling) -> list[list[int]]:
    settings = dict(do_sample=False) if not sampling else dict(do_sample=True, **sampling)
    out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, use_cache=True, pad_token_id=50256, **settings)
    return out[:, prompts.shape[1]:].tolist()


@torch.no_grad()
def recompute_greedy(model, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
    """The seed's sampler: the whole sequence through the model for every new token."""
    idx = prompts
    for _ in range(new_tokens):
        nxt = model(idx)[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
    return idx[:, prompts.shape[1]:].tolist()


CPU_CASES = {  # id: (Decoder options, batch)
    "fp32": ({}, 1),
    "int8": ({"quantize": "int8"}, 1),
    "bf16": ({"dtype": "bf16"}, 1),
    "fp32-batch8": ({}, 8),
}


@pytest.mark.benchmark(group="sample")
@pytest.mark.parametrize("case", list(CPU_CASES))
def test_sample_cpu(benchmark, seed_model, hf_model, case):
    """Greedy tokens/s of ours (a Decoder as sample.py builds it) and transformers, same run."""
    options, batch = CPU_CASES[case]
    dec = Decoder(seed_model, **options)
    prompts = torch.randint(0, 50000, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(batch))
    rows = prompts.tolist()

    def ours():
        return generate(dec, rows, NEW_TOKENS, temperature=0, eos_id=None)

    got, want = ours(), hf_generate(hf_model, prompts, NEW_TOKENS)
    agree = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w)) / (batch * NEW_TOKENS)
    if not options:
        assert got == want  # fp32: identical tokens
    tokens = batch * NEW_TOKENS
    ours_s, hf_s = best_seconds(ours, lambda: hf_generate(hf_model, prompts, NEW_TOKENS))
    benchmark.pedantic(ours, rounds=1, warmup_rounds=0)
    ours_s = min(ours_s, benchmark.stats.stats.min)
    info = dict(tokens_per_s=round(tokens / ours_s, 1), hf_tokens_per_s=round(tokens / hf_s, 1),
                ratio_vs_hf=round(hf_s / ours_s, 2), tokens_agreeing_with_hf=round(agree, 3),
                decoder=dec.summary, threads=torch.get_num_threads())
    if batch == 1:
        gbs = cpu_copy_gbs()
        nbytes = bytes_per_token(dec)
        limit = gbs * 1e9 / nbytes
        info.update(copy_gbs=round(gbs, 2), weight_mb_per_token=round(nbytes / 1e6, 1),
                    bandwidth_limit_tokens_per_s=round(limit, 1),
                    pct_of_bandwidth_limit=round(100 * tokens / ours_s / limit, 1))
    if case == "fp32":
        few = NEW_TOKENS // 2  # the recompute baseline is slow: half the tokens, same rate measure
        assert recompute_greedy(seed_model, prompts, few) == [want[0][:few]]
        (rec_s,) = best_seconds(lambda: recompute_greedy(seed_model, prompts, few), rounds=1)
        rec_rate = few / rec_s
        info.update(recompute_tokens_per_s=round(rec_rate, 1), ratio_vs_recompute=round(tokens / ours_s / rec_rate, 2))
    record(benchmark, **info)


@pytest.mark.benchmark(group="sample")
def test_generate_text_cpu(benchmark, seed_model, hf_model, tokenizer_dir):
    """The seed's entry point with its defaults (top-k 40, top-p 0.95, temperature 1) vs transformers
    sampling with the same settings; generated tokens per second on both sides."""
    from gpt.tokenizer import get_tokenizer

    tok = get_tokenizer(tokenizer_dir)
    prompt, max_length = "Once upon a time", 100
    ids = torch.tensor([tok.encode(prompt)])
    new = max_length - ids.shape[1]  # both generate this many: EOS (p ~ 1/50257 a step here) ends none

    def ours():
        return generate_text(seed_model, tok, prompt=prompt, max_length=max_length, device="cpu")

    torch.manual_seed(0)
    assert ours().startswith(prompt)
    ours_s, hf_s = best_seconds(ours, lambda: hf_generate(hf_model, ids, new, top_k=40, top_p=0.95, temperature=1.0))
    benchmark.pedantic(ours, rounds=1, warmup_rounds=0)
    ours_s = min(ours_s, benchmark.stats.stats.min)
    record(benchmark, tokens_per_s=round(new / ours_s, 1), hf_tokens_per_s=round(new / hf_s, 1),
           ratio_vs_hf=round(hf_s / ours_s, 2), generated_tokens=new, threads=torch.get_num_threads())


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

GPU_NEW_TOKENS = 128


@pytest.fixture(scope="module")
def cuda_models():
    """(ours, transformers') seed-sized models in bf16 on the GPU, same weights."""
    torch.manual_seed(0)
    model = GPT2Model(GPTConfig(dropout=0.0), impl="auto").eval()
    hf = to_transformers(model).to("cuda", torch.bfloat16)
    return model.to("cuda", torch.bfloat16), hf


@requires_cuda
@pytest.mark.benchmark(group="sample")
@pytest.mark.parametrize("mode", ["eager", "compiled", "cuda_graph"])
@pytest.mark.parametrize("batch", [1, 64])
def test_sample_cuda(benchmark, cuda_models, batch, mode):
    model, hf = cuda_models
    dec = Decoder(model, compile=mode == "compiled", cuda_graph=mode == "cuda_graph")
    prompts = torch.randint(0, 50000, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(batch))
    rows = prompts.tolist()
    with torch.inference_mode(), dec.running():  # one step (Triton, compiled or not) vs the torch reference
        cache = dec.new_cache(batch, PROMPT_LEN + 1, padded=False)
        dec.prefill(prompts.cuda(), cache)
        got = dec.step(torch.full((batch, 1), 7, device="cuda"), cache).clone()
        model.impl = "torch"
        cache.reset(PROMPT_LEN)
        want = Decoder(model).step(torch.full((batch, 1), 7, device="cuda"), cache)
    torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)

    def run():
        out = generate(dec, rows, GPU_NEW_TOKENS, temperature=0, eos_id=None)
        torch.cuda.synchronize()
        return out

    def hf_run():
        out = hf_generate(hf, prompts.cuda(), GPU_NEW_TOKENS)
        torch.cuda.synchronize()
        return out

    ours_tokens = run()  # warm-up: autotuning, compilation, graph recording
    hf_tokens = hf_run()
    agree = sum(a == b for g, w in zip(ours_tokens, hf_tokens) for a, b in zip(g, w)) / (batch * GPU_NEW_TOKENS)
    (hf_s,) = best_seconds(hf_run)
    benchmark.pedantic(run, rounds=3, warmup_rounds=0)
    tokens = batch * GPU_NEW_TOKENS
    ours_s = benchmark.stats.stats.min
    record(benchmark, tokens_per_s=round(tokens / ours_s, 1), hf_tokens_per_s=round(tokens / hf_s, 1),
           ratio_vs_hf=round(hf_s / ours_s, 2), tokens_agreeing_with_hf=round(agree, 3), mode=mode)


@requires_cuda
@pytest.mark.benchmark(group="sample")
@pytest.mark.parametrize("where", ["in_graph", "after_replay"])
def test_sampled_decoding_cuda(benchmark, cuda_models, where):
    """Batch 1 with the seed's sampling (temperature 1, top-k 40, top-p 0.95) through the default
    graphed ``Decoder``: drawn inside the decode graph (torch's default generator) or after each
    replay (a ``generator`` of the caller's: the ~12 launches of sampling a token go from the host,
    as every sample did before run 4); transformers ``generate`` samples with the same settings."""
    model, hf = cuda_models
    dec = Decoder(model)
    generator = None if where == "in_graph" else torch.Generator("cuda").manual_seed(0)
    prompt = torch.randint(0, 50000, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    sampling = dict(temperature=1.0, top_k=40, top_p=0.95)

    def run():
        out = generate(dec, prompt.tolist(), GPU_NEW_TOKENS, **sampling, eos_id=None, generator=generator)
        torch.cuda.synchronize()
        return out

    def hf_run():
        out = hf_generate(hf, prompt.cuda(), GPU_NEW_TOKENS, **sampling)
        torch.cuda.synchronize()
        return out

    (out,) = run()  # warm-up: autotuning, graph recording
    assert len(out) == GPU_NEW_TOKENS and all(0 <= t < model.config.vocab_size for t in out)
    assert (dec.graphed.sample is not None) == (where == "in_graph")
    hf_run()
    (hf_s,) = best_seconds(hf_run)
    benchmark.pedantic(run, rounds=3, warmup_rounds=0)
    ours_s = benchmark.stats.stats.min
    record(benchmark, tokens_per_s=round(GPU_NEW_TOKENS / ours_s, 1), hf_tokens_per_s=round(GPU_NEW_TOKENS / hf_s, 1),
           ratio_vs_hf=round(hf_s / ours_s, 2), where=where)


@requires_cuda
@pytest.mark.benchmark(group="sample")
@pytest.mark.parametrize("cache_len", [256, 1024, 4096])
def test_decode_attention_cuda(benchmark, cache_len):
    """Batch 1, 8 heads, D = 64, bf16: split-K over a full static cache vs one program per row."""
    import kernels

    B, H, D = 1, 8, 64
    g = torch.Generator().manual_seed(cache_len)
    q = torch.randn(B, H, 1, D, generator=g).to("cuda", torch.bfloat16)
    k, v = (torch.randn(B, H, cache_len, D, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    kv_len = torch.tensor([cache_len - 3], device="cuda")
    kv_start = torch.tensor([5], device="cuda")
    for starts in (None, kv_start):  # bf16 against float64 (the interpreter cannot check bf16 stores)
        out = kernels.decode_attention(q, k, v, kv_len, kv_start=starts)
        exact = causal_attention_ref(q.double(), k.double(), v.double(), kv_start=starts, kv_len=kv_len)
        peer = causal_attention_ref(q, k, v, kv_start=starts, kv_len=kv_len)
        assert (out.double() - exact).abs().max() <= 2 * (peer.double() - exact).abs().max() + 1e-2
    n = cache_len - 3
    split_ms = cuda_time_ms(lambda: kernels.decode_attention(q, k, v, kv_len))
    rowwise_ms = cuda_time_ms(lambda: kernels.causal_attention(q, k[:, :, :n], v[:, :, :n]))
    sdpa_ms = cuda_time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n]))
    benchmark.pedantic(lambda: kernels.decode_attention(q, k, v, kv_len), rounds=20, warmup_rounds=2)
    gbs = 2 * B * H * n * D * 2 / (split_ms * 1e-3) / 1e9  # K and V bytes read
    record(benchmark, gbs=round(gbs, 1), split_k_us=round(split_ms * 1e3, 1), rowwise_us=round(rowwise_ms * 1e3, 1),
           sdpa_us=round(sdpa_ms * 1e3, 1), speedup_vs_rowwise=round(rowwise_ms / split_ms, 2),
           speedup_vs_sdpa=round(sdpa_ms / split_ms, 2))
