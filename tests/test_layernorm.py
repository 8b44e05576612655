"""Fused Triton LayerNorm / residual-add LayerNorm against float64 F.layer_norm, on DEVICE (the GPU,
or Triton's interpreter on a CPU).

Tolerances (atol = rtol) per dtype, applied to outputs and input gradients: float32 2e-5 (fp32
statistics and fp32 sums over up to a few hundred rows: errors seen <= 5e-6), float16 2e-3 (about
2 ulps of 2**-10), bfloat16 2e-2 (about 2 ulps of 2**-7; Triton's interpreter truncates fp32 ->
bf16 where a GPU rounds to nearest, so its bf16 outputs are off by up to 1 ulp). dweight / dbias are
accumulated in fp32 whatever the input dtype, so they are held to the float32 tolerance against a
float64 reference computed from the same rounded inputs: only accumulation error remains, and a
half-precision accumulator would fail.
"""

import pytest
import torch
import torch.nn.functional as F

import kernels
from gpt import GPTConfig
from gpt.ops import TORCH_OPS
from kernels.layernorm import MAX_DX2_BLOCK, MAX_N

from conftest import DEVICE, perturbed_model

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = list(TOL)


def close(actual, expected, dtype, name):
    tol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


def make_params(N, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = (1 + 0.5 * torch.randn(N, generator=g)).to(DEVICE).requires_grad_()
    bias = (0.5 * torch.randn(N, generator=g)).to(DEVICE).requires_grad_()
    return weight, bias


def rand(shape, dtype, seed, scale=2.0, shift=0.5):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g) + shift).to(DEVICE, dtype)


def ref64(*tensors):
    """Detached float64 leaf copies of the inputs, for the reference."""
    return [t.detach().double().requires_grad_() for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 96), (1023,), (5, 1023), (3, 1), (37, 96), (9, 300)], ids=str)
def test_layer_norm_matches_float64(dtype, shape):
    """Shapes: ragged last tiles of rows (16 rows of 96 a tile, 4 of 300, 2 of 1023), several
    backward programs (37 rows), one row, one column."""
    N = shape[-1]
    x = rand(shape, dtype, seed=1).requires_grad_()
    weight, bias = make_params(N)
    dy = rand(shape, dtype, seed=2, scale=1.0, shift=0.0)
    y = kernels.layer_norm(x, weight, bias, 1e-5)
    y.backward(dy)
    assert y.dtype == dtype and y.shape == x.shape
    assert x.grad.dtype == dtype and weight.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32

    xr, wr, br = ref64(x, weight, bias)
    yr = F.layer_norm(xr, (N,), wr, br, 1e-5)
    yr.backward(dy.double())
    close(y, yr, dtype, "y")
    close(x.grad, xr.grad, dtype, "dx")
    close(weight.grad, wr.grad, torch.float32, "dweight")  # fp32 accumulation, same rounded x and dy
    close(bias.grad, br.grad, torch.float32, "dbias")


@pytest.mark.parametrize(
    "view",
    [
        lambda t: t.transpose(0, 1),  # leading dims permuted: (5, 4, 96) viewed as (4, 5, 96)
        lambda t: t.reshape(20, 96)[:, 8:72],  # sliced columns: row stride 96, N = 64
        lambda t: t.reshape(96, 20).t(),  # column stride 20, no unit-stride last dim
    ],
    ids=["transposed", "sliced", "column-strided"],
)
def test_layer_norm_non_contiguous(view):
    base = rand((5, 4, 96), torch.float32, seed=3).requires_grad_()
    x = view(base)
    assert not x.is_contiguous()
    N = x.shape[-1]
    params = make_params(2 * N)  # weight and bias are strided views of these leaves
    dy = rand(tuple(reversed(x.shape)), torch.float32, seed=4).permute(*reversed(range(x.dim())))  # strided grad
    y = kernels.layer_norm(x, params[0][::2], params[1][1::2], 1e-5)
    y.backward(dy)

    br64, wr, br = ref64(base, *params)
    yr = F.layer_norm(view(br64), (N,), wr[::2], br[1::2], 1e-5)
    yr.backward(dy.double())
    close(y, yr, torch.float32, "y")
    close(base.grad, br64.grad, torch.float32, "dx")
    close(params[0].grad, wr.grad, torch.float32, "dweight")
    close(params[1].grad, br.grad, torch.float32, "dbias")


