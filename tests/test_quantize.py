"""Low-bit decoding: the int8 quantiser, Int8Linear on both of its paths, and the quality bound.

Quality: a small model trained here on the shared TinyStories sample (seeded, so the same
checkpoint every run) keeps its test-split perplexity within 1% of fp32 with int8 weights and
within 0.5% with bf16 weights, through the same ``Decoder`` that sampling uses. To train in
seconds, the sample's tokens are mapped onto its 2,047 most frequent ones plus one "other" id
(96% of tokens keep their own id), so the LM head is 2,048 x 64 instead of 50,257 x 64.
"""

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt import GPT2Model, GPTConfig, TrainConfig
from gpt.data import TrainBatches, eval_batches
from gpt.generate import Decoder, generate
from gpt.quantize import Int8Linear, quantize_int8

VOCAB = 2048
CFG = GPTConfig(vocab_size=VOCAB, max_seq_length=64, num_layers=2, num_heads=2, d_model=64, d_ff=256, dropout=0.0)
STEPS = 150
EVAL_TOKENS = 16384


def test_quantize_int8_per_channel():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=g) * torch.tensor([1e-3, 0.02, 1.0, 30.0, 0.0, 5.0])[:, None]
    w_q, scale = quantize_int8(w)
    assert w_q.dtype == torch.int8 and w_q.is_contiguous() and scale.dtype == torch.float32
    assert w_q[[0, 1, 2, 3, 5]].abs().amax(1).tolist() == [127] * 5  # each row spans its own range
    assert torch.equal(w_q[4], torch.zeros(40, dtype=torch.int8))
    err = (w_q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-6)).all()  # round to nearest


@pytest.mark.parametrize("K", [48, 24], ids=["int8pack_mm", "fallback"])  # the CPU op needs K % 16 == 0
def test_int8_linear_matches_its_dequantized_weights(K):
    g = torch.Generator().manual_seed(K)
    linear = torch.nn.Linear(K, 37)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(37, K, generator=g) * 0.1)
        linear.bias.copy_(torch.randn(37, generator=g))
    q = Int8Linear.from_linear(linear)
    x = torch.randn(2, 5, K, generator=g)
    w = q.weight.float() * q.scale[:, None]
    exact = F.linear(x.double(), w.double(), linear.bias.double())
    got = q(x)
    assert got.shape == (2, 5, 37) and got.dtype == torch.float32
    # The CPU op rounds x and the product to bf16 (2^-8 relative); the fallback is exact fp32 math.
    tol = 2 * 2 ** -8 * (x.abs() @ w.abs().t()).max().item() if K % 16 == 0 else 1e-5
    assert (got.double() - exact).abs().max().item() <= tol
    torch.testing.assert_close(got, linear(x), atol=0.05, rtol=0.05)  # and close to the fp32 layer


@contextlib.contextmanager
def single_thread():
    """Tiny matrices: threads only add synchronisation (20x slower steps on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def trained(tokenizer_dir, stories_dir, tmp_path_factory):
    """(model, test tokens): CFG trained for STEPS AdamW steps on the sample, tokens mapped to VOCAB ids."""
    from gpt.data import prepare_data
    from gpt.tokenizer import get_tokenizer
    from gpt.step import build_optimizer, train_step

    splits = prepare_data(str(stories_dir / "tinystories-sample.jsonl"), get_tokenizer(str(tokenizer_dir)),
                          cache_dir=tmp_path_factory.mktemp("cache"), num_stories=2000, progress=False)
    counts = np.bincount(splits.train, minlength=50257)
    ids = np.full(50257, VOCAB - 1, dtype=np.uint16)  # everything else -> "other"
    ids[np.argsort(-counts, kind="stable")[:VOCAB - 1]] = np.arange(VOCAB - 1, dtype=np.uint16)
    train, test = ids[splits.train], ids[splits.test]
    torch.manual_seed(0)
    model = GPT2Model(CFG, impl="torch")
    opt = build_optimizer(model, TrainConfig(lr=3e-3, weight_decay=0.0), torch.device("cpu"))
    batches = TrainBatches(train, 16, CFG.max_seq_length, seed=0)
    with single_thread():
        for _ in range(STEPS):
            train_step(model, opt, [batches.next()], device=torch.device("cpu"), dtype="fp32", grad_clip=1.0)
    return model.eval(), test


def perplexity(decoder: Decoder, tokens) -> float:
    loss, count = 0.0, 0
    with torch.no_grad():
        for x, y in eval_batches(tokens, CFG.max_seq_length, 16, max_tokens=EVAL_TOKENS):
            logits = decoder.logits(x)
            loss += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum").item()
            count += int((y != -1).sum())
    return math.exp(loss / count)


def test_int8_and_bf16_keep_test_perplexity_within_bounds(trained, one_thread):
    model, test = trained
    fp32 = perplexity(Decoder(model), test)
    assert fp32 < 0.3 * VOCAB  # trained: far from uniform guessing
    for kwargs, bound in [(dict(quantize="int8"), 0.01), (dict(dtype="bf16"), 0.005)]:
        ppl = perplexity(Decoder(model, **kwargs), test)
        rel = abs(ppl - fp32) / fp32
        print(f"{kwargs}: test perplexity {ppl:.3f} vs fp32 {fp32:.3f} ({100 * rel:.3f}%)")
        assert 0 < rel < bound, (kwargs, ppl, fp32)  # changed by the weights, within the bound


def test_int8_and_bf16_decoding_runs_and_follows_fp32(trained, one_thread):
    """Greedy continuations of a trained model: the low-bit decoders agree with fp32 on most tokens."""
    model, test = trained
    prompts = [test[i:i + 12].tolist() for i in (0, 500, 1000)]
    want = generate(model, prompts, 40, temperature=0, eos_id=None)  # crosses the 64-token context
    for kwargs in (dict(quantize="int8"), dict(dtype="bf16"), dict(dtype="bf16", quantize="int8")):
        got = generate(Decoder(model, **kwargs), prompts, 40, temperature=0, eos_id=None)
        agree = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w)) / (3 * 40)
        assert agree > 0.5, (kwargs, agree)


def test_bf16_decode_copy_multiplies_one_row_by_mv_as_f_linear_would():
    """A CPU bf16 decode copy's linear layers and head are RowLinear: one row through torch.mv, the
    same values as F.linear's bf16 GEMM to rounding; more rows (prefill, perplexity) through F.linear."""
    from gpt.generate import RowLinear

    torch.manual_seed(0)
    w, b = torch.randn(96, 64).bfloat16(), torch.randn(96).bfloat16()
    layer = RowLinear(w, b)
    for x in (torch.randn(1, 1, 64).bfloat16(), torch.randn(64).bfloat16()):  # one row, any leading shape
        want = F.linear(x, w, b)
        got = layer(x)
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.02)  # a bf16 rounding or two
    rows = torch.randn(3, 5, 64).bfloat16()
    assert torch.equal(layer(rows), F.linear(rows, w, b))
    model = GPT2Model(CFG, impl="torch").eval()
    dec = Decoder(model, dtype="bf16")
    assert isinstance(dec.lm_head, RowLinear) and dec.lm_head.weight is dec.model.wte.weight
    assert isinstance(dec.model.h[0].mlp.c_fc, RowLinear) and not any(
        isinstance(m, torch.nn.Linear) for m in dec.model.h.modules())
    assert all(isinstance(m, torch.nn.Linear) for m in (model.h[0].mlp.c_fc, model.h[0].attn.c_attn))  # the caller's
    assert Decoder(model).lm_head is None  # fp32 decodes the model itself
