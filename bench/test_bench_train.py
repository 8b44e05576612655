"""One optimizer step of the seed-sized model on 8 x 256 tokens (32 x 256 on a GPU): our train step against peers.

Peers, measured in the same run: transformers' GPT2LMHeadModel (fp32, eager attention, AdamW) holding
the same weights as ours, and the seed's own model and recipe (bench/seed_recipe.py). Ours runs as
train.py does: impl torch in fp32 on a CPU (and in bf16 autocast: the ``_bf16`` variants, train.py's
default on a CPU with AMX) and in bf16 autocast on CUDA, fused AdamW, clipping at 1.0, the fused LM head + cross-entropy; on CUDA also impl triton, impl
triton + torch.compile, impl torch + torch.compile (the compiled plain-PyTorch peer), and both
impls' step captured in a CUDA graph (train.py --cuda-graph). The ``_unfused`` variants swap in the unfused head
(``gpt.ops.linear_cross_entropy_unfused``: all logits, ``F.cross_entropy``) to show what the fused
one buys in the same run.
Before timing, each model's loss on the batch is checked against ours (same weights: equal; the seed
model: a fresh model's loss is near ln(vocab)).

Beside the step, the validation pass's forward (``test_eval_forward``): eager against CUDA-graphed.
On a CPU, ``test_cpu_attention_training``: bf16 training's attention on fp32 copies against SDPA in
bf16, alone and in the ``tiny`` preset's step.
"""

import math
import time

import pytest
import torch

from bench.common import best_seconds, kernel_groups_ms, kernel_times_ms, record, top_kernels
from bench.seed_recipe import SEED_IGNORE_INDEX, SeedGPT, seed_loss, seed_optimizer
from gpt import GPT2Model, GPTConfig, TrainConfig
from gpt.hardware import autocast
from gpt.ops import linear_cross_entropy_unfused, select_ops
from gpt.step import build_optimizer, train_step

pytestmark = pytest.mark.benchmark(group="train")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = "bf16" if CUDA else "fp32"  # a CPU's bf16 (train.py's default with AMX) has its own variants below
CFG = GPTConfig(dropout=0.0)  # the seed's sizes; no dropout so the weights-equal check is exact
B, T = (32, 256) if CUDA else (8, 256)  # the GPU goal's batch (issue 12); a CPU's affordable one
TOKENS = B * T
ROUNDS = 10 if CUDA else 2
RESULTS: dict[str, float] = {}  # tokens/s by variant, for ratios within this run


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, CFG.vocab_size, (B, T), generator=g)
    y = torch.cat([x[:, 1:], torch.full((B, 1), -1)], dim=1)  # next token; the last position has none
    return x.to(DEVICE), y.to(DEVICE)


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    return GPT2Model(CFG, impl="torch").state_dict()


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _run(benchmark, name, step):
    step()  # warm-up (and compilation)
    _sync()
    t0 = time.perf_counter()
    benchmark.pedantic(lambda: (step(), _sync()), rounds=ROUNDS, iterations=1, warmup_rounds=0)
    tps = TOKENS / benchmark.stats.stats.mean
    RESULTS[name] = tps
    info = {"tokens_per_s": round(tps, 1), "tokens_per_step": TOKENS, "wall_s": round(time.perf_counter() - t0, 2),
            "tflops": round(CFG.flops_per_token() * tps / 1e12, 3)}
    if "transformers" in RESULTS and name != "transformers":
        info["speedup_vs_transformers"] = round(tps / RESULTS["transformers"], 2)
    record(benchmark, **info)


