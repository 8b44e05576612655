"""Sampling speed: our KV-cache sampler vs transformers' ``generate`` vs full recomputation.

CPU (the seed-sized model, GPTConfig() defaults, random weights, fp32, greedy): generated tokens
per second at batch 1 and 8 for ``gpt.generate.generate``, for ``GPT2LMHeadModel.generate`` on the
same weights (``gpt.hf.to_transformers``, use_cache=True, min_new_tokens = max_new_tokens so both
produce the same count) and, at batch 1, for the seed's way (the whole context re-run for every
token). Both samplers must produce identical greedy tokens before anything is timed.

Ours runs as sample.py runs it on a CPU, with ``column_major_weights_`` (MKL's one-row products
are about twice as fast on that layout); ``row_major_tokens_per_s`` is ours with nn.Linear's layout.

Roofline: batch-1 decoding reads every weight once per step, so ``weight bytes / memory bandwidth``
bounds tokens/s. Bandwidth is measured here with a large tensor copy ((read + write) bytes / time).

GPU (CUDA only): bf16, impl="auto" (Triton kernels), tokens/s at batch 1 and 64, with the eager
decode step and with ``torch.compile(decode_one, dynamic=True)``.

    python -m pytest bench/test_bench_sample.py --benchmark-group-by=group -q

CPU numbers are noisy when other processes share the cores.
"""

from __future__ import annotations

import time

import pytest
import torch

from bench.common import record, requires_cuda
from gpt import GPT2Model, GPTConfig
from gpt.generate import column_major_weights_, decode_one, generate, prefill
from gpt.hf import to_transformers
from gpt.kvcache import KVCache

PROMPT_LEN = 16
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def seed_model():
    torch.manual_seed(0)
    return GPT2Model(GPTConfig(), impl="torch").eval()


@pytest.fixture(scope="module")
def seed_model_column_major(seed_model):
    twin = GPT2Model(seed_model.config, impl="torch").eval()
    twin.load_state_dict(seed_model.state_dict())
    return column_major_weights_(twin)


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


def best_seconds(fn, rounds: int = 2) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def hf_greedy(hf, prompts: torch.Tensor) -> list[list[int]]:
    out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=NEW_TOKENS,
                      min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True, pad_token_id=50256)
    return out[:, prompts.shape[1]:].tolist()


@torch.no_grad()
def recompute_greedy(model, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
    """The seed's sampler: the whole sequence through the model for every new token."""
    idx = prompts
    for _ in range(new_tokens):
        nxt = model(idx)[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
    return idx[:, prompts.shape[1]:].tolist()


@pytest.mark.benchmark(group="sample")
@pytest.mark.parametrize("batch", [1, 8])
def test_sample_cpu(benchmark, seed_model, seed_model_column_major, batch):
    """Ours as sample.py runs it on a CPU (column-major weights); also ours with nn.Linear's layout."""
    hf = to_transformers(seed_model)
    prompts = torch.randint(0, 50000, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(batch))
    rows = prompts.tolist()

    def ours(model=seed_model_column_major):
        return generate(model, rows, NEW_TOKENS, temperature=0, eos_id=None)

    want = ours()
    assert want == hf_greedy(hf, prompts) == ours(seed_model)
    tokens = batch * NEW_TOKENS
    hf_s = best_seconds(lambda: hf_greedy(hf, prompts))
    row_major_s = best_seconds(lambda: ours(seed_model))
    benchmark.pedantic(ours, rounds=2, warmup_rounds=0)
    ours_s = benchmark.stats.stats.min
    info = dict(tokens_per_s=round(tokens / ours_s, 1), hf_tokens_per_s=round(tokens / hf_s, 1),
                ratio_vs_hf=round(hf_s / ours_s, 2), row_major_tokens_per_s=round(tokens / row_major_s, 1),
                threads=torch.get_num_threads())
    if batch == 1:
        few = NEW_TOKENS // 2  # the recompute baseline is slow: half the tokens, same rate measure
        t0 = time.perf_counter()
        assert recompute_greedy(seed_model, prompts, few) == [want[0][:few]]
        rec_rate = few / (time.perf_counter() - t0)
        info.update(recompute_tokens_per_s=round(rec_rate, 1), ratio_vs_recompute=round(tokens / ours_s / rec_rate, 2))
        gbs = cpu_copy_gbs()
        weight_bytes = 4 * seed_model.num_params()
        info.update(copy_gbs=round(gbs, 2), weight_mb_per_token=round(weight_bytes / 1e6, 1),
                    bandwidth_limit_tokens_per_s=round(gbs * 1e9 / weight_bytes, 1),
                    pct_of_bandwidth_limit=round(100 * (tokens / ours_s) / (gbs * 1e9 / weight_bytes), 1))
    record(benchmark, **info)


@requires_cuda
@pytest.mark.benchmark(group="sample")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("batch", [1, 64])
def test_sample_cuda(benchmark, batch, compiled):
    torch.manual_seed(0)
    model = GPT2Model(GPTConfig(dropout=0.0), impl="auto").to("cuda", torch.bfloat16).eval()
    rows = torch.randint(0, 50000, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(batch)).tolist()
    step = torch.compile(decode_one, dynamic=True) if compiled else decode_one
    with torch.no_grad():  # the decode step (compiled or not) against the eager torch reference
        cache = KVCache.allocate(model.config, batch, "cuda", torch.bfloat16, max_len=PROMPT_LEN + 1)
        prefill(model, torch.tensor(rows, device="cuda"), cache)
        got = step(model, torch.full((batch, 1), 7, device="cuda"), cache)
        model.impl = "torch"
        cache.pos = PROMPT_LEN
        want = decode_one(model, torch.full((batch, 1), 7, device="cuda"), cache)
        model.impl = "auto"
    torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)
    new = 128

    def run():
        out = generate(model, rows, new, temperature=0, eos_id=None, decode_fn=step)
        torch.cuda.synchronize()
        return out

    run()  # warm-up: autotuning, compilation
    benchmark.pedantic(run, rounds=3, warmup_rounds=0)
    record(benchmark, tokens_per_s=round(batch * new / benchmark.stats.stats.min, 1), compiled=compiled)
