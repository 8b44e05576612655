"""Fused causal attention kernel vs float64 math: values, gradients, KV-cache shapes, kv_start, model parity.

Runs on DEVICE: the GPU when there is one, else Triton's interpreter on the CPU. The interpreter's
bf16 tl.dot is unusable, so the bf16 tests run on CUDA only. What the kernels compile to on sm_90
and sm_80 (spills, shared memory against the launch-time estimate) is tests/test_compile_check.py.
"""

import math

import numpy as np
import pytest
import torch

import kernels
from gpt import GPTConfig
from gpt.kvcache import KVCache
from gpt.ops import TORCH_OPS, attention_mask, causal_attention_ref, triton_ops
from kernels import attention
from kernels.attention import SUPPORTED_HEAD_DIMS

from conftest import CUDA_ONLY_REASON, DEVICE, perturbed_model

FP32_TOL = 2e-5  # fp32 kernel vs float64: accumulation-order error only
HALF_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # absolute slack added to FlashAttention's
# "2x the PyTorch error in the same dtype" rule: about 2 ulps at 1 for fp16 (2**-10) and bf16 (2**-7)
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_ONLY_REASON)


def qkv_views(B, H, T, D, dtype, seed=0):
    """q, k, v (B, H, T, D) as the model makes them: strided views of a (B, T, 3, H, D) projection."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, 3, H, D, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    return tuple(t.transpose(1, 2) for t in qkv.unbind(2))


def cache_views(B, H, Tq, Tk, D, dtype, seed=0, max_len=None):
    """q (B, H, Tq, D) and k, v as slices [:Tk] of (B, H, max_len, D) caches."""
    g = torch.Generator().manual_seed(seed)
    max_len = Tk + 7 if max_len is None else max_len
    q = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    k_cache = torch.randn(B, H, max_len, D, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    v_cache = torch.randn(B, H, max_len, D, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    return q, k_cache[:, :, :Tk], v_cache[:, :, :Tk]


def run(fn, q, k, v, do, kv_start=None):
    """fn's output and (dq, dk, dv) for the upstream gradient do, on leaf copies of q, k, v."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, kv_start=kv_start)
    out.backward(do)
    return out.detach(), *(t.grad for t in leaves)


def upstream_grad(out_shape, dtype, seed=1):
    """A non-contiguous dO, as the model's head merge gives: (B, Tq, H, D) viewed as (B, H, Tq, D)."""
    B, H, Tq, D = out_shape
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Tq, H, D, generator=g, dtype=torch.float64).to(DEVICE, dtype).transpose(1, 2)


def check_against_float64(q, k, v, kv_start=None, ours=kernels.causal_attention, ref=causal_attention_ref):
    """Kernel output and gradients (``ours``) vs float64 math (``ref``), with the tolerance of q's dtype."""
    do = upstream_grad(q.shape, q.dtype)
    ours = run(ours, q, k, v, do, kv_start)
    exact = run(ref, q.double(), k.double(), v.double(), do.double(), kv_start)
    names = ("out", "dq", "dk", "dv")
    if q.dtype == torch.float32:
        for name, a, e in zip(names, ours, exact):
            assert a.dtype == torch.float32 and a.shape == e.shape, name
            torch.testing.assert_close(a.double(), e, atol=FP32_TOL, rtol=FP32_TOL, msg=name)
        return
    peer = run(ref, q, k, v, do, kv_start)  # PyTorch in the same half dtype
    for name, a, p, e in zip(names, ours, peer, exact):
        assert a.dtype == q.dtype and a.shape == e.shape, name
        ours_err = (a.double() - e).abs().max().item()
        peer_err = (p.double() - e).abs().max().item()
        assert ours_err <= 2 * peer_err + HALF_FLOOR[q.dtype], \
            f"{name}: error {ours_err:.3g} vs torch {q.dtype} {peer_err:.3g}"


# Every T and D appears with gradients; the costly end (T=256 with D=128) is left out.
FP32_CASES = [  # (B, H, T, D)
    (1, 3, 1, 16),
    (2, 3, 17, 32),
    (1, 3, 64, 64),
    (1, 1, 129, 128),
    (1, 1, 256, 16),
]
FP16_CASES = [
    (1, 3, 17, 16),
    (1, 1, 64, 128),
    (1, 1, 129, 32),
    (1, 1, 256, 64),
]


