"""Split-K decode attention (flash-decoding) vs float64 math, with the static cache's masking.

Runs on the GPU when there is one, else in Triton's interpreter on CPU (fp32 and fp16; the kernel
has no tl.dot, but bf16 stores round toward zero in the interpreter, so bf16 is checked on CUDA in
bench/test_bench_sample.py). The reference is ``causal_attention_ref(..., kv_len=...)``: the whole
fixed-size cache, slots outside [kv_start[b], kv_len[b]) masked.
"""

import pytest
import torch

import kernels
from gpt.ops import causal_attention_ref
from kernels.decode_attention import plan_splits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 2e-5


def static_cache(B, H, S, D, dtype, seed=0):
    """q (B, H, 1, D) and one layer of a (L, B, H, S, D) cache, filled with noise everywhere (stale
    slots included: the kernel must never read past kv_len). q is a strided view, as the model's
    fused projection gives."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, 1, 3, H, D, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    q = qkv[:, :, 0].transpose(1, 2)
    cache = torch.randn(2, 3, B, H, S, D, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    return q, cache[0, 1], cache[1, 1]


def check(q, k, v, kv_len, kv_start=None, num_splits=None):
    out = kernels.decode_attention(q, k, v, kv_len, kv_start=kv_start, num_splits=num_splits)
    exact = causal_attention_ref(q.double(), k.double(), v.double(), kv_start=kv_start, kv_len=kv_len)
    assert out.shape == q.shape and out.dtype == q.dtype
    if q.dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact, atol=FP32_TOL, rtol=FP32_TOL)
    else:  # within twice PyTorch's own fp16 error, plus a floor
        peer = causal_attention_ref(q, k, v, kv_start=kv_start, kv_len=kv_len)
        ours_err = (out.double() - exact).abs().max().item()
        peer_err = (peer.double() - exact).abs().max().item()
        assert ours_err <= 2 * peer_err + 2e-3, f"error {ours_err:.3g} vs fp16 torch {peer_err:.3g}"
    return out


def lengths(values):
    return torch.tensor(values, dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 2, 3, None])
def test_per_row_lengths_and_starts(dtype, num_splits):
    """Odd lengths, a full cache, one slot, and starts mid-block, over 1, 2, 3 or the default chunks."""
    S = 53
    q, k, v = static_cache(4, 3, S, 32, dtype)
    kv_len = lengths([S, 1, 37, 20])
    check(q, k, v, kv_len, num_splits=num_splits)
    check(q, k, v, kv_len, lengths([0, 0, 17, 19]), num_splits=num_splits)  # row 3: only its last slot


@pytest.mark.parametrize("S", [1, 17, 64, 256])
def test_one_length_for_every_row_up_to_the_context(S):
    """kv_len of shape (1,), as the model's decode step passes it, up to the seed context (256)."""
    q, k, v = static_cache(2, 2, S, 64, torch.float32, seed=S)
    for n in sorted({1, (S + 1) // 2, S}):
        check(q, k, v, lengths([n]))
        check(q, k, v, lengths([n]), lengths([0, n - 1]), num_splits=4)


@pytest.mark.parametrize("D", [16, 128])
def test_head_dims(D):
    q, k, v = static_cache(1, 1, 40, D, torch.float32, seed=D)
    check(q, k, v, lengths([33]), num_splits=2)


def test_stale_slots_are_never_read():
    """NaN past kv_len and before kv_start (never written) must not reach the output."""
    q, k, v = static_cache(2, 2, 48, 16, torch.float32)
    kv_len, kv_start = lengths([30, 41]), lengths([0, 9])
    want = check(q, k, v, kv_len, kv_start, num_splits=3)
    for t in (k, v):
        t[0, :, 30:] = float("nan")
        t[1, :, 41:] = float("nan")
        t[1, :, :9] = float("nan")
    got = kernels.decode_attention(q, k, v, kv_len, kv_start=kv_start, num_splits=3)
    assert torch.equal(got, want)


def test_row_with_no_allowed_slot_gives_zeros():
    q, k, v = static_cache(2, 2, 20, 16, torch.float32)
    for splits in (1, 2):
        out = kernels.decode_attention(q, k, v, lengths([5, 20]), kv_start=lengths([5, 0]), num_splits=splits)
        assert torch.equal(out[0], torch.zeros_like(out[0])) and out[1].abs().sum() > 0


def test_plan_splits():
    """Chunks are whole key blocks, cover every slot, and leave no split empty by construction."""
    cpu = torch.device("cpu")
    for rows, slots, block, asked in [(8, 256, 64, None), (8, 256, 16, 3), (512, 1024, 64, None), (1, 5, 16, 8),
                                      (1, 1024, 32, 100)]:
        splits, chunk = plan_splits(rows, slots, block, cpu, asked)
        assert chunk % block == 0 and splits * chunk >= slots > (splits - 1) * chunk
        assert 1 <= splits <= 64


@pytest.mark.parametrize("bad,match", [
    (dict(q=(2, 2, 2, 16)), "one query row"),
    (dict(k=(2, 2, 9, 16)), "disagree"),
    (dict(q=(2, 2, 1, 24), k=(2, 2, 8, 24), v=(2, 2, 8, 24)), "head dim 24"),
    (dict(kv_len=torch.zeros(3, dtype=torch.int64)), "kv_len"),
    (dict(kv_len=torch.zeros(2, dtype=torch.int32)), "kv_len"),
    (dict(kv_start=torch.zeros(1, dtype=torch.int64)), "kv_start"),
])
def test_bad_inputs_raise(bad, match):
    shapes = dict(q=(2, 2, 1, 16), k=(2, 2, 8, 16), v=(2, 2, 8, 16))
    shapes.update({n: s for n, s in bad.items() if n in shapes})
    q, k, v = (torch.zeros(shapes[n], device=DEVICE) for n in ("q", "k", "v"))
    kv_len = bad.get("kv_len", torch.ones(2, dtype=torch.int64)).to(DEVICE)
    kv_start = bad.get("kv_start")
    with pytest.raises(ValueError, match=match):
        kernels.decode_attention(q, k, v, kv_len, kv_start=None if kv_start is None else kv_start.to(DEVICE))


def test_custom_op_passes_opcheck_and_compiles():
    q, k, v = static_cache(2, 2, 24, 16, torch.float32)
    kv_len, kv_start = lengths([19, 24]), lengths([3, 0])
    op = torch.ops.tinygpt.decode_attention.default
    torch.library.opcheck(op, (q, k, v, kv_len, kv_start, 0.25, 2), test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(kernels.decode_attention, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, kv_len, kv_start=kv_start),
                               kernels.decode_attention(q, k, v, kv_len, kv_start=kv_start), atol=0, rtol=0)
