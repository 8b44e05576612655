"""Matching perplexity: the fast path trains and evaluates the same model as the reference path.

On a CPU: fp32, Triton's interpreter, a tiny model on the shared TinyStories sample.
On a GPU: bf16 autocast, the seed-sized model's width at reduced depth.
Same checkpoint through impl="torch" and impl="triton": test perplexity within 0.1% (relative).
Same initial weights and data, N AdamW steps through each: losses within the stated tolerance.
"""

import copy
import math

import pytest
import torch

from bench.common import record
from gpt import GPT2Model, GPTConfig
from gpt.checkpoint import load_model, save_checkpoint

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# CPU: tiny and fp32 (the interpreter is slow); GPU: seed width, bf16.
CFG = (GPTConfig(max_seq_length=256, num_layers=2, num_heads=8, d_model=512, d_ff=2048, dropout=0.0) if CUDA
       else GPTConfig(max_seq_length=64, num_layers=2, num_heads=2, d_model=64, d_ff=128, dropout=0.0))
STEPS = 30 if CUDA else 8
BATCH = 16 if CUDA else 4
EVAL_TOKENS = 1 << 17 if CUDA else 2048
# bf16 rounds differently in the two paths; fp32 under the interpreter agrees to float noise.
LOSS_RTOL = 2e-2 if CUDA else 1e-4


@pytest.fixture(scope="module")
def splits(tokenizer_dir, stories_dir, tmp_path_factory):
    from gpt.data import prepare_data
    from gpt.tokenizer import get_tokenizer

    return prepare_data(str(stories_dir / "tinystories-sample.jsonl"), get_tokenizer(str(tokenizer_dir)),
                        cache_dir=tmp_path_factory.mktemp("cache"), num_stories=600, progress=False)


def autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else torch.autocast("cpu", enabled=False)


def train(model, splits, steps):
    from gpt.data import TrainBatches

    batches = TrainBatches(splits.train, BATCH, CFG.max_seq_length, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    for _ in range(steps):
        x, y = (t.to(DEVICE) for t in batches.next())
        with autocast():
            loss = model(x, y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses).float().cpu()


@torch.no_grad()
def perplexity(model, tokens):
    from gpt.data import eval_batches

    model.eval()
    total, count = 0.0, 0
    for x, y in eval_batches(tokens, CFG.max_seq_length, BATCH, max_tokens=EVAL_TOKENS):
        with autocast():
            out = model(x.to(DEVICE), y.to(DEVICE))
        total += out.loss.double().item() * out.count.item()
        count += out.count.item()
    return math.exp(total / count), count


def test_training_curves_match(splits):
    torch.manual_seed(0)
    ref = GPT2Model(CFG, impl="torch").to(DEVICE)
    fast = copy.deepcopy(ref)
    fast.impl = "triton"
    l_ref, l_fast = train(ref, splits, STEPS), train(fast, splits, STEPS)
    print(f"\nloss torch : {[round(v, 4) for v in l_ref.tolist()]}\nloss triton: {[round(v, 4) for v in l_fast.tolist()]}")
    torch.testing.assert_close(l_fast, l_ref, rtol=LOSS_RTOL, atol=0.0)
    assert l_ref[-1] < l_ref[0]


def test_same_checkpoint_same_test_perplexity(splits, tmp_path, benchmark):
    torch.manual_seed(1)
    model = GPT2Model(CFG, impl="torch").to(DEVICE)
    train(model, splits, STEPS)
    save_checkpoint({"model_state_dict": model.state_dict(), "config": CFG.to_dict()}, tmp_path / "m.pt")
    ppl = {}
    for impl in ("torch", "triton"):
        m = load_model(tmp_path / "m.pt", map_location=DEVICE, impl=impl)
        ppl[impl], count = perplexity(m, splits.test)
    rel = abs(ppl["triton"] - ppl["torch"]) / ppl["torch"]
    print(f"\ntest perplexity over {count} tokens: torch {ppl['torch']:.4f}, triton {ppl['triton']:.4f}, rel diff {rel:.2e}")
    assert rel < 1e-3
    benchmark.group = "match"
    m = load_model(tmp_path / "m.pt", map_location=DEVICE, impl="triton")
    result = benchmark.pedantic(perplexity, args=(m, splits.test), rounds=1, iterations=1)
    assert result[0] == pytest.approx(ppl["triton"], rel=1e-3)
    record(benchmark, ppl_torch=ppl["torch"], ppl_triton=ppl["triton"], rel_diff=rel,
           tokens_per_s=count / benchmark.stats.stats.mean)