@pytest.mark.parametrize("B,H,T,D", FP32_CASES)
def test_fp32_strided_qkv_matches_float64(B, H, T, D):
    check_against_float64(*qkv_views(B, H, T, D, torch.float32))


@pytest.mark.parametrize("B,H,T,D", FP16_CASES)
def test_fp16_within_twice_torch_fp16_error(B, H, T, D):
    check_against_float64(*qkv_views(B, H, T, D, torch.float16))


@cuda_only
@pytest.mark.parametrize("B,H,T,D", FP16_CASES + [(2, 3, 256, 128)])
def test_bf16_within_twice_torch_bf16_error(B, H, T, D):
    check_against_float64(*qkv_views(B, H, T, D, torch.bfloat16))


@cuda_only
@pytest.mark.parametrize("Tq,Tk", [(1, 1), (1, 130), (20, 53)])
def test_bf16_decode_and_chunked_prefill_against_cache(Tq, Tk):
    check_against_float64(*cache_views(2, 3, Tq, Tk, 64, torch.bfloat16))


@cuda_only
def test_bf16_kv_start():
    q, k, v = cache_views(3, 2, 30, 45, 32, torch.bfloat16, seed=4)
    check_against_float64(q, k, v, torch.tensor([0, 19, 44], device=DEVICE))


