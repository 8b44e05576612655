"""The torch table's fused shortcuts against the written-out reference math.

``TORCH_OPS.attention`` runs ``F.scaled_dot_product_attention`` (with the reference's mask where
``is_causal`` cannot say it), and the explicit ``causal_attention_ref`` only with dropout; ``layer_norm_ref`` is
torch's fused LayerNorm on fp32 (or wider) statistics. Both are held to the explicit formulas in
float64, values and every gradient.
"""

import pytest
import torch

from gpt.ops import TORCH_OPS, _cpu_training_upcast, attention_mask, causal_attention_ref, layer_norm_ref


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


@pytest.mark.parametrize("dtype,kwargs", [(torch.bfloat16, {}), (torch.bfloat16, {"kv_start": [0, 5]}),
                                          (torch.float16, {})], ids=["bf16", "bf16-padded", "fp16"])
def test_cpu_training_attention_in_half_runs_in_fp32(dtype, kwargs):
    """A CPU training call in half precision at a small head dim runs SDPA on fp32 copies and rounds
    the output once (faster there, see ``_cpu_training_upcast``): the very values of that fp32 call,
    and values and gradients within half precision of float64."""
    kwargs = {k: torch.tensor(v) for k, v in kwargs.items()}
    base, q, k, v = qkv(2, 3, 29, 29, 32, dtype=torch.float32)
    half = base.detach().to(dtype).requires_grad_()
    hq, hk, hv = (t.transpose(1, 2) for t in half.unbind(2))
    out = TORCH_OPS.attention(hq, hk, hv, **kwargs)
    assert out.dtype == dtype
    mask = None if not kwargs else attention_mask(29, 29, "cpu", **kwargs)
    fp32 = torch.nn.functional.scaled_dot_product_attention(hq.float(), hk.float(), hv.float(), attn_mask=mask,
                                                            is_causal=mask is None)
    assert torch.equal(out, fp32.to(dtype))
    dout = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, half, dout)
    exact_base = half.detach().double().requires_grad_()
    eq, ek, ev = (t.transpose(1, 2) for t in exact_base.unbind(2))
    exact = causal_attention_ref(eq, ek, ev, **kwargs)
    (exact_grad,) = torch.autograd.grad(exact, exact_base, dout.double())
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.double(), exact, atol=tol, rtol=tol)
    torch.testing.assert_close(grad.double(), exact_grad, atol=4 * tol, rtol=4 * tol)


def test_when_cpu_attention_upcasts():
    """fp32 for CPU training calls in fp16, and in bf16 at head dim <= 32 or up to 128 keys; never
    without a gradient, on fp32 inputs or at bf16's large shapes (where its kernel is as fast)."""
    def rule(T, D, dtype=torch.bfloat16, grad=True, autocast=False):
        x = torch.zeros(1, 1, T, D, dtype=dtype, requires_grad=grad)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return _cpu_training_upcast(x, x, x)

    assert rule(128, 64) == rule(512, 32) == rule(1024, 16) == torch.bfloat16
    assert rule(256, 64) is None and rule(1024, 128) is None
    assert rule(1024, 64, torch.float16) == torch.float16
    assert rule(128, 32, grad=False) is None and rule(128, 32, torch.float32) is None
    assert rule(128, 32, torch.float32, autocast=True) == torch.bfloat16  # what autocast would run
    with torch.no_grad():
        assert rule(128, 32) is None


def test_cpu_training_attention_under_autocast_keeps_autocasts_dtypes():
    """Under bf16 autocast fp32 leaves give a bf16 output (as autocast's SDPA would) and fp32 gradients."""
    base, q, k, v = qkv(2, 3, 17, 17, 32, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = TORCH_OPS.attention(q, k, v)
    assert out.dtype == torch.bfloat16
    (grad,) = torch.autograd.grad(out.float().sum(), base)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0


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
