"""The training loop as train.py runs it: ``gpt.trainer.Trainer`` for a few steps of the seed preset,
against the isolated ``train_step`` on the same model and a plain transformers loop, in the same run.

* ``test_loop_transformers``: ``GPT2LMHeadModel`` holding the same initial weights (its default
  attention, the seed preset's dropout 0.1 on embeddings and residuals), AdamW with the seed
  recipe, clipping at 1.0, batches drawn from the same packed train split: the loop anyone would write.
* ``test_loop_trainer``: ``Trainer.setup()`` + ``Trainer.train()`` on the shared TinyStories sample,
  the seed preset at batch 8 x 256 (accumulation 1), and its own steady-state tokens/s (every step but
  the first, the final evaluation excluded) -- the figure ``training_history.json`` reports. The
  isolated ``train_step`` on the trainer's own model, optimizer and batch shape is timed just before
  and just after; ``ratio_vs_isolated_step`` is what the loop keeps of the step's speed (goal: >= 0.95).
  ``loop_overhead_pct``: the share of the trainer's training time spent outside ``train_step``
  (batch drawing, schedule, logging, bookkeeping), measured within the same seconds, so a busy
  machine does not blur it the way it blurs the ratio of two separate timings.

Both time the steps after a warm-up step. CPU: 3 timed steps (the lead's re-measurement may raise
STEPS); CUDA: 30, at the device's default dtype (bf16 autocast) and impl (Triton).
FLOPs per token: ``GPTConfig.flops_per_token()`` (6N + 12 L d T), 0.29 GFLOP for the seed model.
"""

import time
from dataclasses import replace

import pytest
import torch

import gpt.trainer as trainer_mod
from bench.common import record
from gpt import GPT2Model
from gpt.config import get_preset
from gpt.data import TrainBatches, prepare_data
from gpt.hardware import autocast
from gpt.tokenizer import get_tokenizer
from gpt.step import train_step
from gpt.trainer import RunOptions, Trainer

pytestmark = pytest.mark.benchmark(group="loop")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = "bf16" if CUDA else "fp32"  # on a CPU fp32, as the transformers loop beside it
PRESET = get_preset("seed")
CFG = PRESET.model  # the seed's sizes and dropout 0.1, as train.py --preset seed
B, T = 8, CFG.max_seq_length
TOKENS = B * T
STEPS = 30 if CUDA else 3
RESULTS: dict[str, float] = {}  # tokens/s by variant, for ratios within this run


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _tokens_per_s(step, n=STEPS) -> float:
    _sync()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    _sync()
    return n * TOKENS / (time.perf_counter() - t0)


@pytest.fixture(scope="module")
def sample(stories_dir, tokenizer_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("loop_cache")
    path = stories_dir / "tinystories-sample.jsonl"
    splits = prepare_data(str(path), get_tokenizer(str(tokenizer_dir)), cache_dir=cache, num_stories=0, progress=False)
    return {"data": str(path), "tokenizer": str(tokenizer_dir), "cache": str(cache), "splits": splits}


def test_loop_transformers(benchmark, sample):
    from gpt.hf import to_transformers

    torch.manual_seed(0)
    hf = to_transformers(GPT2Model(CFG, impl="torch")).to(DEVICE).train()
    tc = PRESET.train
    opt = torch.optim.AdamW(hf.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay)
    batches = TrainBatches(sample["splits"].train, B, T, seed=0)

    def step():
        x, _ = batches.next()
        x = x.to(DEVICE)
        with autocast(DEVICE, DTYPE):
            loss = hf(input_ids=x, labels=x).loss  # transformers shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    tps = benchmark.pedantic(_tokens_per_s, args=(step,), rounds=1, iterations=1)
    RESULTS["transformers"] = tps
    record(benchmark, tokens_per_s=round(tps, 1), steps=STEPS, tokens_per_step=TOKENS,
           attn_implementation=hf.config._attn_implementation,
           tflops=round(CFG.flops_per_token() * tps / 1e12, 3))


def test_loop_trainer(benchmark, sample, tmp_path, monkeypatch):
    opts = RunOptions(preset="seed", data=sample["data"], tokenizer=sample["tokenizer"], cache_dir=sample["cache"],
                      out_dir=str(tmp_path / "out"), device=str(DEVICE), impl="auto", dtype=DTYPE, progress=False,
                      cuda_graph=False)  # eager steps, as the isolated step; the graphed loop: gpu.sh's train part
    tc = replace(PRESET.train, batch_size=B, grad_accum=1, max_steps=1 + STEPS, eval_interval=0, eval_tokens=TOKENS)
    trainer = Trainer(opts, CFG, tc)
    trainer.setup(None)
    x, y = trainer.batches.next()
    x, y = x.to(DEVICE), y.to(DEVICE)

    def isolated():
        train_step(trainer.model, trainer.optimizer, [(x, y)], device=DEVICE, dtype=DTYPE, grad_clip=tc.grad_clip,
                   lr=tc.lr)

    isolated()  # warm-up
    before = _tokens_per_s(isolated)
    # What the loop adds, measured inside the same seconds (robust to a busy machine): the trainer's
    # training time minus the time spent inside train_step. CPU only: on CUDA the step is asynchronous,
    # and timing it would need the per-step sync the loop avoids.
    in_step = []
    real_step = trainer_mod.train_step

    def timed_step(*args, **kwargs):
        t0 = time.perf_counter()
        out = real_step(*args, **kwargs)
        in_step.append(time.perf_counter() - t0)
        return out

    if not CUDA:
        monkeypatch.setattr(trainer_mod, "train_step", timed_step)
    benchmark.pedantic(trainer.train, rounds=1, iterations=1)
    monkeypatch.undo()
    after = _tokens_per_s(isolated)
    tps = trainer.steady_tokens_per_sec()
    iso = (before + after) / 2
    RESULTS["trainer"] = tps
    info = {"tokens_per_s": round(tps, 1), "isolated_step_tokens_per_s": round(iso, 1),
            "isolated_before_after": [round(before, 1), round(after, 1)],
            "ratio_vs_isolated_step": round(tps / iso, 3), "steps": STEPS, "tokens_per_step": TOKENS,
            "first_step_s": round(trainer.first_step_seconds, 2), "setup_s": round(trainer.setup_seconds, 2),
            "tflops": round(CFG.flops_per_token() * tps / 1e12, 3)}
    if in_step:
        overhead = trainer.train_time - sum(in_step)
        info.update(loop_overhead_ms_per_step=round(1e3 * overhead / len(in_step), 2),
                    loop_overhead_pct=round(100 * overhead / trainer.train_time, 3))
    if "transformers" in RESULTS:
        info["speedup_vs_transformers"] = round(tps / RESULTS["transformers"], 2)
    record(benchmark, **info)