def test_contiguous_inputs_and_custom_scale():
    q, k, v = (t.contiguous() for t in qkv_views(2, 1, 40, 32, torch.float32))
    out = kernels.causal_attention(q, k, v, scale=0.3)
    exact = causal_attention_ref(q.double(), k.double(), v.double(), scale=0.3)
    torch.testing.assert_close(out.double(), exact, atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize("Tk", [1, 37, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_step_against_cache(Tk, dtype):
    check_against_float64(*cache_views(2, 3, 1, Tk, 32, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunked_prefill_against_cache(dtype):
    check_against_float64(*cache_views(2, 3, 20, 53, 64, dtype))


@pytest.mark.parametrize("Tq,Tk", [(45, 45), (1, 45), (9, 45)])
def test_kv_start_masks_left_padding(Tq, Tk):
    """Rows start at 0, mid-block, and at the last key (whose earlier queries see nothing -> zeros)."""
    q, k, v = cache_views(3, 2, Tq, Tk, 16, torch.float32, seed=3)
    kv_start = torch.tensor([0, 19, Tk - 1], device=DEVICE)
    check_against_float64(q, k, v, kv_start)
    out = kernels.causal_attention(q, k, v, kv_start=kv_start)
    empty = Tq - 1  # the last row's queries at absolute positions < Tk - 1 have no allowed key
    assert empty == 0 or torch.equal(out[2, :, :empty], torch.zeros_like(out[2, :, :empty]))
    assert out[2, :, -1].abs().sum() > 0


def test_kv_start_fp16():
    q, k, v = cache_views(2, 2, 30, 30, 32, torch.float16, seed=4)
    check_against_float64(q, k, v, torch.tensor([7, 29], device=DEVICE))


def test_backward_is_deterministic():
    q, k, v = qkv_views(1, 2, 100, 32, torch.float16, seed=5)
    do = upstream_grad(q.shape, q.dtype)
    first = run(kernels.causal_attention, q, k, v, do)
    second = run(kernels.causal_attention, q, k, v, do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shapes,match", [
    (((1, 2, 8, 24), (1, 2, 8, 24), (1, 2, 8, 24)), "head dim 24"),
    (((1, 2, 9, 16), (1, 2, 8, 16), (1, 2, 8, 16)), "Tq <= Tk"),
    (((1, 2, 8, 16), (1, 3, 8, 16), (1, 3, 8, 16)), "disagree"),
    (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 9, 16)), "shapes differ"),
    (((2, 8, 16), (2, 8, 16), (2, 8, 16)), r"\(B, H, T, D\)"),
    (((1, 2, 0, 16), (1, 2, 0, 16), (1, 2, 0, 16)), "Tq <= Tk"),
])
def test_bad_shapes_raise(shapes, match):
    q, k, v = (torch.zeros(s, device=DEVICE) for s in shapes)
    with pytest.raises(ValueError, match=match):
        kernels.causal_attention(q, k, v)


def test_bad_dtype_and_kv_start_raise():
    q = torch.zeros(2, 1, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        kernels.causal_attention(q, q.half(), q)
    with pytest.raises(ValueError, match="kv_start"):
        kernels.causal_attention(q, q, q, kv_start=torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="kv_start"):
        kernels.causal_attention(q, q, q, kv_start=torch.zeros(3, dtype=torch.int64, device=DEVICE))


def test_custom_op_passes_opcheck_and_compiles():
    q, k, v = (t.detach().clone().requires_grad_() for t in cache_views(1, 2, 5, 9, 16, torch.float32))
    kv_start = torch.tensor([2], device=DEVICE)
    op = torch.ops.tinygpt.causal_attention_fwd.default
    for p, seed in ((0.0, None), (0.5, torch.tensor([7], device=DEVICE))):
        torch.library.opcheck(op, (q, k, v, 0.25, kv_start, p, seed),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    compiled = torch.compile(kernels.causal_attention, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v, kv_start=kv_start)
    out.sum().backward()
    exact = run(causal_attention_ref, q.double(), k.double(), v.double(),
                torch.ones(out.shape, dtype=torch.float64, device=DEVICE), kv_start)
    for a, e in zip((out, q.grad, k.grad, v.grad), exact):
        torch.testing.assert_close(a.detach().double(), e, atol=FP32_TOL, rtol=FP32_TOL)


# ----------------------------------------------------------------------------------------------
# Dropout on the attention probabilities
# ----------------------------------------------------------------------------------------------

_M32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(seed: int, c0, c1, c2, c3) -> list:
    """Philox4x32-10 (Salmon et al., 2011) in numpy, written from the paper's constants: the four
    32-bit output words of counters (c0, c1, c2, c3) (broadcast arrays) under the 64-bit key
    ``seed``, independent of Triton's ``tl.philox``."""
    c = [np.asarray(x, dtype=np.uint64) & _M32 for x in np.broadcast_arrays(c0, c1, c2, c3)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]  # exact in 64 bits
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & _M32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & _M32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & _M32, (k1 + np.uint64(0xBB67AE85)) & _M32
    return c


def kept(seed: int, B: int, H: int, Tq: int, Tk: int, p: float) -> torch.Tensor:
    """The kernels' dropout mask (B, H, Tq, Tk), bool, as documented in ``attention._dropout_keep``:
    Philox counter (key // 16, query, b * H + h, 0); key 16 g + 4 k + b takes byte b (low first)
    of word k; kept when that 8-bit value is >= round(p * 2^8)."""
    groups = -(-Tk // 16)
    bh, i, g = np.meshgrid(np.arange(B * H), np.arange(Tq), np.arange(groups), indexing="ij")
    words = philox4x32_10(seed, g, i, bh, 0)
    shifts = [np.uint64(8 * b) for b in range(4)]
    data = np.stack([np.stack([(w >> s) & np.uint64(0xFF) for s in shifts], axis=-1) for w in words], axis=-2)
    values = data.reshape(B * H, Tq, groups * 16)[..., :Tk]  # (.., g, k, b) -> key 16 g + 4 k + b
    return torch.from_numpy(values >= round(p * 256)).reshape(B, H, Tq, Tk)


def seed_after(manual_seed: int, device) -> int:
    """The dropout seed a kernel call draws first after ``torch.manual_seed(manual_seed)``."""
    torch.manual_seed(manual_seed)
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device).item())


def dropped_reference(keep: torch.Tensor, p: float):
    """causal_attention_ref with the probabilities multiplied by ``keep`` / (1 - p'), p' = p rounded
    to a multiple of 2^-8 (the kernels' rate), in any dtype: fn(q, k, v, kv_start=None)."""
    scale_kept = 256 / (256 - round(p * 256))

    def fn(q, k, v, kv_start=None):
        Tq, Tk = q.shape[-2], k.shape[-2]
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        att = att.masked_fill(~attention_mask(Tq, Tk, q.device, kv_start), float("-inf"))
        att = torch.nan_to_num(torch.softmax(att.float(), dim=-1).to(q.dtype), nan=0.0)
        return (att * keep.to(q.device) * scale_kept).to(q.dtype) @ v

    return fn


def with_dropout(p: float, manual_seed: int):
    """kernels.causal_attention with dropout p, its seed drawn right after torch.manual_seed."""
    def fn(q, k, v, kv_start=None):
        torch.manual_seed(manual_seed)
        return kernels.causal_attention(q, k, v, kv_start=kv_start, dropout_p=p)

    return fn


DROPOUT_CASES = [  # (dtype, B, H, Tq, Tk, D, kv_start): ragged lengths, one query, a cache, odd heads
    (torch.float32, 2, 3, 37, 37, 16, None),
    (torch.float32, 1, 1, 1, 1, 32, None),
    (torch.float32, 2, 1, 9, 45, 64, [0, 4]),
    (torch.float16, 1, 3, 70, 70, 32, None),
    (torch.bfloat16, 2, 3, 130, 130, 64, None),
    (torch.bfloat16, 1, 2, 256, 256, 128, None),
]


@pytest.mark.parametrize("dtype,B,H,Tq,Tk,D,starts", DROPOUT_CASES, ids=str)
def test_dropout_matches_float64_with_the_kernels_mask(dtype, B, H, Tq, Tk, D, starts):
    """Output and every gradient against float64 math that drops the probabilities the numpy
    Philox above says the kernels keep: the forward and both backward kernels draw that mask."""
    if dtype == torch.bfloat16 and DEVICE.type != "cuda":
        pytest.skip(CUDA_ONLY_REASON)
    p = 0.3
    q, k, v = cache_views(B, H, Tq, Tk, D, dtype, seed=Tq) if Tq < Tk else qkv_views(B, H, Tq, D, dtype, seed=Tq)
    keep = kept(seed_after(7, DEVICE), B, H, Tq, Tk, p)
    assert 0.6 < keep.float().mean() < 0.8 or keep.numel() < 100
    kv_start = None if starts is None else torch.tensor(starts, device=DEVICE)
    check_against_float64(q, k, v, kv_start, ours=with_dropout(p, 7), ref=dropped_reference(keep, p))


def test_dropout_draws_a_new_mask_every_call_from_torchs_generator():
    """The seed comes from torch's generator: the same manual seed, the same output bit for bit;
    the next call, another mask. dropout_p 0 is no dropout at all; outside [0, 1) it is refused."""
    q, k, v = qkv_views(1, 2, 33, 16, torch.float32)
    first = with_dropout(0.5, 3)(q, k, v)
    assert torch.equal(first, with_dropout(0.5, 3)(q, k, v))
    assert not torch.equal(first, kernels.causal_attention(q, k, v, dropout_p=0.5))
    assert torch.equal(with_dropout(0.0, 3)(q, k, v), kernels.causal_attention(q, k, v))
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
            kernels.causal_attention(q, k, v, dropout_p=bad)


def test_dropout_needs_hopper_on_cuda(monkeypatch):
    """On CUDA the kernels draw attention dropout from compute capability 9.0 (their dropout
    variants spill registers on sm_80): below it a one-line error, and impl auto picks torch
    (tests/test_model.py). Without dropout any GPU."""
    monkeypatch.setattr(attention, "_capability", lambda index: (8, 0))
    assert not attention.dropout_supported("cuda:0")
    with pytest.raises(ValueError, match=r"dropout_p > 0 needs compute capability 9.0 or newer \(Hopper\); "
                                         r"this GPU has 8.0"):
        attention._dropout(0.1, torch.device("cuda:0"))
    assert attention._dropout(0.0, torch.device("cuda:0")) == (0.0, None)
    monkeypatch.setattr(attention, "_capability", lambda index: (9, 0))
    assert attention.dropout_supported("cuda:0")


def test_dropout_mask_keeps_each_of_a_draws_sixteen_keys_independently():
    """Each Philox draw decides 16 adjacent keys: every one of the 16 positions is kept at the rate
    1 - p' (p' = p rounded to 2^-8), and neighbours within a draw are uncorrelated, within 5
    standard errors over 2^20 decisions; p = 0.1 is rounded to 26 / 256."""
    p = 0.1
    keep = kept(12345, 4, 4, 256, 256, p).reshape(-1, 16).double()  # rows: one draw each
    rate = 1 - round(p * 256) / 256
    assert rate == 1 - 26 / 256
    n = keep.shape[0]
    se = math.sqrt(rate * (1 - rate) / n)
    assert ((keep.mean(0) - rate).abs() < 5 * se).all(), keep.mean(0)
    centered = keep - keep.mean(0)
    corr = (centered[:, :-1] * centered[:, 1:]).mean(0) / (rate * (1 - rate))
    assert (corr.abs() < 5 / math.sqrt(n)).all(), corr
    assert abs(keep.mean().item() - rate) < 5 * se / math.sqrt(16)


def test_dropout_on_the_packed_projection_and_under_compile_is_the_same_call():
    """causal_attention_qkv(qkv, dropout_p) draws what causal_attention does on the views (output
    and qkv's gradient bit for bit), and so does the torch.compile path (the custom ops)."""
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 21, 3, 3, 16, generator=g, dtype=torch.float64).to(DEVICE, torch.float32).requires_grad_()
    do = upstream_grad((2, 3, 21, 16), torch.float32)
    torch.manual_seed(9)
    out = kernels.causal_attention_qkv(qkv, dropout_p=0.25)
    out.backward(do)
    views = qkv.detach().clone().requires_grad_()
    want = with_dropout(0.25, 9)(*(t.transpose(1, 2) for t in views.unbind(2)))
    want.backward(do)
    assert torch.equal(out, want) and torch.equal(qkv.grad, views.grad)
    compiled_qkv = qkv.detach().clone().requires_grad_()
    compiled = torch.compile(lambda t: kernels.causal_attention_qkv(t, dropout_p=0.25), backend="aot_eager",
                             fullgraph=True)
    torch.manual_seed(9)
    out_c = compiled(compiled_qkv)
    out_c.backward(do)
    torch.testing.assert_close(out_c, out, atol=0, rtol=0)
    torch.testing.assert_close(compiled_qkv.grad, qkv.grad, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# The fused projection's q, k, v in one tensor (the model's training path)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,B,H,T,D", [(torch.float32, 2, 3, 37, 16), (torch.float32, 1, 1, 1, 32),
                                           (torch.float16, 1, 3, 65, 64)], ids=str)
def test_packed_qkv_matches_the_views_and_float64(dtype, B, H, T, D):
    """causal_attention_qkv(qkv) gives causal_attention's output on the three views and qkv's
    gradient in one (B, T, 3, H, D) tensor: the views' gradients exactly (the same kernels), and
    float64's within the dtype's tolerance."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, T, 3, H, D, generator=g, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()
    do = upstream_grad((B, H, T, D), dtype)
    out = kernels.causal_attention_qkv(qkv)
    out.backward(do)
    views = qkv.detach().clone().requires_grad_()
    want = kernels.causal_attention(*(t.transpose(1, 2) for t in views.unbind(2)))
    want.backward(do)
    assert out.shape == (B, H, T, D) and qkv.grad.shape == qkv.shape and qkv.grad.is_contiguous()
    assert torch.equal(out, want) and torch.equal(qkv.grad, views.grad)
    exact = qkv.detach().double().requires_grad_()
    ref = causal_attention_ref(*(t.transpose(1, 2) for t in exact.unbind(2)))
    ref.backward(do.double())
    tol = FP32_TOL if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(qkv.grad.double(), exact.grad, atol=tol, rtol=tol)


def test_packed_qkv_backward_stacks_nothing():
    """The three views' gradients are stacked into qkv's by autograd (a copy of the whole gradient);
    the packed attention's backward writes them in place: no stack or cat runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    qkv = torch.randn(2, 19, 3, 3, 16, device=DEVICE, requires_grad=True)
    for fn, stacked in ((lambda t: kernels.causal_attention(*(v.transpose(1, 2) for v in t.unbind(2))), True),
                        (kernels.causal_attention_qkv, False)):
        out = fn(qkv)
        seen = Ops()
        with seen:
            out.backward(torch.ones_like(out))
        assert ("stack" in seen.seen or "cat" in seen.seen) == stacked, seen.seen


def test_packed_qkv_refuses_another_shape():
    with pytest.raises(ValueError, match=r"qkv must be \(B, T, 3, H, D\), got shape \(2, 5, 48\)"):
        kernels.causal_attention_qkv(torch.randn(2, 5, 48, device=DEVICE))


# ----------------------------------------------------------------------------------------------
# Whole model: the kernel in place of the reference attention
# ----------------------------------------------------------------------------------------------

TINY = GPTConfig(vocab_size=64, max_seq_length=32, num_layers=2, num_heads=3, d_model=48, d_ff=96, dropout=0.0)
ATTN_TRITON = TORCH_OPS._replace(name="attn-triton", attention=triton_ops().attention,  # torch LayerNorm
                                 attention_qkv=triton_ops().attention_qkv)


def test_model_logits_loss_and_grads_match_torch():
    model = perturbed_model(TINY, device=DEVICE)
    idx = torch.randint(0, TINY.vocab_size, (2, 29), device=DEVICE)
    targets = torch.randint(0, TINY.vocab_size, (2, 29), device=DEVICE)
    results = {}
    for impl in ("torch", ATTN_TRITON):
        model.impl = impl
        model.zero_grad()
        logits = model(idx)
        loss = model(idx, targets).loss
        loss.backward()
        results[impl if impl == "torch" else "triton"] = logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    (lt, st, gt), (lk, sk, gk) = results["torch"], results["triton"]
    torch.testing.assert_close(lk, lt, atol=1e-5, rtol=1e-5)
    # The loss as the logits: fp32 rounding of two attention implementations (CPU SDPA's summation
    # order varies from run to run: the loss moved by 3e-6 relative in one CI run of many).
    torch.testing.assert_close(sk, st, atol=1e-5, rtol=1e-5)
    for name in gt:
        torch.testing.assert_close(gk[name], gt[name], atol=1e-5, rtol=1e-4, msg=name)


def test_model_kv_cache_prefill_and_decode_match_full_forward():
    model = perturbed_model(TINY, device=DEVICE)
    model.impl = ATTN_TRITON
    idx = torch.randint(0, TINY.vocab_size, (2, 23), device=DEVICE)
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.allocate(TINY, batch_size=2, device=DEVICE, dtype=torch.float32)
        steps = [model(idx[:, :17], cache=cache)]
        steps += [model(idx[:, t:t + 1], cache=cache) for t in range(17, 21)]
        steps.append(model(idx[:, 21:], cache=cache))  # a two-token chunk against the cache
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_model_left_padded_decode_matches_unpadded():
    """A row left-padded by 5 (cache.start) gives the same logits as the same prompt alone."""
    model = perturbed_model(TINY, device=DEVICE)
    model.impl = ATTN_TRITON
    prompt = torch.randint(0, TINY.vocab_size, (1, 9), device=DEVICE)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long, device=DEVICE), prompt], dim=1)
    with torch.no_grad():
        alone = model(prompt)[:, -1]
        cache = KVCache.allocate(TINY, batch_size=1, device=DEVICE, dtype=torch.float32)
        cache.start.fill_(5)
        padded_last = model(padded, cache=cache)[:, -1]
        nxt = torch.tensor([[3]], device=DEVICE)
        step = model(nxt, cache=cache)[:, -1]
        alone_step = model(torch.cat([prompt, nxt], dim=1))[:, -1]
    torch.testing.assert_close(padded_last, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step, alone_step, atol=1e-5, rtol=1e-5)
    assert math.isfinite(step.abs().sum().item())