def test_train_step_transformers(benchmark, batch, weights):
    from gpt.hf import to_transformers

    ours = GPT2Model(CFG, impl="torch").to(DEVICE)
    ours.load_state_dict(weights)
    hf = to_transformers(ours.cpu()).to(DEVICE)
    hf.config._attn_implementation = "eager"
    hf.train()
    x, y = batch
    with torch.no_grad():
        ref = ours.to(DEVICE)(x, y).loss
        got = hf(input_ids=x, labels=x).loss  # transformers shifts the labels itself
    assert torch.allclose(got, ref, rtol=1e-4), (got.item(), ref.item())
    del ours
    opt = torch.optim.AdamW(hf.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0.01)

    def step():
        loss = hf(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    _run(benchmark, "transformers", step)


def test_train_step_seed_recipe(benchmark, batch):
    torch.manual_seed(0)
    model = SeedGPT().to(DEVICE)
    opt = seed_optimizer(model)
    x, y = batch
    y = torch.where(y < 0, torch.full_like(y, SEED_IGNORE_INDEX), y)
    with torch.no_grad():
        model.eval()
        first = seed_loss(model)(x, y).loss.item()
        model.train()
    assert math.isfinite(first) and first > math.log(CFG.vocab_size) - 3  # an untrained model: near uniform or worse

    def step():
        train_step(seed_loss(model), opt, [(x, y)], device=DEVICE, dtype="fp32", grad_clip=1.0)

    _run(benchmark, "seed_recipe", step)


VARIANTS = [
    pytest.param("torch", False, DTYPE, "fused", id="ours_torch"),
    pytest.param("torch", False, DTYPE, "unfused", id="ours_torch_unfused"),
    # On a CPU with native bf16 (AVX512-BF16/AMX) autocast pays at this size; train.py --dtype bf16.
    pytest.param("torch", False, "bf16", "fused", id="ours_torch_bf16",
                 marks=pytest.mark.skipif(CUDA, reason="the CUDA default is already bf16")),
    pytest.param("torch", False, "bf16", "unfused", id="ours_torch_bf16_unfused",
                 marks=pytest.mark.skipif(CUDA, reason="the CUDA default is already bf16")),
    pytest.param("triton", False, DTYPE, "fused", id="ours_triton", marks=pytest.mark.skipif(not CUDA, reason="Triton kernels at speed need a CUDA GPU")),
    pytest.param("triton", False, DTYPE, "unfused", id="ours_triton_unfused", marks=pytest.mark.skipif(not CUDA, reason="Triton kernels at speed need a CUDA GPU")),
    pytest.param("triton", True, DTYPE, "fused", id="ours_triton_compile", marks=pytest.mark.skipif(not CUDA, reason="torch.compile timing needs a CUDA GPU")),
    # The best plain-PyTorch model (SDPA, F.layer_norm, the chunked head) compiled: the GPU goal's peer.
    pytest.param("torch", True, DTYPE, "fused", id="ours_torch_compile", marks=pytest.mark.skipif(not CUDA, reason="torch.compile timing needs a CUDA GPU")),
    # ... and with the textbook head, which inductor fuses itself (the faster peer may be either).
    pytest.param("torch", True, DTYPE, "unfused", id="ours_torch_compile_unfused", marks=pytest.mark.skipif(not CUDA, reason="torch.compile timing needs a CUDA GPU")),
]


@pytest.mark.parametrize("impl,compile_,dtype,head", VARIANTS)
def test_train_step_ours(benchmark, batch, weights, impl, compile_, dtype, head):
    model = GPT2Model(CFG, impl=impl).to(DEVICE)
    model.load_state_dict(weights)
    if head == "unfused":
        model.impl = select_ops(impl, DEVICE)._replace(linear_cross_entropy=linear_cross_entropy_unfused)
    x, y = batch
    with torch.no_grad():
        ref_model = GPT2Model(CFG, impl="torch").to(DEVICE)
        ref_model.load_state_dict(weights)
        ref = ref_model(x, y).loss  # fp32 reference
        with autocast(DEVICE, dtype):
            got = model(x, y).loss
        del ref_model
    assert torch.allclose(got, ref, rtol=2e-2 if dtype == "bf16" else 1e-5)
    tc = TrainConfig()
    opt = build_optimizer(model, tc, DEVICE)
    fwd = torch.compile(model) if compile_ else model

    def step():
        train_step(fwd, opt, [(x, y)], device=DEVICE, dtype=dtype, grad_clip=tc.grad_clip)

    _run(benchmark, f"ours_{impl}_{dtype}" + ("_compile" if compile_ else "") + ("_unfused" if head == "unfused" else ""),
         step)


@pytest.mark.skipif(not CUDA, reason="a CUDA graph needs a GPU")
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_train_step_cuda_graph(benchmark, batch, weights, impl):
    """train.py --cuda-graph's step (gpt.graphstep): the same step captured once and replayed, so
    the host's launch work (hundreds of kernels a step) is gone; timed after the warm-up and capture."""
    from gpt.graphstep import WARMUP_STEPS, GraphedTrainStep

    model = GPT2Model(CFG, impl=impl).to(DEVICE)
    model.load_state_dict(weights)
    tc = TrainConfig()
    opt = build_optimizer(model, tc, DEVICE)
    graphed = GraphedTrainStep(model, opt, device=DEVICE, dtype=DTYPE, grad_clip=tc.grad_clip)
    x, y = batch
    for _ in range(WARMUP_STEPS):
        graphed([(x, y)], tc.lr)
    assert not graphed.captured
    _run(benchmark, f"ours_{impl}_{DTYPE}_cuda_graph", lambda: graphed([(x, y)], tc.lr))  # its warm-up captures
    assert graphed.captured and graphed.eager_steps == WARMUP_STEPS


EVAL_BATCHES = 32 if CUDA else 2  # of B x T; 4 of train.py's default 256 x T on CUDA


@pytest.mark.parametrize("graphed,default_batch", [(False, False), pytest.param(True, False, marks=pytest.mark.skipif(
    not CUDA, reason="a CUDA graph needs a GPU")), pytest.param(True, True, marks=pytest.mark.skipif(
        not CUDA, reason="a CUDA graph needs a GPU"))], ids=["eager", "cuda_graph", "cuda_graph_default_batch"])
def test_eval_forward(benchmark, weights, graphed, default_batch):
    """A validation pass as train.py runs it (``gpt.step.evaluate``: eval mode, no gradients, the
    fused head's loss and accuracy) over EVAL_BATCHES batches of B x T, impl triton on CUDA: eager
    forwards against ``gpt.graphstep.GraphedEval``'s replays (train.py's default on CUDA), timed
    after the warm-up pass that captures, and the replays at train.py's default validation batch
    on CUDA (``gpt.step.default_eval_batch``: 256 x T, 65,536 tokens a forward) over the same
    tokens. Each pass's scores are checked against eager's first."""
    from gpt.graphstep import GraphedEval
    from gpt.step import default_eval_batch, evaluate

    batch = default_eval_batch(B, T, DEVICE) if default_batch else B
    model = GPT2Model(CFG, impl="triton" if CUDA else "torch").to(DEVICE)
    model.load_state_dict(weights)
    tokens = torch.randint(0, CFG.vocab_size, (EVAL_BATCHES * TOKENS + 1,),
                           generator=torch.Generator().manual_seed(2)).numpy()
    forward = GraphedEval(model, device=DEVICE, dtype=DTYPE, batch_size=batch) if graphed else None
    got = scores = evaluate(model, tokens, T, B, DEVICE, DTYPE)  # eager: the reference, and a warm-up
    for _ in range(2 if graphed else 0):  # the first pass warms up and captures; the second replays every batch
        got = evaluate(model, tokens, T, batch, DEVICE, DTYPE, forward=forward)
    assert got["tokens"] == scores["tokens"] == EVAL_BATCHES * TOKENS
    assert got["loss"] == pytest.approx(scores["loss"], rel=1e-3)
    benchmark.pedantic(lambda: evaluate(model, tokens, T, batch, DEVICE, DTYPE, forward=forward),
                       rounds=ROUNDS, iterations=1, warmup_rounds=0)
    tps = EVAL_BATCHES * TOKENS / benchmark.stats.stats.mean
    name = "eval_cuda_graph_default_batch" if default_batch else "eval_cuda_graph" if graphed else "eval_eager"
    RESULTS[name] = tps
    info = {"tokens_per_s": round(tps, 1), "tokens_per_pass": EVAL_BATCHES * TOKENS, "batch": f"{batch} x {T}",
            "tflops": round(2 * (CFG.num_params() - T * CFG.d_model) * tps / 1e12, 3)}  # forward: 2N a token
    if graphed and "eval_eager" in RESULTS:
        info["speedup_vs_eager"] = round(tps / RESULTS["eval_eager"], 2)
    if default_batch and "eval_cuda_graph" in RESULTS:
        info[f"speedup_vs_batch_{B}"] = round(tps / RESULTS["eval_cuda_graph"], 2)
    record(benchmark, **info)


def _sdpa_in_half(q, k, v, scale=None, kv_start=None, kv_len=None, dropout_p: float = 0.0):
    """The torch table's training attention before CPU calls in half precision ran in fp32: SDPA in
    the inputs' (autocast's) dtype. Causal squares only (what a training step calls)."""
    assert kv_start is None and kv_len is None and dropout_p == 0.0
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


@pytest.mark.skipif(CUDA, reason="the CPU's attention in training (gpt.ops._cpu_training_upcast)")
@pytest.mark.parametrize("what", ["attention", "tiny_step"])
def test_cpu_attention_training(benchmark, what):
    """bf16 training on a CPU, the ``tiny`` preset's attention shape (16, 4, 128, 32): the torch
    table's attention, which runs such calls on fp32 copies, against SDPA in bf16 (its kernel's
    backward is the slow one there) -- the attention's forward + backward alone, and the ``tiny``
    preset's whole optimizer step (train.py's CPU recipe, bf16 autocast, 16 x 128 tokens)."""
    from gpt import get_preset
    from gpt.ops import TORCH_OPS

    g = torch.Generator().manual_seed(0)
    if what == "attention":
        base = torch.randn(16, 128, 3, 4, 32, generator=g, dtype=torch.bfloat16).requires_grad_()
        q, k, v = (t.transpose(1, 2) for t in base.unbind(2))  # (B, nh, T, hs) strided views, the model's
        dout = torch.randn(16, 4, 128, 32, generator=g, dtype=torch.bfloat16)

        def run(attention):
            return lambda: torch.autograd.grad(attention(q, k, v), base, dout)

        ours, peer = run(TORCH_OPS.attention), run(_sdpa_in_half)
        tokens, rounds = 16 * 128, 5
    else:
        preset = get_preset("tiny")
        cfg, tc = preset.model, preset.train
        x = torch.randint(0, cfg.vocab_size, (tc.batch_size, cfg.max_seq_length), generator=g)
        y = torch.randint(0, cfg.vocab_size, x.shape, generator=g)
        torch.manual_seed(0)
        models = [GPT2Model(cfg, impl="torch") for _ in range(2)]
        models[1].load_state_dict(models[0].state_dict())
        models[1].impl = TORCH_OPS._replace(attention=_sdpa_in_half)
        opts = [build_optimizer(m, tc, DEVICE) for m in models]
        with torch.no_grad(), autocast(DEVICE, "bf16"):
            losses = [m(x, y).loss for m in models]
        assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-3)

        def run(i):
            return lambda: train_step(models[i], opts[i], [(x, y)], device=DEVICE, dtype="bf16", grad_clip=tc.grad_clip)

        ours, peer = run(0), run(1)
        tokens, rounds = x.numel(), 6
    ours(), peer()  # warm-up
    ours_s, peer_s = best_seconds(ours, peer, rounds=rounds)
    benchmark.pedantic(ours, rounds=1, iterations=1, warmup_rounds=0)
    ours_s = min(ours_s, benchmark.stats.stats.min)
    record(benchmark, tokens_per_s=round(tokens / ours_s, 1), half_sdpa_tokens_per_s=round(tokens / peer_s, 1),
           ratio_vs_half_sdpa=round(peer_s / ours_s, 2), threads=torch.get_num_threads())


