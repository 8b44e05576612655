"""The fused LM head + cross-entropy, both implementations, against float64 log-softmax math.

``gpt.ops.linear_cross_entropy_ref`` (the chunked PyTorch path) and ``kernels.linear_cross_entropy``
(the Triton row kernel, in Triton's interpreter on a CPU) return (mean loss, correct, count) and
gradients for h and the weight; the expectation is float64 ``F.log_softmax`` over all (N, V) logits
of the same (dtype-rounded) inputs. Chunk sizes are shrunk so that every case runs several row
chunks with a ragged last one; V = 5,003 and 50,257 span several vocabulary tiles of the kernel
(4,096 wide) with a ragged last tile, V = 8,192 whole tiles only, V = 97 one tile.

Tolerances, relative to the largest reference value of each quantity (dh and dW are sums over
V and N terms): float32 2e-5 (fp32 GEMMs over C <= 64 and fp32 softmax statistics; seen <= 2e-6),
float16 4e-3 (logits and the stored gradient softmax - onehot rounded to 2**-11; dW summed over
all rows), bfloat16 (the reference only) 3e-2.
"""

import threading

import pytest
import torch
import torch.nn.functional as F

import kernels
import kernels.cross_entropy as kce
from gpt import GPT2Model, GPTConfig
from gpt import ops
from gpt.ops import TORCH_OPS, linear_cross_entropy_ref, linear_cross_entropy_unfused, triton_ops

from conftest import DEVICE  # the GPU, or the CPU with Triton's interpreter

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
IMPLS = {"ref": linear_cross_entropy_ref, "triton": kernels.linear_cross_entropy}
ROWS_PER_CHUNK = 8


