"""Tokenization throughput on the shared TinyStories sample: ours (tiktoken, batched on every core)
against transformers' GPT2TokenizerFast (one batch call) and the seed's approach (GPT2Tokenizer, one
story at a time, every epoch; in transformers 5 GPT2Tokenizer is Rust-backed, in 4.x it was pure
Python and slower still). Each checks its ids against ours before timing.

    python -m pytest bench/test_bench_data.py --benchmark-only
"""

import json
import os
import time

import pytest

from bench.common import record
from gpt.data import prepare_data
from gpt.tokenizer import get_tokenizer

SLOW_STORIES = 1000  # the slow tokenizer is timed on this many stories; MB/s extrapolates
SEED_CONTEXT = 256  # the seed padded (and truncated) every story to this many tokens


@pytest.fixture(scope="module")
def texts(stories_dir):
    with open(stories_dir / "tinystories-sample.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return get_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def ours(tok, texts):
    return tok.encode_batch(texts)


def megabytes(texts):
    return sum(len(t.encode("utf-8")) for t in texts) / 1e6


def best_seconds(fn, repeats=2):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.mark.benchmark(group="data")
def test_tokenize_ours_batch(benchmark, tok, tokenizer_dir, texts, ours):
    transformers = pytest.importorskip("transformers")
    fast = transformers.GPT2TokenizerFast.from_pretrained(str(tokenizer_dir))
    slow = transformers.GPT2Tokenizer.from_pretrained(str(tokenizer_dir))
    subset = texts[:SLOW_STORIES]
    assert fast(texts)["input_ids"] == ours
    result = benchmark.pedantic(tok.encode_batch, args=(texts,), rounds=3, iterations=1, warmup_rounds=1)
    assert result == ours
    ours_s = benchmark.stats.stats.min
    # Peers timed in this same test, so the ratios compare like with like.
    fast_s = best_seconds(lambda: fast(texts)["input_ids"])
    slow_s = best_seconds(lambda: [slow.encode(t) for t in subset]) * megabytes(texts) / megabytes(subset)
    mb = megabytes(texts)
    record(benchmark, mb_per_s=round(mb / ours_s, 2), tokens_per_s=round(sum(map(len, ours)) / ours_s),
           threads=os.cpu_count(), speedup_vs_gpt2_tokenizer_fast=round(fast_s / ours_s, 2),
           speedup_vs_seed_slow_per_story=round(slow_s / ours_s, 2), sample_mb=round(mb, 2))


@pytest.mark.benchmark(group="data")
def test_tokenize_gpt2_tokenizer_fast_batch(benchmark, tokenizer_dir, texts, ours):
    transformers = pytest.importorskip("transformers")
    fast = transformers.GPT2TokenizerFast.from_pretrained(str(tokenizer_dir))
    result = benchmark.pedantic(lambda: fast(texts)["input_ids"], rounds=2, iterations=1)
    assert result == ours
    record(benchmark, mb_per_s=round(megabytes(texts) / benchmark.stats.stats.min, 2))


@pytest.mark.benchmark(group="data")
def test_tokenize_seed_slow_per_story(benchmark, tokenizer_dir, texts, ours):
    """The seed: the Python GPT2Tokenizer per story, on every epoch (timed on a subset)."""
    transformers = pytest.importorskip("transformers")
    slow = transformers.GPT2Tokenizer.from_pretrained(str(tokenizer_dir))
    subset = texts[:SLOW_STORIES]
    result = benchmark.pedantic(lambda: [slow.encode(t) for t in subset], rounds=2, iterations=1)
    assert result == ours[:SLOW_STORIES]
    mb_per_s = megabytes(subset) / benchmark.stats.stats.min
    record(benchmark, mb_per_s=round(mb_per_s, 2), stories=len(subset),
           seconds_per_epoch_of_sample=round(megabytes(texts) / mb_per_s, 2))


@pytest.mark.benchmark(group="data")
def test_prepare_data_cold_and_cached(benchmark, tok, stories_dir, texts, ours, tmp_path):
    """End to end: read the jsonl, tokenize, split, write the cache; then a cached call."""
    src = stories_dir / "tinystories-sample.jsonl"
    dirs = iter(range(100))

    def cold():
        return prepare_data(src, tok, tmp_path / f"c{next(dirs)}", num_stories=0, progress=False)

    splits = benchmark.pedantic(cold, rounds=2, iterations=1)
    assert sum(splits.meta["tokens"].values()) == sum(map(len, ours)) + len(ours)
    cached_s = best_seconds(lambda: prepare_data(src, tok, splits.path.parent, num_stories=0, progress=False), 3)
    # What the seed's padding to 256 tokens per story cost: padded positions, and tokens cut off.
    lengths = [len(ids) for ids in ours]
    slots = SEED_CONTEXT * len(lengths)
    record(benchmark, mb_per_s=round(megabytes(texts) / benchmark.stats.stats.min, 2),
           cached_call_ms=round(cached_s * 1e3, 1),
           seed_padding_fraction=round(sum(SEED_CONTEXT - min(n, SEED_CONTEXT) for n in lengths) / slots, 3),
           seed_truncated_fraction=round(sum(max(n - SEED_CONTEXT, 0) for n in lengths) / sum(lengths), 3))