@pytest.mark.skipif(not CUDA, reason="MFU is a GPU figure")
@pytest.mark.parametrize("big_batch", [128, 512, 2048])
def test_train_step_mfu(benchmark, weights, big_batch):
    """MFU of impl triton (bf16, fused head) at batches past the goal's 32: the step's model FLOPs
    (``GPTConfig.flops_per_token``) per second over the device's data-sheet bf16 peak. A batch that
    does not fit is skipped, so the largest reported is the largest that fits among these."""
    from gpt.hardware import peak_flops

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = GPT2Model(CFG, impl="triton").to(DEVICE)
    model.load_state_dict(weights)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, CFG.vocab_size, (big_batch, T), generator=g).to(DEVICE)
    y = torch.cat([x[:, 1:], torch.full((big_batch, 1), -1, device=DEVICE)], dim=1)
    opt = build_optimizer(model, TrainConfig(), DEVICE)

    def step():
        train_step(model, opt, [(x, y)], device=DEVICE, dtype=DTYPE, grad_clip=1.0)

    try:
        step()
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        pytest.skip(f"batch {big_batch} x {T} does not fit")
    benchmark.pedantic(lambda: (step(), _sync()), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    tps = big_batch * T / benchmark.stats.stats.mean
    kernels = kernel_times_ms(step, warmup=0, iters=2)  # where a step's GPU time goes
    flops = CFG.flops_per_token() * tps
    peak = peak_flops(DEVICE)
    record(benchmark, tokens_per_s=round(tps, 1), tokens_per_step=big_batch * T, tflops=round(flops / 1e12, 1),
           mfu=round(flops / peak, 3) if peak else None,
           peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
           kernel_ms=round(sum(kernels.values()), 2), kernel_groups_ms=kernel_groups_ms(kernels),
           top_kernels=top_kernels(kernels, 40))  # run 3 kept 12: 83 ms of the 397 at batch 2,048 went unnamed