def test_model_training_drops_attention_probabilities_with_the_kernels_mask():
    """A training forward with attn_dropout passes it to the kernels, whose every layer draws its
    own seed: the same hidden states as the model with each layer's attention computed by float64
    math from the mask of the seed that layer drew. In eval no dropout: impl torch's output."""
    cfg = GPTConfig(**{**TINY.to_dict(), "attn_dropout": 0.4})
    model = perturbed_model(cfg, device=DEVICE)
    idx = torch.randint(0, cfg.vocab_size, (2, 19), device=DEVICE)
    model.impl = ATTN_TRITON
    model.train()
    torch.manual_seed(21)
    ours = model.hidden_states(idx)

    def drawn(qkv, dropout_p):  # the layer's seed, drawn as the kernel call draws it, and its mask
        assert dropout_p == 0.4
        seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64, device=qkv.device).item())
        B, T, _, H, D = qkv.shape
        q, k, v = (t.transpose(1, 2).double() for t in qkv.unbind(2))
        return dropped_reference(kept(seed, B, H, T, T, dropout_p), dropout_p)(q, k, v).to(qkv.dtype)

    model.impl = TORCH_OPS._replace(attention_qkv=drawn)
    torch.manual_seed(21)
    torch.testing.assert_close(ours, model.hidden_states(idx), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, model.hidden_states(idx))  # the next forward: other masks
    model.eval()
    model.impl = ATTN_TRITON
    evaluated = model.hidden_states(idx)
    model.impl = "torch"
    torch.testing.assert_close(evaluated, model.hidden_states(idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prune,configs", [
    (attention._prune_fwd, attention._CUDA_FWD),
    (attention._prune_dkdv, attention._CUDA_DKDV),
    (attention._prune_dq, attention._CUDA_DQ),
])
def test_cuda_prune_rules(monkeypatch, prune, configs):
    """Which configurations the launch-time prune keeps (its estimate is checked against the compiled
    kernels in tests/test_compile_check.py): 16-row blocks exactly for short queries, none past its
    max_head_dim (dropout_max_head_dim with dropout), and one configuration for fp32."""
    monkeypatch.setattr(attention, "_shared_memory_limit", lambda: 232_448)
    for d in SUPPORTED_HEAD_DIMS:
        for tq_bucket in (16, 256):
            for dropout in (False, True):
                args = {"Q": torch.empty(0, dtype=torch.float16), "HEAD_DIM": d, "TQ_BUCKET": tq_bucket,
                        "HAS_DROPOUT": dropout}
                kept = prune(configs, args)
                within = [c for c in configs if d <= (c.dropout_max_head_dim if dropout else c.max_head_dim)]
                if tq_bucket == 16 and not any(c.kwargs["BLOCK_M"] == 16 for c in within):
                    # (the forward with dropout at D = 128: no 16-row block compiles unspilled) the smallest
                    assert kept == [min(within, key=lambda c: prune.estimate(c, args))], (d, dropout)
                    continue
                assert kept and all((c.kwargs["BLOCK_M"] == 16) == (tq_bucket == 16) for c in kept)
                limit = [c.dropout_max_head_dim if dropout else c.max_head_dim for c in kept]
                assert all(d <= m and prune.estimate(c, args) <= 232_448 for c, m in zip(kept, limit))
                assert len(prune(configs, {**args, "Q": torch.empty(0, dtype=torch.float32)})) == 1
    monkeypatch.setattr(attention, "_shared_memory_limit", lambda: 1024)  # nothing fits: the smallest
    args = {"Q": torch.empty(0, dtype=torch.float16), "HEAD_DIM": 128, "TQ_BUCKET": 256}
    within = [c for c in configs if c.max_head_dim >= 128]
    assert prune(configs, args) == [min(within, key=lambda c: prune.estimate(c, args))]


