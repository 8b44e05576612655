"""The reference GPT-2: transformers parity, round trips, causality, determinism, input checks."""

import pytest
import torch

from gpt import GPT2Model, GPTConfig, get_preset
from gpt.hf import export_hf, from_transformers, to_transformers

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
