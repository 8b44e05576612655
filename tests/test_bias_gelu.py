"""kernels.bias_gelu (the MLP's bias + tanh-GELU, its bias gradient made in the backward's pass)
against float64 ``F.gelu(u + bias, approximate="tanh")``, on DEVICE (the GPU, or Triton's
interpreter on a CPU).

Tolerances as tests/test_layernorm.py: outputs and u's gradient per dtype (fp32 math inside, one
rounding to the dtype); the bias gradient is an fp32 sum over the rows, held to fp32 against the
float64 sum of the same upstream gradient, relative to its largest entry.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

import kernels

module = importlib.import_module("kernels.bias_gelu")  # (``kernels.bias_gelu`` is the function)

from conftest import DEVICE

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def check(u_dtype, bias_dtype, shape, view=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = (3 * torch.randn(shape, generator=g)).to(DEVICE, u_dtype)  # GELU's curved part and both tails
    u = (base if view is None else view(base)).detach().requires_grad_()
    N = u.shape[-1]
    bias = torch.randn(N, generator=g).to(DEVICE, bias_dtype).requires_grad_()
    dg = torch.randn(u.shape, generator=g).to(DEVICE, u_dtype)
    out = kernels.bias_gelu(u, bias)
    out.backward(dg)
    assert out.dtype == u_dtype and out.shape == u.shape and u.grad.dtype == u_dtype and bias.grad.dtype == bias_dtype

    ur, br = (t.detach().double().requires_grad_() for t in (u, bias))
    ref = F.gelu(ur + br, approximate="tanh")
    ref.backward(dg.double())
    tol = TOL[u_dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(u.grad.double(), ur.grad, atol=tol, rtol=tol)
    btol = max(TOL[torch.float32], TOL[bias_dtype] if bias_dtype != torch.float32 else 0)
    torch.testing.assert_close(bias.grad.double(), br.grad, atol=btol * br.grad.abs().max().item(), rtol=btol)


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 300), (1, 7), (37, 256), (129, 2048)], ids=str)
def test_bias_gelu_matches_float64(dtype, shape):
    """Ragged column blocks (300 = 256 + 44, 7), one row, rows that are not a multiple of the 8-row
    tile over several backward programs (129), the seed model's width (2,048)."""
    check(dtype, dtype, shape)


def test_bias_gelu_under_autocast_takes_an_fp32_bias():
    """The model under autocast: the Linear's bf16 output, the fp32 bias master, its fp32 gradient."""
    check(torch.bfloat16, torch.float32, (3, 11, 300))


@pytest.mark.parametrize("shape,view", [((6, 4, 270), lambda t: t.transpose(0, 1)),  # leading dims permuted
                                        ((24, 300), lambda t: t[:, 5:265])],  # row stride 300, N = 260
                         ids=["transposed", "sliced"])
def test_bias_gelu_of_strided_input(shape, view):
    check(torch.float32, torch.float32, shape, view=view)


def test_inference_skips_autograd_and_gives_the_same_values(monkeypatch):
    u = torch.randn(5, 300, device=DEVICE)
    bias = torch.randn(300, device=DEVICE, requires_grad=True)
    trained = kernels.bias_gelu(u, bias)
    monkeypatch.setattr(module.BiasGeluFunction, "apply", lambda *a: pytest.fail("an autograd node under no_grad"))
    with torch.no_grad():
        inferred = kernels.bias_gelu(u, bias)
    assert inferred.grad_fn is None and torch.equal(inferred, trained)


def test_the_bias_gradient_is_reproducible():
    """Per-program fp32 partials summed once, no atomics: the same bits on every run."""
    u = torch.randn(1000, 300, device=DEVICE, requires_grad=True)
    bias = torch.randn(300, device=DEVICE, requires_grad=True)
    dg = torch.randn(1000, 300, device=DEVICE)
    grads = []
    for _ in range(2):
        bias.grad = None
        kernels.bias_gelu(u, bias).backward(dg)
        grads.append(bias.grad.clone())
    assert torch.equal(*grads)


def test_bad_input_is_one_line_value_error():
    u = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        kernels.bias_gelu(u, torch.zeros(7, device=DEVICE))
    with pytest.raises(ValueError, match="float dtypes"):
        kernels.bias_gelu(u.long(), torch.zeros(8, device=DEVICE))


def test_the_model_uses_it_only_on_a_plain_linear():
    """The MLP runs its first Linear without the bias and then ``bias_gelu`` (the same hidden states
    as impl torch's Linear + F.gelu); a decoding form of that Linear (here int8, which has no float
    weight to multiply) keeps its own forward."""
    from gpt import GPTConfig
    from gpt.ops import TORCH_OPS
    from gpt.quantize import quantize_linears_

    from conftest import perturbed_model

    cfg = GPTConfig(vocab_size=97, max_seq_length=16, num_layers=2, num_heads=2, d_model=32, d_ff=300, dropout=0.0)
    model = perturbed_model(cfg, device=DEVICE)
    fused = TORCH_OPS._replace(name="bias-gelu", bias_gelu=kernels.bias_gelu)
    idx = torch.randint(0, cfg.vocab_size, (2, 11), device=DEVICE)
    calls = []
    with torch.no_grad():
        ref = model.hidden_states(idx)
        model.impl = fused._replace(bias_gelu=lambda u, b: calls.append(1) or kernels.bias_gelu(u, b))
        torch.testing.assert_close(model.hidden_states(idx), ref, atol=1e-5, rtol=1e-5)
        assert len(calls) == cfg.num_layers
        for block in model.h:
            quantize_linears_(block.mlp)
        model.impl = "torch"
        ref = model.hidden_states(idx)
        model.impl = fused
        assert torch.equal(model.hidden_states(idx), ref)
