"""The reference GPT-2: transformers parity, round trips, causality, determinism, input checks."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import gpt.checkpoint
from gpt import GPT2Model, GPTConfig, get_preset
from gpt.hf import export_hf, from_transformers, to_transformers
from gpt.ops import TORCH_OPS

from conftest import perturbed_model

ODD = GPTConfig(vocab_size=101, max_seq_length=40, num_layers=3, num_heads=3, d_model=48, d_ff=80,
                dropout=0.0)


def test_logits_match_transformers_and_round_trip_is_exact():
    model = perturbed_model(ODD, device="cpu")
    hf = to_transformers(model)
    idx = torch.randint(0, ODD.vocab_size, (2, 37))  # T not a multiple of 8, 3 heads
    with torch.no_grad():
        ours = model(idx)
        theirs = hf(idx).logits
    assert ours.shape == (2, 37, ODD.vocab_size)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    back = from_transformers(hf, impl="torch")
    for (name, a), (name_b, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert name == name_b
        assert torch.equal(a, b), name


def test_export_loads_with_auto_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model = perturbed_model(ODD, device="cpu")
    export_hf(model, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, ODD.vocab_size, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx).logits, model(idx), atol=1e-5, rtol=1e-5)


def test_causality():
    model = perturbed_model(ODD, device="cpu")
    idx = torch.randint(0, ODD.vocab_size, (1, 30))
    changed = idx.clone()
    t = 17
    changed[0, t] = (idx[0, t] + 1) % ODD.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t], b[:, t])


def test_determinism_under_seed():
    a, b = perturbed_model(ODD, device="cpu", seed=3), perturbed_model(ODD, device="cpu", seed=3)
    idx = torch.randint(0, ODD.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(a(idx), b(idx))
    assert not torch.equal(a.wte.weight, perturbed_model(ODD, device="cpu", seed=4).wte.weight)


def test_seed_preset_parameter_count():
    config = get_preset("seed").model
    d, f, L, V, T = 512, 2048, 6, 50257, 256
    formula = V * d + T * d + L * (4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d) + 2 * d
    with torch.device("meta"):
        model = GPT2Model(config)
    print(f"seed preset: {model.num_params():,} parameters")
    assert model.num_params() == formula == config.num_params() == 44_777_984


def test_seed_constructor_and_checkpoint_load(tmp_path):
    model = GPT2Model(vocab_size=101, d_model=32, num_heads=2, num_layers=1, d_ff=64, max_seq_length=16)
    path = tmp_path / "ckpt.pt"
    torch.save({"model_state_dict": model.state_dict(), "config": model.config.to_dict()}, path)
    ckpt = torch.load(path)  # torch's default weights_only=True
    again = GPT2Model(GPTConfig.from_dict(ckpt["config"]))
    again.load_state_dict(ckpt["model_state_dict"])
    assert again.config == model.config


def test_initial_weights_follow_gpt2s_scheme():
    """Normal(0, 0.02) embeddings and Linear weights, residual projections 0.02/sqrt(2 * layers),
    zero biases, unit LayerNorm weights; each weight drawn once, so the same seed gives the same model."""
    config = GPTConfig(vocab_size=3001, max_seq_length=300, num_layers=4, num_heads=4, d_model=128, d_ff=512)
    torch.manual_seed(1)
    model = GPT2Model(config)
    drawn = torch.get_rng_state()
    torch.manual_seed(1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), GPT2Model(config).parameters()))
    # One draw a weight matrix and no other (nn.Linear's own kaiming draws skipped): replaying
    # them in order gives the first one (the token embedding) and leaves the generator where the model did.
    torch.manual_seed(1)
    replay = [torch.empty(p.shape).normal_(0.0, 0.02) for p in model.parameters() if p.dim() == 2]
    assert torch.equal(replay[0], model.wte.weight) and torch.equal(torch.get_rng_state(), drawn)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif ".ln_" in name or name.startswith("ln_f"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            std = 0.02 / (2 * config.num_layers) ** 0.5 if name.endswith("c_proj.weight") else 0.02
            assert abs(p.mean().item()) < 3 * std / p.numel() ** 0.5, name
            assert p.std().item() == pytest.approx(std, rel=0.02), name


def test_an_uninitialized_model_draws_nothing_and_loads_a_checkpoint_exactly(tmp_path):
    """``GPT2Model.uninitialized`` (what checkpoint and transformers loads build): the parameters of
    ``GPT2Model(config)`` (names, shapes, dtypes, device, requires_grad) without a random draw, and
    without importing torch._dynamo or sympy (~2 s on first use, the meta device's normal_ and
    empty_like); loaded from a checkpoint, it computes exactly what the saved model does."""
    import subprocess
    import sys

    saved = perturbed_model(ODD, device="cpu", seed=5)
    rng = torch.get_rng_state()
    empty = GPT2Model.uninitialized(ODD, impl="torch")
    assert torch.equal(torch.get_rng_state(), rng)
    assert ([(n, p.shape, p.dtype, p.device, p.requires_grad) for n, p in empty.named_parameters()]
            == [(n, p.shape, p.dtype, p.device, p.requires_grad) for n, p in saved.named_parameters()])
    path = tmp_path / "ckpt.pt"
    torch.save({"model_state_dict": saved.state_dict(), "config": ODD.to_dict()}, path)
    loaded = gpt.checkpoint.load_model(path, impl="torch").eval()
    idx = torch.randint(0, ODD.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(idx), saved(idx))
    code = ("import sys, torch; from gpt import GPT2Model, GPTConfig; "
            "c = GPTConfig(vocab_size=101, max_seq_length=8, num_layers=1, num_heads=2, d_model=8, d_ff=16); "
            "m, n = GPT2Model.uninitialized(c), GPT2Model(c); "
            "print(m.wte.weight.device, n.wte.weight.device, 'torch._dynamo' in sys.modules, 'sympy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["cpu", "cpu", "False", "False"]  # a new model's build too


def test_config_dict_round_trip_and_presets():
    for name in ("seed", "tiny", "gpt2"):
        cfg = get_preset(name).model
        assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert get_preset("gpt2").model.num_params() == 124_439_808
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(d_model=50, num_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")


def test_bad_input_raises_value_error_naming_the_limit():
    model = perturbed_model(ODD, device="cpu")
    with pytest.raises(ValueError, match=r"\[0, 101\)"):
        model(torch.tensor([[1, 2, 101]]))
    with pytest.raises(ValueError, match=r"\[0, 101\)"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="context limit of 40"):
        model(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="impl"):
        model.impl = "cuda"


def test_loss_matches_cross_entropy_and_counts_real_tokens():
    model = perturbed_model(ODD, device="cpu")
    idx = torch.randint(0, ODD.vocab_size, (2, 12))
    targets = torch.randint(0, ODD.vocab_size, (2, 12))
    targets[1, 5:] = -1  # ignored
    with torch.no_grad():
        logits = model(idx)
        out = model(idx, targets)
    keep = targets != -1
    ref = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(out.loss, ref)
    assert out.count.item() == keep.sum().item()
    assert out.correct.item() == (logits.argmax(-1)[keep] == targets[keep]).sum().item()


def test_kv_cache_prefill_and_decode_match_full_forward():
    from gpt import KVCache

    model = perturbed_model(ODD, device="cpu")
    idx = torch.randint(0, ODD.vocab_size, (2, 15))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.allocate(ODD, 2, "cpu", torch.float32)
        steps = [model(idx[:, :9], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(9, 15)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 15


def textbook_block(block, s):
    """The pre-LN block on residual stream s with F.layer_norm and SDPA: (s + attn, s + attn + mlp)."""
    B, T, C = s.shape
    h = F.layer_norm(s, (C,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    q, k, v = (t.transpose(1, 2) for t in block.attn.c_attn(h).view(B, T, 3, block.attn.num_heads, -1).unbind(2))
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
    s = s + block.attn.c_proj(a)
    return s, s + block.mlp(F.layer_norm(s, (C,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps))


def test_block_is_a_pre_ln_block_with_the_add_carried_over():
    """Block(x, delta) is the textbook block applied to x + delta, its own output returned unsummed."""
    block = perturbed_model(ODD, device="cpu").h[1]
    x, delta = torch.randn(2, 11, ODD.d_model), torch.randn(2, 11, ODD.d_model)
    with torch.no_grad():
        out, resid = block(x, delta, TORCH_OPS)
        after_attn, ref = textbook_block(block, x + delta)
        first_out, first_resid = block(x, None, TORCH_OPS)  # the first block: nothing pending
        first_after_attn, first_ref = textbook_block(block, x)
    torch.testing.assert_close(resid, after_attn, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out + resid, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first_resid, first_after_attn, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first_out + first_resid, first_ref, atol=1e-5, rtol=1e-5)


def test_branch_dropout_is_applied_by_the_next_add_layer_norm_in_training_only(monkeypatch):
    """GPT-2's dropout on each attention and MLP output is applied by the add + LayerNorm that
    follows it (where the Triton kernel draws the mask in its own pass): in training every such
    call gets the config's dropout, in eval none. With impl torch a training forward is the textbook
    one -- F.dropout on the embeddings and after each branch, in that order -- draw for draw."""
    cfg = GPTConfig(**{**ODD.to_dict(), "dropout": 0.25})
    model = perturbed_model(cfg, device="cpu")
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    seen = []
    spy = TORCH_OPS._replace(add_layer_norm=lambda *a: seen.append(a[6] if len(a) > 6 else 0.0)
                             or TORCH_OPS.add_layer_norm(*a))
    model.impl = spy
    for training, expected in ((True, 0.25), (False, 0.0)):
        seen.clear()
        model.train(training)
        model.hidden_states(idx)
        assert seen == [expected] * (2 * cfg.num_layers), training  # ln_2 of each block, ln_1 after the first, ln_f

    model.impl, _ = "torch", model.train()
    torch.manual_seed(3)
    ours = model.hidden_states(idx)
    torch.manual_seed(3)
    C = cfg.d_model
    x = F.dropout(model.wte(idx) + model.wpe(torch.arange(9)), 0.25)
    for block in model.h:
        a, _ = textbook_block(block, x)  # x + c_proj(attention): the branch is a - x
        x = x + F.dropout(a - x, 0.25)
        m = block.mlp(F.layer_norm(x, (C,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps))
        x = x + F.dropout(m, 0.25)
    textbook = F.layer_norm(x, (C,), model.ln_f.weight, model.ln_f.bias, model.ln_f.eps)
    torch.testing.assert_close(ours, textbook, atol=1e-5, rtol=1e-5)
    torch.manual_seed(4)
    assert not torch.allclose(model.hidden_states(idx), ours)  # another draw


def test_per_block_activation_checkpointing_gives_the_same_gradients():
    """Blocks are self-contained modules: recomputing each one in backward changes nothing."""
    model = perturbed_model(ODD, device="cpu")
    idx = torch.randint(0, ODD.vocab_size, (2, 13))

    def loss(recompute: bool):
        model.zero_grad()
        x = model.wte(idx) + model.wpe(torch.arange(13))
        delta = None
        for block in model.h:
            delta, x = (checkpoint(block, x, delta, TORCH_OPS, use_reentrant=False) if recompute
                        else block(x, delta, TORCH_OPS))
        h, _ = TORCH_OPS.add_layer_norm(delta, x, model.ln_f.weight, model.ln_f.bias, model.ln_f.eps)
        out = F.linear(h, model.wte.weight).logsumexp(-1).mean()
        out.backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, plain_grads = loss(False)
    again, again_grads = loss(True)
    assert torch.equal(plain, again)
    for name, g in plain_grads.items():
        assert torch.equal(again_grads[name], g), name
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logsumexp(-1).mean(), plain)


def test_auto_impl_runs_triton_only_where_the_kernels_cover_the_model(monkeypatch):
    kernels = pytest.importorskip("kernels")
    from gpt.ops import resolve_impl

    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device name only: no GPU needed
    assert resolve_impl("auto", cuda, GPTConfig()) == "triton"  # head dim 64
    assert resolve_impl("auto", cuda) == "triton"
    assert resolve_impl("auto", cpu, GPTConfig()) == "torch"
    assert resolve_impl("auto", cuda, GPTConfig(d_model=32, num_heads=4)) == "torch"  # head dim 8: no kernel
    for capability, impl in (((9, 0), "triton"), ((8, 0), "torch")):  # dropout in the kernels: Hopper on
        monkeypatch.setattr(kernels.attention, "_capability", lambda index: capability)
        assert resolve_impl("auto", torch.device("cuda:0"), GPTConfig(attn_dropout=0.1)) == impl
        assert resolve_impl("auto", torch.device("cuda:0"), GPTConfig(attn_dropout=0.1), training=False) == "triton"
        assert resolve_impl("auto", torch.device("cuda:0"), GPTConfig()) == "triton"
    assert resolve_impl("triton", cuda, GPTConfig(d_model=32, num_heads=4)) == "triton"  # asked for: its error
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("fast", cpu)