def add_ln_check(x_dtype, r_dtype, shape, seed=0, ln_dtype=None):
    """Fused add + LN vs float64 with upstream grads on both outputs (the LayerNorm written in
    ``ln_dtype``, None: the sum's dtype).

    x + residual is checked against torch's rounded sum; the float64 LayerNorm is then taken at the
    kernel's own rounded sum (gradients pass through the rounding unchanged), so that a 1-ulp
    difference in the sum is not counted again, systematically, in dweight.
    """
    N = shape[-1]
    x = rand(shape, x_dtype, seed=seed + 1).requires_grad_()
    r = rand(shape, r_dtype, seed=seed + 2, shift=-1.0).requires_grad_()
    weight, bias = make_params(N, seed)
    out_dtype = torch.promote_types(x_dtype, r_dtype)
    y_dtype = ln_dtype or out_dtype
    dy = rand(shape, y_dtype, seed=seed + 3, scale=1.0, shift=0.0)
    ds = rand(shape, out_dtype, seed=seed + 4, scale=1.0, shift=0.0)
    y, s = kernels.add_layer_norm(x, r, weight, bias, 1e-5, out_dtype=ln_dtype)
    torch.autograd.backward((y, s), (dy, ds))
    assert y.dtype == y_dtype and s.dtype == out_dtype
    assert x.grad.dtype == x_dtype and r.grad.dtype == r_dtype

    close(s, (x + r).double(), out_dtype, "x + residual")

    xr, rr, wr, br = ref64(x, r, weight, bias)
    sr = xr + rr + (s.detach().double() - (xr + rr)).detach()  # value: the kernel's sum; grad: identity
    yr = F.layer_norm(sr, (N,), wr, br, 1e-5)
    torch.autograd.backward((yr, sr), (dy.double(), ds.double()))
    close(y, yr, y_dtype, "y")
    close(x.grad, xr.grad, x_dtype, "dx")
    close(r.grad, rr.grad, r_dtype, "dresidual")
    close(weight.grad, wr.grad, torch.float32, "dweight")  # fp32 accumulation, same rounded sum and dy
    close(bias.grad, br.grad, torch.float32, "dbias")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 96), (1, 1023)], ids=str)
def test_add_layer_norm_matches_float64(dtype, shape):
    add_ln_check(dtype, dtype, shape)


@pytest.mark.parametrize("grad_mode", ["no_grad", "no_input_needs_grad"])
def test_inference_calls_skip_autograd_and_give_the_same_values(monkeypatch, grad_mode):
    """Without a gradient to make (no_grad, or no input requiring one) the launcher runs without an
    autograd node; the values are the training path's, bit for bit."""
    x, r = rand((3, 5, 96), torch.float32, seed=1), rand((3, 5, 96), torch.float32, seed=2)
    weight, bias = make_params(96)
    trained = kernels.layer_norm(x, weight, bias), kernels.add_layer_norm(x, r, weight, bias)
    applied = []
    for cls in (kernels.layernorm.LayerNormFunction, kernels.layernorm.AddLayerNormFunction):
        monkeypatch.setattr(cls, "apply", lambda *a, cls=cls, apply=cls.apply: applied.append(cls) or apply(*a))
    if grad_mode == "no_grad":
        with torch.no_grad():
            y, (y2, s2) = kernels.layer_norm(x, weight, bias), kernels.add_layer_norm(x, r, weight, bias)
    else:
        w, b = weight.detach(), bias.detach()
        y, (y2, s2) = kernels.layer_norm(x, w, b), kernels.add_layer_norm(x, r, w, b)
    assert applied == [] and y.grad_fn is None and y2.grad_fn is None
    assert torch.equal(y, trained[0]) and torch.equal(y2, trained[1][0]) and torch.equal(s2, trained[1][1])
    assert trained[0].grad_fn is not None  # the training path does make a node


@pytest.mark.parametrize("shape", [(3, 7, 48), (2, 5000)], ids=str)
def test_add_layer_norm_mixed_dtypes(shape):
    """Under autocast the model adds a bf16 branch output to the fp32 residual stream: fp32 result.
    The backward writes the gradient in fp32 and bf16, or (rows wider than MAX_DX2_BLOCK) casts."""
    add_ln_check(torch.bfloat16, torch.float32, shape)


