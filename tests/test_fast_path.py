"""End to end, llm.c style: the Triton path against the reference path on the whole model.

In fp32 on DEVICE (the GPU, or Triton's interpreter on a CPU), impl="triton" must give the same
logits, loss, every parameter gradient and the same losses over a few AdamW steps as impl="torch".
"""

import copy

import pytest
import torch

from gpt import GPTConfig, KVCache

from conftest import DEVICE, perturbed_model

CFG = GPTConfig(vocab_size=97, max_seq_length=48, num_layers=2, num_heads=3, d_model=48, d_ff=96, dropout=0.0)


def models():
    ref = perturbed_model(CFG, device=DEVICE)
    fast = copy.deepcopy(ref)
    fast.impl = "triton"
    return ref, fast


def batch(T=29, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, CFG.vocab_size, (B, T + 1), generator=g).to(DEVICE)
    return idx[:, :-1], idx[:, 1:]


def test_logits_loss_and_every_gradient_match():
    ref, fast = models()
    x, y = batch()
    torch.testing.assert_close(fast(x), ref(x), atol=2e-5, rtol=2e-5)
    out_ref, out_fast = ref(x, y), fast(x, y)
    torch.testing.assert_close(out_fast.loss, out_ref.loss, atol=1e-5, rtol=1e-5)
    assert out_fast.correct == out_ref.correct
    out_ref.loss.backward()
    out_fast.loss.backward()
    for (name, p_ref), (_, p_fast) in zip(ref.named_parameters(), fast.named_parameters()):
        torch.testing.assert_close(p_fast.grad, p_ref.grad, atol=2e-5, rtol=1e-4, msg=name)


def test_optimizer_steps_give_the_same_losses():
    ref, fast = models()
    losses = {}
    for m in (ref, fast):
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1)
        losses[m.impl] = []
        x, y = batch(T=19, seed=10)  # one batch, memorised: the loss must fall
        for _ in range(3):
            loss = m(x, y).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[m.impl].append(loss.item())
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-5, abs=1e-6)
    assert losses["torch"][-1] < losses["torch"][0]


def test_cached_decode_matches_reference():
    ref, fast = models()
    x, _ = batch(T=20, B=3)
    with torch.no_grad():
        full = ref(x)
        cache = KVCache.allocate(CFG, 3, DEVICE, torch.float32)
        cache.start[1] = 4  # row 1 is left-padded: its first 4 slots are padding
        steps = [fast(x[:, :12], cache=cache)] + [fast(x[:, t:t + 1], cache=cache) for t in range(12, 20)]
    got = torch.cat(steps, 1)
    torch.testing.assert_close(got[[0, 2]], full[[0, 2]], atol=2e-5, rtol=2e-5)
    with torch.no_grad():
        padded_ref = ref(x[1:2, 4:])  # row 1 without its padding, positions from 0
    torch.testing.assert_close(got[1:2, 4:], padded_ref, atol=2e-5, rtol=2e-5)