def autotuner_key(tuner, args, kwargs) -> tuple:
    """The key Triton's ``Autotuner.run`` files a launch's choice under (3.6 and 3.9 alike): the
    values of its ``key`` arguments, then the dtype of every tensor argument, in order."""
    named = {**dict(zip(tuner.arg_names, args)), **{k: v for k, v in kwargs.items() if k in tuner.arg_names}}
    return tuple([named[k] for k in tuner.keys if k in named]
                 + [str(v.dtype) for v in named.values() if hasattr(v, "dtype")])


def attention_launches():
    """Forward and backward launches over what the autotuner's key depends on: head dims, dtypes,
    length buckets (16 and 32 here), with and without kv_start, with and without dropout."""
    for D in (16, 32):
        for dtype in (torch.float32, torch.float16):
            for Tq, Tk in ((3, 3), (17, 17), (5, 30)):
                for with_start, p in ((False, 0.0), (True, 0.0), (False, 0.2)):
                    q, k, v = (t.detach().requires_grad_() for t in cache_views(2, 3, Tq, Tk, D, dtype, seed=Tq))
                    kv_start = torch.tensor([0, 2], device=DEVICE) if with_start else None
                    out = kernels.causal_attention(q, k, v, kv_start=kv_start, dropout_p=p)
                    out.backward(torch.ones_like(out))


