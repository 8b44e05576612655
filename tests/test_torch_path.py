"""The torch table's fused shortcuts against the written-out reference math.

``TORCH_OPS.attention`` runs ``F.scaled_dot_product_attention`` (with the reference's mask where
``is_causal`` cannot say it), and the explicit ``causal_attention_ref`` only with dropout; ``layer_norm_ref`` is
torch's fused LayerNorm on fp32 (or wider) statistics. Both are held to the explicit formulas in
float64, values and every gradient.
"""

import pytest
import torch

from gpt.ops import TORCH_OPS, causal_attention_ref, layer_norm_ref


def qkv(B, H, Tq, Tk, D, seed=0, dtype=torch.float64):
    """q (B, H, Tq, D) and k, v (B, H, Tk, D) as strided views of one (B, Tk, 3, H, D) leaf, like the model's."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, Tk, 3, H, D, generator=g, dtype=dtype).requires_grad_()
    q, k, v = (t.transpose(1, 2) for t in base.unbind(2))
    return base, q[:, :, Tk - Tq:], k, v


@pytest.mark.parametrize("Tq,Tk", [(37, 37), (1, 9), (1, 1)], ids=["causal-square", "decode", "single"])
def test_sdpa_shortcut_matches_the_explicit_reference(Tq, Tk):
    base, q, k, v = qkv(2, 3, Tq, Tk, 16)
    out = TORCH_OPS.attention(q, k, v)
    dout = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, base, dout)
    ref_base, rq, rk, rv = qkv(2, 3, Tq, Tk, 16)
    ref = causal_attention_ref(rq, rk, rv)
    (ref_grad,) = torch.autograd.grad(ref, ref_base, dout)
    # float64 inputs, but the reference takes its softmax in fp32: fp32 tolerance
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("Tq,kwargs", [
    (4, {}), (4, {"kv_start": [0, 4]}), (11, {"kv_start": [0, 4]}), (1, {"kv_len": [9]}),
    (1, {"kv_len": [9], "kv_start": [0, 4]}), (3, {"kv_len": [9]}), (1, {"kv_len": [3, 11]}),
], ids=["chunk", "chunk-padded", "square-padded", "static", "static-padded", "static-chunk", "static-rows"])
def test_masked_cases_through_sdpa_match_the_explicit_reference(Tq, kwargs):
    """A chunk after a cache (bottom-right causal), left padding (fully masked query rows give 0), a
    fixed-size cache masked by length: SDPA with the reference's mask, values and gradients in float64."""
    kwargs = {k: torch.tensor(v) for k, v in kwargs.items()}
    base, q, k, v = qkv(2, 3, Tq, 11, 16)
    out = TORCH_OPS.attention(q, k, v, **kwargs)
    dout = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, base, dout)
    ref_base, rq, rk, rv = qkv(2, 3, Tq, 11, 16)
    ref = causal_attention_ref(rq, rk, rv, **kwargs)
    (ref_grad,) = torch.autograd.grad(ref, ref_base, dout)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)
    if "kv_start" in kwargs and Tq == 11:  # row 1's first 4 queries see nothing: zeros, not NaN
        assert torch.equal(out[1, :, :4], torch.zeros_like(out[1, :, :4]))


def test_dropout_runs_the_explicit_reference():
    _, q, k, v = qkv(2, 3, 12, 12, 16)
    torch.manual_seed(5)
    dropped = TORCH_OPS.attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(5)
    assert torch.equal(dropped, causal_attention_ref(q, k, v, dropout_p=0.3))


def test_sdpa_shortcut_under_bf16_autocast_cpu_stays_close():
    base, q, k, v = qkv(2, 3, 29, 29, 32, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = TORCH_OPS.attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    exact = causal_attention_ref(q.double(), k.double(), v.double())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), exact, atol=3e-2, rtol=3e-2)


def explicit_layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_ref_is_the_formula_with_fp32_statistics(dtype):
    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(4, 7, 96, generator=g) + 1).to(dtype).requires_grad_()
    weight = (1 + 0.3 * torch.randn(96, generator=g)).requires_grad_()  # fp32 masters, as under autocast
    bias = (0.3 * torch.randn(96, generator=g)).requires_grad_()
    y = layer_norm_ref(x, weight, bias, 1e-5)
    dy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(dy)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    y64 = explicit_layer_norm(x64, w64, b64, 1e-5)
    y64.backward(dy.double())
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert y.dtype == dtype and x.grad.dtype == dtype and weight.grad.dtype == torch.float32
    for got, want in ((y, y64), (x.grad, x64.grad), (weight.grad, w64.grad), (bias.grad, b64.grad)):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, atol=tol * scale, rtol=tol)