def test_add_layer_norm_of_two_half_dtypes():
    """fp16 + bf16 sum in fp32: the kernel writes the sum's gradient in fp32 and fp16 (x's), and the
    bf16 residual's is cast from the fp32 one."""
    add_ln_check(torch.float16, torch.bfloat16, (3, 7, 48))


def dropout_kept(x, r_dtype, weight, bias, p, seed):
    """The elements the next ``add_layer_norm(x, ..., dropout_p=p)`` keeps after
    ``torch.manual_seed(seed)``: where its sum with a zero residual is nonzero (x has no zeros)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        _, s = kernels.add_layer_norm(x, torch.zeros(x.shape, dtype=r_dtype, device=x.device), weight, bias, dropout_p=p)
    return s != 0


@pytest.mark.parametrize("x_dtype,r_dtype", [(d, d) for d in DTYPES] + [(torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("shape", [(37, 96), (3, 1023), (2, 4096)], ids=str)
def test_add_layer_norm_dropout_matches_float64(x_dtype, r_dtype, shape):
    """dropout(x) + residual, then LayerNorm, against float64 with the same mask: the sum, the
    output, and every gradient (x's through the mask, drawn again by the backward). 37 rows make
    several backward programs; 4,096 is MAX_DX2_BLOCK, the widest row the kernel drops out."""
    N, p = shape[-1], 0.3
    x = rand(shape, x_dtype, seed=1).requires_grad_()
    r = rand(shape, r_dtype, seed=2, shift=-1.0).requires_grad_()
    weight, bias = make_params(N)
    s_dtype = torch.promote_types(x_dtype, r_dtype)
    dy, ds = rand(shape, s_dtype, seed=3, scale=1.0, shift=0.0), rand(shape, s_dtype, seed=4, scale=1.0, shift=0.0)
    keep = dropout_kept(x.detach(), r_dtype, weight, bias, p, seed=7)
    n = keep.numel()
    assert abs(keep.sum().item() / n - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5  # about 1 - p of them kept
    torch.manual_seed(7)
    y, s = kernels.add_layer_norm(x, r, weight, bias, 1e-5, dropout_p=p)
    torch.autograd.backward((y, s), (dy, ds))
    assert x.grad.dtype == x_dtype and r.grad.dtype == r_dtype

    xr, rr, wr, br = ref64(x, r, weight, bias)
    dropped = torch.where(keep, xr * (1 / (1 - p)), 0.0)  # x * (1 / (1 - p)) in fp32, rounded once with the sum
    close(s, (dropped + rr).detach(), s_dtype, "dropout(x) + residual")
    sr = dropped + rr + (s.detach().double() - (dropped + rr)).detach()  # the kernel's rounded sum, identity grad
    yr = F.layer_norm(sr, (N,), wr, br, 1e-5)
    torch.autograd.backward((yr, sr), (dy.double(), ds.double()))
    close(y, yr, s_dtype, "y")
    close(x.grad, xr.grad, x_dtype, "dx")
    close(r.grad, rr.grad, r_dtype, "dresidual")
    close(weight.grad, wr.grad, torch.float32, "dweight")
    close(bias.grad, br.grad, torch.float32, "dbias")


@pytest.mark.parametrize("x_dtype,r_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("N", [3, MAX_DX2_BLOCK + 904])
def test_add_layer_norm_dropout_of_other_rows_is_f_dropout_first(x_dtype, r_dtype, N):
    """Rows wider than MAX_DX2_BLOCK or narrower than 4 (one Philox draw covers 4 columns): the call
    is F.dropout, then the fused add + LayerNorm, from the same draws of torch's generator: the
    same values and gradients, bit for bit."""
    shape, p = (2 if N > 4 else 400, N), 0.3
    weight, bias = make_params(shape[-1])
    dy, ds = rand(shape, torch.float32, seed=3, scale=1.0), rand(shape, torch.float32, seed=4, scale=1.0)
    runs = []
    for fused in (True, False):
        x = rand(shape, x_dtype, seed=1).requires_grad_()
        r = rand(shape, r_dtype, seed=2).requires_grad_()
        w, b = (t.detach().clone().requires_grad_() for t in (weight, bias))
        torch.manual_seed(7)
        if fused:
            y, s = kernels.add_layer_norm(x, r, w, b, dropout_p=p)
        else:
            y, s = kernels.add_layer_norm(F.dropout(x, p), r, w, b)
        torch.autograd.backward((y, s), (dy, ds))
        runs.append((y, s, x.grad, r.grad, w.grad, b.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert (runs[0][2] == 0).float().mean().item() == pytest.approx(p, abs=0.03)  # x's grad went through a mask


def test_add_layer_norm_dropout_draws_a_new_mask_every_call():
    """Each call draws its seed from torch's generator: two calls, two masks; the same seed, the
    same mask; no dropout without dropout_p; and dropout_p outside [0, 1) is refused."""
    x = rand((8, 96), torch.float32, seed=1)
    weight, bias = make_params(96)
    first = dropout_kept(x, torch.float32, weight, bias, 0.5, seed=3)
    for k in (1, 2, 3):  # the 4 columns of one Philox draw take its 4 values, not one of them
        assert 0.3 < (first[:, 0::4] == first[:, k::4]).float().mean().item() < 0.7
    assert not torch.equal(first, dropout_kept(x, torch.float32, weight, bias, 0.5, seed=4))
    assert torch.equal(first, dropout_kept(x, torch.float32, weight, bias, 0.5, seed=3))
    assert dropout_kept(x, torch.float32, weight, bias, 0.0, seed=3).all()
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout_p must be in"):
            kernels.add_layer_norm(x, x, weight, bias, dropout_p=bad)


@pytest.mark.parametrize("ln_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_add_layer_norm_written_in_the_next_linears_dtype(ln_dtype):
    """What the model does under autocast: the fp32 sum, the LayerNorm written in autocast's dtype
    (``out_dtype``) for the Linear after it, whose gradient comes back in that dtype."""
    add_ln_check(torch.bfloat16, torch.float32, (3, 7, 48), ln_dtype=ln_dtype)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_layer_norm_out_dtype_is_the_cast_it_replaces(out_dtype):
    """layer_norm(x fp32, out_dtype=d) against float64, and against the fp32 output cast to d, the
    cast it saves: within one ulp of d (the two kernel variants may contract the fp32 math
    differently; the interpreter truncates fp32 -> bf16). The gradient arrives in d; dx is fp32."""
    x = rand((4, 5, 96), torch.float32, seed=7).requires_grad_()
    weight, bias = make_params(96)
    dy = rand((4, 5, 96), out_dtype, seed=8, scale=1.0, shift=0.0)
    y = kernels.layer_norm(x, weight, bias, 1e-5, out_dtype=out_dtype)
    y.backward(dy)
    assert y.dtype == out_dtype and x.grad.dtype == torch.float32
    cast = kernels.layer_norm(x.detach(), weight.detach(), bias.detach(), 1e-5).to(out_dtype)
    ulp = 2.0**-7 if out_dtype == torch.bfloat16 else 2.0**-10
    torch.testing.assert_close(y, cast, atol=ulp * cast.abs().max().item() / 8, rtol=ulp)
    if DEVICE.type == "cuda" or out_dtype == torch.float16:  # both rounded to nearest: nearly all equal
        assert (y == cast).float().mean() > 0.99
    xr, wr, br = ref64(x, weight, bias)
    yr = F.layer_norm(xr, (96,), wr, br, 1e-5)
    yr.backward(dy.double())
    close(y, yr, out_dtype, "y")
    close(x.grad, xr.grad, torch.float32, "dx")  # fp32 math from the same dy
    close(weight.grad, wr.grad, torch.float32, "dweight")


def test_many_rows_and_deterministic_weight_grads():
    """A few hundred rows over several backward programs; two runs give bitwise-equal gradients."""
    x = rand((320, 96), torch.float32, seed=5).requires_grad_()
    weight, bias = make_params(96)
    dy = rand((320, 96), torch.float32, seed=6, scale=1.0, shift=0.0)
    grads = []
    for _ in range(2):
        x.grad = weight.grad = bias.grad = None
        kernels.layer_norm(x, weight, bias, 1e-5).backward(dy)
        grads.append((x.grad, weight.grad, bias.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)

    xr, wr, br = ref64(x, weight, bias)
    F.layer_norm(xr, (96,), wr, br, 1e-5).backward(dy.double())
    for got, want, name in zip(grads[0], (xr.grad, wr.grad, br.grad), ("dx", "dweight", "dbias")):
        close(got, want, torch.float32, name)


def test_widest_supported_row():
    x = rand((2, MAX_N), torch.float32, seed=7).requires_grad_()
    weight, bias = make_params(MAX_N)
    dy = rand((2, MAX_N), torch.float32, seed=8, scale=1.0, shift=0.0)
    y = kernels.layer_norm(x, weight, bias, 1e-5)
    y.backward(dy)
    xr, wr, br = ref64(x, weight, bias)
    yr = F.layer_norm(xr, (MAX_N,), wr, br, 1e-5)
    yr.backward(dy.double())
    close(y, yr, torch.float32, "y")
    close(x.grad, xr.grad, torch.float32, "dx")
    close(weight.grad, wr.grad, torch.float32, "dweight")


def test_bad_input_errors():
    """Argument errors come before the device rule: CPU tensors get them on a GPU machine too (the
    residual's shape was checked after it, so an H200 answered "need CUDA" instead)."""
    w, b = torch.ones(MAX_N + 1), torch.zeros(MAX_N + 1)
    with pytest.raises(ValueError, match=f"normalized size {MAX_N + 1} outside the supported range"):
        kernels.layer_norm(torch.randn(2, MAX_N + 1), w, b)
    with pytest.raises(ValueError, match=r"weight must have shape \(96,\)"):
        kernels.layer_norm(torch.randn(2, 96), torch.ones(95), torch.zeros(96))
    with pytest.raises(ValueError, match=r"bias must have shape \(96,\)"):
        kernels.add_layer_norm(torch.randn(2, 96), torch.randn(2, 96), torch.ones(96), torch.zeros(2, 48))
    with pytest.raises(ValueError, match="residual shape"):
        kernels.add_layer_norm(torch.randn(2, 96), torch.randn(3, 96), torch.ones(96), torch.zeros(96))
    with pytest.raises(TypeError, match="float64 not supported"):
        kernels.layer_norm(torch.randn(2, 96, dtype=torch.float64), torch.ones(96), torch.zeros(96))
    with pytest.raises(TypeError, match="out_dtype torch.int8 not supported"):
        kernels.add_layer_norm(torch.randn(2, 96), torch.randn(2, 96), torch.ones(96), torch.zeros(96),
                               out_dtype=torch.int8)
    if DEVICE.type == "cuda":  # well-formed CPU tensors: only the device rule is left to refuse them
        with pytest.raises(ValueError, match="need CUDA"):
            kernels.add_layer_norm(torch.randn(2, 96), torch.randn(2, 96), torch.ones(96), torch.zeros(96))


def test_custom_ops_pass_opcheck():
    x = rand((6, 48), torch.float32, seed=9)
    r = rand((6, 48), torch.bfloat16, seed=10)
    w, b = (p.detach() for p in make_params(48))
    for out_dtype in (None, torch.bfloat16):
        torch.library.opcheck(torch.ops.tinygpt.layer_norm_fwd, (x, w, b, 1e-5, out_dtype))
        torch.library.opcheck(torch.ops.tinygpt.add_layer_norm_fwd, (x, r, w, b, 1e-5, out_dtype))
    _, stats = torch.ops.tinygpt.layer_norm_fwd(x, w, b, 1e-5, None)
    torch.testing.assert_close(stats, torch.stack([x.mean(-1), (x.var(-1, unbiased=False) + 1e-5).rsqrt()]))
    dy, ds = rand((6, 48), torch.float32, seed=13), rand((6, 48), torch.float32, seed=14)
    torch.library.opcheck(torch.ops.tinygpt.layer_norm_bwd, (dy, None, x, w, stats))
    torch.library.opcheck(torch.ops.tinygpt.layer_norm_bwd, (dy, ds, x, w, stats))


def test_torch_compile_traces_custom_ops_fullgraph():
    """fullgraph=True tracing (AOT autograd, eager kernels: inductor is not needed to check tracing)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm)

    def f(x, r, w, b):
        h, s = kernels.add_layer_norm(x, r, w, b, 1e-5, out_dtype=torch.float16)
        return kernels.layer_norm(h * s, w, b, 1e-5).sum()

    inputs = [rand((2, 5, 48), torch.float32, seed=11), rand((2, 5, 48), torch.float32, seed=12),
              *(p.detach() for p in make_params(48))]
    compiled_in = [t.clone().requires_grad_() for t in inputs]
    eager_in = [t.clone().requires_grad_() for t in inputs]
    torch._dynamo.reset()
    compiled = torch.compile(f, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    out = compiled(*compiled_in)
    out.backward()
    f(*eager_in).backward()
    fw, bw = graphs
    assert "tinygpt.add_layer_norm_fwd" in fw and "tinygpt.layer_norm_fwd" in fw
    assert bw.count("tinygpt.layer_norm_bwd") == 2
    for a, b in zip(compiled_in, eager_in):
        assert torch.equal(a.grad, b.grad)


def test_tiny_gpt2_matches_torch_impl():
    """The model's LayerNorms through the kernels: same loss, grads, and 3 AdamW steps as impl='torch'."""
    config = GPTConfig(vocab_size=64, max_seq_length=32, num_layers=2, num_heads=3, d_model=48, d_ff=96,
                       dropout=0.0)
    ref = perturbed_model(config, device=DEVICE)  # LayerNorm weights and biases off their defaults
    ours = perturbed_model(config, device=DEVICE)
    idx = torch.randint(0, 64, (2, 13), device=DEVICE)
    targets = torch.randint(0, 64, (2, 13), device=DEVICE)

    def train(model, steps=3):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses, first_grads = [], None
        for _ in range(steps):
            opt.zero_grad()
            loss = model(idx, targets).loss
            loss.backward()
            if first_grads is None:
                first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            losses.append(loss.item())
            opt.step()
        return losses, first_grads

    ref_losses, ref_grads = train(ref)
    ours.impl = TORCH_OPS._replace(name="ln-triton", layer_norm=kernels.layer_norm,
                                   add_layer_norm=kernels.add_layer_norm)  # torch attention
    losses, grads = train(ours)
    torch.testing.assert_close(losses, ref_losses, atol=1e-5, rtol=1e-5)
    assert ref_losses[-1] < ref_losses[0]  # the steps did train
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_under_autocast_the_hidden_states_are_never_cast(monkeypatch):
    """Under bf16 autocast (on the CPU here) the model's LayerNorms write bf16 for the Linears (and
    the head) that read them: no fp32 -> bf16 copy of a (B, T, C) activation in the forward, where
    each of the 2 L + 1 LayerNorm outputs was cast before, nor in the backward, where the gradient
    of each add's sum was cast for its bf16 branch; the same loss and gradients as the torch
    LayerNorm (which casts inside) to bf16's tolerance."""
    from torch.utils._python_dispatch import TorchDispatchMode

    config = GPTConfig(vocab_size=64, max_seq_length=32, num_layers=2, num_heads=3, d_model=48, d_ff=96,
                       dropout=0.0)
    idx = torch.randint(0, 64, (2, 13), device=DEVICE)
    targets = torch.randint(0, 64, (2, 13), device=DEVICE)

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and args[0].shape[-1] == 48 and args[0].dim() == 3:
                self.count += args[0].dtype == torch.float32 and out.dtype == torch.bfloat16
            return out

    results = {}
    for name in ("torch", "ln-triton"):
        model = perturbed_model(config, device=DEVICE)
        if name != "torch":
            model.impl = TORCH_OPS._replace(name=name, layer_norm=kernels.layer_norm, add_layer_norm=kernels.add_layer_norm)
        forward, backward = Casts(), Casts()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16), forward:
            out = model(idx, targets)
        with backward:
            out.loss.backward()
        results[name] = out.loss, {n: p.grad for n, p in model.named_parameters()}, (forward.count, backward.count)
    # Forward: F.layer_norm's fp32 output, cast inside the op (2 L + 1). Backward: the grad of each of
    # the 2 L bf16 branch + fp32 residual sums, cast to the branch's bf16 (the add+LayerNorm kernel
    # writes it in both dtypes).
    assert results["ln-triton"][2] == (0, 0)
    assert results["torch"][2] == (2 * config.num_layers + 1, 2 * config.num_layers)
    torch.testing.assert_close(results["ln-triton"][0], results["torch"][0], atol=2e-2, rtol=2e-2)
    for name, grad in results["torch"][1].items():
        atol = 2e-2 * grad.abs().max().item()
        torch.testing.assert_close(results["ln-triton"][1][name], grad, atol=atol, rtol=2e-2, msg=lambda m: f"{name}: {m}")