def test_a_tuning_key_goes_through_the_autotuner_once(monkeypatch):
    """After a key's first launch the attention kernels launch straight through the JIT with the
    configuration the autotuner chose (``attention._Tuned``): the autotuner sees each key once."""
    from triton.runtime.autotuner import Autotuner

    for tuned in attention._TUNED:
        monkeypatch.setattr(tuned, "chosen", {})
    seen = []
    run = Autotuner.run
    monkeypatch.setattr(Autotuner, "run", lambda self, *a, **kw: seen.append(self) or run(self, *a, **kw))
    q, k, v = (t.detach().requires_grad_() for t in cache_views(2, 3, 20, 20, 16, torch.float32))
    outs = []
    for _ in range(3):
        out = kernels.causal_attention(q, k, v)
        (dq,) = torch.autograd.grad(out, q, torch.ones_like(out))
        outs.append((out, dq))
    assert seen == [t.tuner for t in attention._TUNED]  # forward, dK/dV, dQ: once each
    for out, dq in outs[1:]:  # the direct launches compute what the autotuned one did
        torch.testing.assert_close(out, outs[0][0], rtol=0, atol=0)
        torch.testing.assert_close(dq, outs[0][1], rtol=0, atol=0)
    kernels.causal_attention(q, k, v, kv_start=torch.tensor([0, 1], device=DEVICE))
    assert seen[3:] == [attention._attn_fwd.tuner]  # a new key: the autotuner again