def padded(V, multiple):
    return -(-V // multiple) * multiple


def set_chunk_rows(monkeypatch, V, rows=ROWS_PER_CHUNK):
    """Chunks of ``rows`` rows of logits for vocabulary size V (fp32; the reference chunks by bytes: 4
    rows in fp64, 16 in half precision; both chunk the padded vocabulary), and the reference's
    softmax in blocks of 3 rows."""
    monkeypatch.setattr(ops, "LCE_CHUNK_BYTES", rows * padded(V, ops.LCE_VOCAB_MULTIPLE) * 4)
    monkeypatch.setattr(ops, "LCE_BLOCK_ELEMENTS", 3 * V)
    monkeypatch.setattr(kce, "CHUNK_ELEMENTS", rows * padded(V, kce.VOCAB_MULTIPLE))


def make_case(N, C, V, dtype, seed=0, ignored=(), hits=()):
    """h (N, C), weight (V, C) in dtype, targets (N,): random, except rows in ``hits`` (their float64
    argmax) and ``ignored`` (-1)."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, C, generator=g) * 2).to(dtype)
    weight = (torch.randn(V, C, generator=g) / C**0.5).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    logits = h.double() @ weight.double().t()
    for r in hits:
        targets[r] = logits[r].argmax()
    for r in ignored:
        targets[r] = -1
    return h.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE)


def float64_expectation(h, weight, targets, dtype, ignore_index=-1):
    """Loss, correct, count, dh, dW from float64 log-softmax over all logits of the given inputs.

    ``correct`` is counted on the logits rounded to the compute dtype (what both implementations
    compare), with torch's first-index argmax.
    """
    h64 = h.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    logits = h64 @ w64.t()
    keep = targets != ignore_index
    count = keep.sum()
    nll = -F.log_softmax(logits, dim=-1).gather(1, torch.where(keep, targets, 0)[:, None]).squeeze(1)
    loss = (nll * keep).sum() / count.clamp(min=1)
    loss.backward()
    rounded = logits.detach().to(dtype)
    correct = ((rounded.argmax(-1) == targets) & keep).sum()
    return loss.detach(), correct, count, h64.grad, w64.grad


def close(actual, expected, dtype, name):
    tol = TOL[dtype] * max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.double(), expected, atol=tol, rtol=TOL[dtype], msg=lambda m: f"{name}: {m}")


def check(impl, h, weight, targets, dtype, ignore_index=-1):
    h = h.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    loss, correct, count = IMPLS[impl](h, weight, targets, ignore_index)
    loss.backward()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.dim() == 0
    assert h.grad.dtype == dtype and weight.grad.dtype == dtype
    e_loss, e_correct, e_count, e_dh, e_dw = float64_expectation(h, weight, targets, dtype, ignore_index)
    assert count.item() == e_count.item()
    assert correct.item() == e_correct.item()
    close(loss, e_loss, dtype, "loss")
    close(h.grad, e_dh, dtype, "dh")
    close(weight.grad, e_dw, dtype, "dweight")
    return correct.item()


CASES = [  # N, C, V: N never a multiple of the 8-row chunk
    pytest.param(37, 24, 97, id="N37-V97"),
    pytest.param(29, 40, 5003, id="N29-V5003"),
    pytest.param(11, 64, 50257, id="N11-V50257"),
    pytest.param(13, 16, 8192, id="N13-V8192"),  # whole tiles only: no ragged last tile
]


CUDA_ONLY = pytest.mark.skipif(DEVICE.type != "cuda", reason="bf16 through the kernel is checked on a GPU (the "
                               "interpreter truncates fp32 -> bf16 casts)")


@pytest.mark.parametrize("impl,dtype", [
    pytest.param("ref", torch.float64, id="ref-fp64"), pytest.param("ref", torch.float32, id="ref-fp32"),
    pytest.param("ref", torch.bfloat16, id="ref-bf16"), pytest.param("triton", torch.float32, id="triton-fp32"),
    pytest.param("triton", torch.float16, id="triton-fp16"),
    pytest.param("triton", torch.bfloat16, id="triton-bf16", marks=CUDA_ONLY)])
@pytest.mark.parametrize("N,C,V", CASES)
def test_matches_float64(monkeypatch, impl, dtype, N, C, V):
    set_chunk_rows(monkeypatch, V)
    h, weight, targets = make_case(N, C, V, dtype, ignored=(2, 9), hits=(0, 5, 10))
    assert check(impl, h, weight, targets, dtype) >= 3  # the planted hits were counted


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_whole_chunk_path_matches_float64_and_the_blocked_one(monkeypatch, dtype):
    """The reference's GPU way (softmax over whole chunks, argmax without a sync) checked on the CPU:
    the same loss, hits (ties included) and gradients as float64 and as the blocked CPU way. On the
    CPU on every machine: a GPU picks its kernels by shape, and the two ways' shapes differ, so the
    exact comparison failed on an H200 (2026-11-26); the GPU way on a GPU is checked against
    float64 by ``test_matches_float64``."""
    set_chunk_rows(monkeypatch, 97)
    h, weight, targets = (t.cpu() for t in make_case(37, 24, 97, dtype, ignored=(2, 9), hits=(0, 5, 10)))
    weight[7] = weight[3]  # tokens 3 and 7 tie on every row: a target 7 there is a miss (first index)
    targets[[11, 12]] = torch.tensor([3, 7])
    got = {}
    for blocked in (True, False):
        monkeypatch.setattr(ops, "_blocks_on", lambda device, blocked=blocked: blocked)
        hh, ww = h.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, correct, count = linear_cross_entropy_ref(hh, ww, targets)
        loss.backward()
        got[blocked] = (loss.detach(), correct, hh.grad, ww.grad)
        assert check("ref", h, weight, targets, dtype) >= 3
    (loss_b, correct_b, *grads_b), (loss_w, correct_w, *grads_w) = got[True], got[False]
    assert correct_b == correct_w
    torch.testing.assert_close(loss_w, loss_b, atol=0, rtol=1e-6)  # fp32 sums, grouped differently
    for a, b in zip(grads_w, grads_b):  # rows are independent: the same arithmetic per element
        torch.testing.assert_close(a, b, atol=0, rtol=0)


class GemmShapes(torch.overrides.TorchFunctionMode):
    """Records the (rows, inner, cols) of every 2-D matrix product called while active."""

    PRODUCTS = {"mm", "matmul", "addmm", "addmm_", "__matmul__"}

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in self.PRODUCTS:
            a, b = args[-2:]
            self.shapes.append((a.shape[0], a.shape[1], b.shape[1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_keeps_its_cpu_logits_buffer_across_calls(monkeypatch, dtype):
    """On a CPU the reference's chunk of logits lives in one buffer per thread and dtype, kept from
    call to call (fresh pages of a 128 MiB chunk cost ~50 ms of faults): the next call writes the
    same memory and is still right against float64 (nothing of the last call's logits leaks in, the
    bf16 vocabulary padding included); a call under inference mode shares it with training calls;
    another thread gets its own."""
    set_chunk_rows(monkeypatch, 97)
    seen = []

    def spy(shape, dtype, device):
        buf = chunk_buffer(shape, dtype, device)
        seen.append(buf)  # held: a new allocation could not take its address
        return buf

    chunk_buffer = ops._chunk_buffer
    monkeypatch.setattr(ops, "_chunk_buffer", spy)
    monkeypatch.setattr(ops, "_CPU_CHUNKS", threading.local())
    cases = [[t.cpu() for t in make_case(37, 24, 97, dtype, seed=s, ignored=(2,), hits=(0, 5))] for s in (0, 1)]
    for h, weight, targets in cases:
        with torch.inference_mode():
            first = linear_cross_entropy_ref(h, weight, targets)
        h = h.clone().requires_grad_()
        weight = weight.clone().requires_grad_()
        loss, correct, count = linear_cross_entropy_ref(h, weight, targets)
        loss.backward()
        e_loss, e_correct, e_count, e_dh, e_dw = float64_expectation(h, weight, targets, dtype)
        assert correct.item() == e_correct.item() == first[1].item() >= 2 and count.item() == e_count.item()
        close(loss, e_loss, dtype, "loss")
        assert loss.item() == first[0].item()
        close(h.grad, e_dh, dtype, "dh")
        close(weight.grad, e_dw, dtype, "dweight")
    assert len(seen) == 4 and len({t.data_ptr() for t in seen}) == 1
    thread = threading.Thread(target=lambda: linear_cross_entropy_ref(*cases[0]))
    thread.start()
    thread.join()
    assert len(seen) == 5 and seen[-1].data_ptr() != seen[0].data_ptr()


@pytest.mark.parametrize("impl,dtype", [("ref", torch.bfloat16), ("triton", torch.float32)])
def test_gemms_run_over_the_padded_vocabulary(monkeypatch, impl, dtype):
    """Each of the three head GEMMs (logits, dh, dW) spans the vocabulary padded with zero weight rows
    to a multiple of 128 (aligned BLAS kernels), never V = 97 itself, and the padding changes nothing:
    loss, hits and both gradients against float64. (The reference pads on a GPU and in half
    precision; the kernel path always.)"""
    set_chunk_rows(monkeypatch, 97)
    h, weight, targets = make_case(19, 16, 97, dtype, ignored=(2,), hits=(0, 5))
    mode = GemmShapes()

    def recorded(fn):  # the head's own products, not the float64 expectation's
        def run(*args):
            with mode:
                return fn(*args)
        return run

    if impl == "ref":
        monkeypatch.setitem(IMPLS, impl, recorded(IMPLS[impl]))
    else:  # the chunk loop, inside the custom op (a mode entered outside does not reach in)
        monkeypatch.setattr(kce, "_forward", recorded(kce._forward))
    assert check(impl, h, weight, targets, dtype) >= 2
    chunks = 2 if dtype == torch.bfloat16 else 3  # 16 rows a chunk in half precision, 8 in fp32
    assert len(mode.shapes) == 3 * chunks  # (logits, dh, dW) per row chunk
    assert all(128 in shape and 97 not in shape for shape in mode.shapes), mode.shapes
    w = (ops.vocab_padded if impl == "ref" else kce._vocab_padded)(weight, dtype)
    assert w.shape == (128, 16) and torch.equal(w[:97], weight) and torch.count_nonzero(w[97:]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("V", [97, 5003])
def test_row_kernel_reads_past_the_vocabulary_but_never_counts_it(dtype, V):
    """The row kernel's last tile loads up to the padded width VP (so its load stays vectorized) and
    must leave the columns in [V, VP) out of the softmax, the argmax and the loss, and write zeros
    there with the gradient (dh and dW then add nothing from them). Junk logits of 1e4 in the
    padding would dominate every row if they were counted. One tile (V = 97) and a ragged second
    tile (V = 5,003), each 16-byte vector of fp32 (4) and fp16 (8)."""
    VP, M = padded(V, kce.VOCAB_MULTIPLE), 6
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(M, VP, generator=g)).to(dtype)
    logits[:, V:] = 1e4
    targets = torch.randint(0, V, (M,), generator=g)
    targets[1] = -1
    real = logits[:, :V].double()
    expected_loss = torch.logsumexp(real, -1) - real[torch.arange(M), targets.clamp(min=0)]
    expected_grad = torch.softmax(real, -1) - F.one_hot(targets.clamp(min=0), V)
    expected_grad[1] = 0
    logits, targets = logits.to(DEVICE), targets.to(DEVICE)
    loss = torch.empty(M, device=DEVICE)
    hit = torch.empty(M, device=DEVICE, dtype=torch.int32)
    kce._ce_rows(logits, V, targets, loss, hit, -1, True)
    tol = TOL[dtype]
    torch.testing.assert_close(loss.cpu().double(), torch.where(targets.cpu() >= 0, expected_loss, 0.0),
                               atol=tol * 10, rtol=tol)
    assert torch.equal(hit.cpu().bool(), (real.argmax(-1) == targets.cpu()))
    torch.testing.assert_close(logits[:, :V].cpu().double(), expected_grad, atol=tol, rtol=0)
    assert torch.count_nonzero(logits[:, V:]) == 0


@pytest.mark.parametrize("write_grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_row_kernel_persistent_grid_and_tiles_give_the_same_rows(dtype, write_grad):
    """The benchmark's sweep (``_ce_rows(block=, warps=, programs=)``): a persistent grid of 3
    programs over 8 rows (rows p, p + 3, ...), and other tiles and warps, write the loss, hits and
    gradient of the default grid of one program per row -- every row once (a row done twice would
    take its gradient for logits), to float rounding (other tiles fold the lanes in another order;
    on a GPU another compiled kernel may fuse multiply-adds otherwise)."""
    V, M = 5003, 8
    VP = padded(V, kce.VOCAB_MULTIPLE)
    g = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(M, VP, generator=g)).to(dtype).to(DEVICE)
    targets = torch.randint(0, V, (M,), generator=g).to(DEVICE)
    targets[3] = -1

    def run(**options):
        out = logits.clone(), torch.empty(M, device=DEVICE), torch.empty(M, device=DEVICE, dtype=torch.int32)
        kce._ce_rows(out[0], V, targets, out[1], out[2], -1, write_grad, **options)
        return out

    want = run()
    for options in (dict(programs=3), dict(programs=3, block=1024, warps=2), dict(block=512, warps=1),
                    dict(programs=M)):
        got = run(**options)
        assert torch.equal(got[2], want[2]), options
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[0], want[0], atol=TOL[dtype] / 10, rtol=TOL[dtype])
    assert not torch.equal(want[0], logits) if write_grad else torch.equal(want[0], logits)


def test_dw_accumulated_in_fp32_inside_the_gemm_where_torch_can(monkeypatch):
    """Where torch multiplies half precision into an fp32 output and accumulates into it in place
    (``torch.addmm(out_dtype=torch.float32)``, CUDA in newer versions: ``_gemms_into_fp32`` probes),
    each chunk's dW product goes straight into the fp32 dW -- the first chunk's written, every later
    one added. The CPU has no such kernel (the probe says no), so here torch's two calls are stood in
    for by fp32 products of the same operands; the result must match float64 as the half-precision
    partials do, and the stand-ins must be called once per chunk (3 chunks of 8 rows)."""
    assert not kce._gemms_into_fp32(torch.device("cpu"), torch.float16)
    calls = []
    mm, addmm = torch.mm, torch.addmm

    def fake_mm(a, b, *args, out_dtype=None, **kwargs):
        if out_dtype is None:
            return mm(a, b, *args, **kwargs)
        calls.append("mm")
        return a.float() @ b.float()

    def fake_addmm(c, a, b, *args, out_dtype=None, out=None, **kwargs):
        if out_dtype is None:
            return addmm(c, a, b, *args, out=out, **kwargs) if out is not None else addmm(c, a, b, *args, **kwargs)
        calls.append("addmm")
        assert out is c and c.dtype == torch.float32
        return out.add_(a.float() @ b.float())

    monkeypatch.setattr(kce, "_gemms_into_fp32", lambda device, dtype: dtype == torch.float16)
    monkeypatch.setattr(torch, "mm", fake_mm)
    monkeypatch.setattr(torch, "addmm", fake_addmm)
    set_chunk_rows(monkeypatch, 97, rows=8)
    h, weight, targets = make_case(19, 16, 97, torch.float16, ignored=(2,), hits=(0, 5))
    assert check("triton", h, weight, targets, torch.float16) >= 2
    assert calls == ["mm", "addmm", "addmm"]


@pytest.mark.parametrize("impl", IMPLS)
def test_ignore_index_inside_the_vocabulary(monkeypatch, impl):
    """ignore_index may be a real token (say, a padding id): those rows count for nothing."""
    set_chunk_rows(monkeypatch, 97)
    h, weight, targets = make_case(21, 16, 97, torch.float32, hits=(0, 6))
    targets[[3, 4, 11]] = 7
    assert check(impl, h, weight, targets, torch.float32, ignore_index=7) >= 2


@pytest.mark.parametrize("ignore_index", [-100, 7])
@pytest.mark.parametrize("impl", IMPLS)
def test_every_target_ignored_gives_zero_not_nan(monkeypatch, impl, ignore_index):
    set_chunk_rows(monkeypatch, 97)
    h, weight, targets = make_case(13, 16, 97, torch.float32)
    targets = torch.full_like(targets, ignore_index)
    h.requires_grad_()
    weight.requires_grad_()
    loss, correct, count = IMPLS[impl](h, weight, targets, ignore_index=ignore_index)
    loss.backward()
    assert loss.item() == 0.0 and correct.item() == 0 and count.item() == 0
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(weight.grad) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_a_tie_counts_only_the_first_index(impl):
    """Rows whose maximal logit is shared by two tokens: the target is right only if it is the first
    of them (torch.argmax's rule, greedy decoding's pick). The kernel keeps a first index per lane
    (lane = column // 4 in fp32, within its 4,096-wide tile) and takes the least among the lanes
    holding the row's max, so the ties span its cases: two tiles and two lanes (tokens 3 and 4,100),
    one tile and one lane (7 and 9 in lanes 1 and 2), the later token in a lower lane of the next
    tile (21 in lane 5 and 4,097 in lane 0), and one lane of two tiles (2 and 4,098, both lane 0)."""
    V, C = 5003, 16
    pairs = [(3, 4100), (7, 9), (21, 4097), (2, 4098)]
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(V, C, generator=g) / C**0.5
    for first, later in pairs:  # norm 2 against ~1 for the others: the row's max
        weight[later] = weight[first] = 2 * weight[first] / weight[first].norm()
    h = 40 * torch.stack([weight[first] for first, _ in pairs for _ in range(2)])  # rows whose max is tied
    targets = torch.tensor([t for pair in pairs for t in pair])
    logits = h @ weight.t()
    firsts = torch.tensor([first for first, _ in pairs for _ in range(2)])
    assert torch.equal(logits.argmax(-1), firsts)  # the tie is real and maximal
    assert torch.equal(logits[torch.arange(len(targets)), targets], logits[torch.arange(len(targets)), firsts])
    hits = [IMPLS[impl](h[r:r + 1].to(DEVICE), weight.to(DEVICE), targets[r:r + 1].to(DEVICE))[1].item()
            for r in range(len(targets))]
    assert hits == [1, 0] * len(pairs)


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_dims_and_frozen_weight(monkeypatch, impl):
    """(B, T, C) hidden states; a weight without grad gets none (only dh is made); under no_grad none."""
    set_chunk_rows(monkeypatch, 97)
    h, weight, targets = make_case(2 * 7, 16, 97, torch.float32, ignored=(4,))
    h3 = h.view(2, 7, 16).clone().requires_grad_()
    loss, correct, count = IMPLS[impl](h3, weight, targets.view(2, 7))
    loss.backward()
    assert weight.grad is None and h3.grad.shape == (2, 7, 16)
    e_loss, e_correct, _, e_dh, _ = float64_expectation(h, weight, targets, torch.float32)
    close(loss, e_loss, torch.float32, "loss")
    close(h3.grad.view(14, 16), e_dh, torch.float32, "dh")
    grad_passes = []  # no gradient is made under no_grad (evaluation)
    for module, name in ((ops, "_cross_entropy_rows"), (kce, "_ce_rows")):
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, fn=fn: grad_passes.append(a[-1]) or fn(*a))
    with torch.no_grad():
        again = IMPLS[impl](h3, weight.requires_grad_(), targets.view(2, 7))
    assert grad_passes and not any(grad_passes)
    assert not again[0].requires_grad
    assert torch.equal(again[0], loss.detach()) and again[1] == correct == e_correct


@pytest.mark.parametrize("impl", IMPLS)
def test_upstream_gradient_scales_the_gradients(monkeypatch, impl):
    """d(3 * loss) = 3 d(loss): the deferred scaling uses the upstream gradient."""
    set_chunk_rows(monkeypatch, 97)
    h, weight, targets = make_case(10, 8, 97, torch.float32, ignored=(1,))
    grads = []
    for factor in (1.0, 3.0):
        hh, ww = h.clone().requires_grad_(), weight.clone().requires_grad_()
        (factor * IMPLS[impl](hh, ww, targets)[0]).backward()
        grads.append((hh.grad, ww.grad))
    for one, three in zip(*grads):
        torch.testing.assert_close(three, 3 * one, atol=1e-7, rtol=1e-6)


def test_bad_inputs_raise_one_line_errors():
    h, weight, targets = make_case(5, 8, 97, torch.float32)
    for fn in IMPLS.values():
        if DEVICE.type == "cpu":  # checked on CPU tensors only: on a GPU it would cost a host sync per step
            with pytest.raises(ValueError, match=r"target 97 outside the vocabulary \[0, 97\)"):
                fn(h, weight, torch.tensor([1, 2, 97, 3, 4], device=DEVICE))
        with pytest.raises(ValueError, match="targets shape"):
            fn(h, weight, targets[:4])
        with pytest.raises(ValueError, match=r"weight \(V, C\)"):
            fn(h, weight[:, :7], targets)
        with pytest.raises(ValueError, match="int64 or int32"):
            fn(h, weight, targets.float())
    with pytest.raises(ValueError, match="float64 not supported"):
        kernels.linear_cross_entropy(h.double(), weight, targets)


def test_custom_op_passes_opcheck_and_compiles():
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    h, weight, targets = make_case(9, 16, 97, torch.float32, ignored=(3,))
    op = torch.ops.tinygpt.linear_cross_entropy_fwd.default
    for need in (True, False):
        torch.library.opcheck(op, (h.clone().requires_grad_(need), weight.clone().requires_grad_(need), targets,
                                   -1, torch.float32, need, need),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm)

    torch._dynamo.reset()
    compiled = torch.compile(kernels.linear_cross_entropy, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep),
                             fullgraph=True)
    hc, wc = h.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, correct, count = compiled(hc, wc, targets)
    loss.backward()
    assert "tinygpt.linear_cross_entropy_fwd" in graphs[0]
    he, we = h.clone().requires_grad_(), weight.clone().requires_grad_()
    eager = kernels.linear_cross_entropy(he, we, targets)
    eager[0].backward()
    assert torch.equal(loss, eager[0]) and correct == eager[1] and count == eager[2]
    assert torch.equal(hc.grad, he.grad) and torch.equal(wc.grad, we.grad)


# ----------------------------------------------------------------------------------------------
# The model: fused head against the unfused F.linear + F.cross_entropy, both impls
# ----------------------------------------------------------------------------------------------

CFG = GPTConfig(vocab_size=101, max_seq_length=32, num_layers=2, num_heads=2, d_model=32, d_ff=64, dropout=0.0)
UNFUSED = TORCH_OPS._replace(name="torch-unfused", linear_cross_entropy=linear_cross_entropy_unfused)


def model_grads(impl, idx, targets, dtype="fp32"):
    torch.manual_seed(0)
    model = GPT2Model(CFG, impl=impl).to(DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = model(idx, targets)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("impl,dtype", [("torch", "fp32"), ("triton", "fp32"), ("torch", "bf16"),
                                        pytest.param("triton", "bf16", marks=CUDA_ONLY)])
def test_model_loss_and_every_gradient_match_the_unfused_head(monkeypatch, impl, dtype):
    set_chunk_rows(monkeypatch, CFG.vocab_size)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, CFG.vocab_size, (3, 17), generator=g).to(DEVICE)
    targets = torch.randint(0, CFG.vocab_size, (3, 17), generator=g).to(DEVICE)
    targets[1, 10:] = -1
    ops_table = TORCH_OPS if impl == "torch" else triton_ops()
    fused, fused_grads = model_grads(ops_table, idx, targets, dtype)
    ref, ref_grads = model_grads(ops_table._replace(linear_cross_entropy=linear_cross_entropy_unfused),
                                 idx, targets, dtype)
    tol = 2e-5 if dtype == "fp32" else 2e-2
    torch.testing.assert_close(fused.loss, ref.loss, atol=tol, rtol=tol)
    assert fused.count.item() == ref.count.item() == 3 * 17 - 7
    if dtype == "fp32":
        assert fused.correct.item() == ref.correct.item()
    for name, grad in ref_grads.items():
        assert fused_grads[name].dtype == grad.dtype == torch.float32
        atol = tol * grad.abs().max().item()
        torch.testing.assert_close(fused_grads[name], grad, atol=atol, rtol=tol, msg=lambda m: f"{name}: {m}")