def test_the_tuning_key_separates_what_the_autotuners_key_separates(monkeypatch):
    """``_Tuned`` reuses a choice for every launch with the same key, so its key must never join
    two launches that Triton's autotuner keys apart (it may split more finely)."""
    keys: dict[tuple, set] = {}
    launch = attention._Tuned.launch

    def recorded(self, grid, key, *args, **kwargs):
        keys.setdefault((id(self), key), set()).add(autotuner_key(self.tuner, args, kwargs))
        return launch(self, grid, key, *args, **kwargs)

    monkeypatch.setattr(attention._Tuned, "launch", recorded)
    attention_launches()
    assert len(keys) == 3 * 2 * 2 * 3 * 3  # kernels x head dims x dtypes x length buckets x (kv_start, dropout)
    joined = {key: found for key, found in keys.items() if len(found) > 1}
    assert not joined


_DISK_CACHE_CHILD = r"""
import json, sys
import torch
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction
from kernels import attention, compile_check

driver.set_active(compile_check.StandInDriver(compile_check.ARCHS["sm_90"]))
attention._launchable = lambda device: True
JITFunction.run = lambda self, *args, **kwargs: None  # nothing compiles or launches: only the choice matters
benched = []
Autotuner._bench = lambda self, *args, config, **kw: benched.append(config) or [float(config.num_warps)] * 3
q = torch.randn(2, 8, 256, 64, dtype=torch.bfloat16)
picks = []
for _ in range(2):  # a first process, then one that finds the first's choice on disk
    for tuned in attention._TUNED:
        tuned.chosen, tuned.tuner.cache = {}, {}
    before = len(benched)
    attention._attention_forward(q, q, q, 0.125, None)
    picks.append([str(attention._attn_fwd.tuner.best_config), len(benched) - before])
print(json.dumps({"picks": picks, "cache_results": [t.tuner.cache_results for t in attention._TUNED],
                  "pre_hooks": [bool(c.pre_hook) for t in attention._TUNED for c in t.tuner.configs]}))
"""


def test_an_autotuned_choice_is_kept_on_disk_for_the_next_process(tmp_path):
    """On CUDA the attention autotuners keep their choices in Triton's cache directory
    (``cache_results``), so a new process (train.py, sample.py) starts without benchmarking every
    configuration again. Checked on the compile check's stand-in sm_90 driver, the benchmark faked:
    the second tuning of a key reads the first's choice (no configuration benchmarked) and picks the
    same. A configuration with a pre_hook would switch the disk cache off (Triton's rule): none has."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", _DISK_CACHE_CHILD], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["cache_results"] == [True, True, True] and not any(result["pre_hooks"])
    (first, benched_first), (second, benched_second) = result["picks"]
    assert benched_first > 1 and benched_second == 0 and first == second
    assert list(tmp_path.rglob("_attn_fwd_kernel.autotune.json"))
