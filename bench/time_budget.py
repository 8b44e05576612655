"""Test perplexity after a fixed wall-clock training budget: our `tiny` recipe vs the seed's recipe.

    python bench/time_budget.py --minutes 5 [--data FILE] [--tokenizer DIR] [--json OUT]

Both train on the same data (the shared TinyStories sample by default, split 70/20/10 by story) for
the same wall-clock time on the same device, then are scored the same way: loss over every real token
of the test split (packed stories, each token once, context 128 windows, padding ignored), reported as
perplexity and next-token accuracy. Ours: the `tiny` preset through gpt.train's optimizer, schedule and
step. Seed: the seed's model and recipe (bench/seed_recipe.py), at the seed's size unless
--seed-size tiny. Each cosine schedule spans the steps the budget allows, estimated from the first
steps' speed. Evaluation time is not part of the budget.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.seed_recipe import SeedBatches, SeedGPT, SeedRecipe, seed_loss, seed_lr, seed_optimizer  # noqa: E402
from gpt.config import get_preset  # noqa: E402
from gpt.data import DEFAULT_CACHE_DIR, TrainBatches, prepare_data, story_rows  # noqa: E402
from gpt.model import GPT2Model  # noqa: E402
from gpt.tokenizer import get_tokenizer  # noqa: E402
from gpt.hardware import default_dtype  # noqa: E402
from gpt.step import build_optimizer, evaluate, lr_at, train_step  # noqa: E402

CALIBRATION_STEPS = 3


def train_for(budget_s: float, step_fn) -> dict:
    """Call step_fn(step, total_steps) until the budget is spent; total_steps from the first steps' pace."""
    t0 = time.perf_counter()
    step, total = 0, None
    while True:
        loss = step_fn(step, total or 10**9)
        step += 1
        elapsed = time.perf_counter() - t0
        if step == CALIBRATION_STEPS:
            loss.item()  # make the pace honest on an asynchronous device
            total = max(step + 1, int(budget_s / ((time.perf_counter() - t0) / step)))
        if elapsed >= budget_s or (total is not None and step >= total):
            return {"steps": step, "train_seconds": time.perf_counter() - t0, "last_loss": float(loss)}


def run_ours(splits, budget_s, device, dtype, seed) -> tuple[torch.nn.Module, dict]:
    preset = get_preset("tiny")
    cfg, tc = preset.model, preset.train
    torch.manual_seed(seed)
    model = GPT2Model(cfg, impl="torch").to(device)
    opt = build_optimizer(model, tc, device)
    batches = TrainBatches(splits.train, tc.batch_size, cfg.max_seq_length, seed=seed)

    def step(i, total):
        micro = [tuple(t.to(device) for t in batches.next()) for _ in range(tc.grad_accum)]
        loss_sum, _, count = train_step(model, opt, micro, device=device, dtype=dtype, grad_clip=tc.grad_clip,
                                        lr=lr_at(i, tc, total))
        return loss_sum / count

    stats = train_for(budget_s, step)
    stats["tokens"] = stats["steps"] * tc.batch_size * tc.grad_accum * cfg.max_seq_length
    stats["params"] = model.num_params()
    return model, stats


def run_seed(splits, eos_id, budget_s, device, size, seed) -> tuple[torch.nn.Module, dict]:
    recipe = SeedRecipe()
    dims = {} if size == "seed" else {"d_model": 128, "num_heads": 4, "num_layers": 4, "d_ff": 512}
    torch.manual_seed(seed)
    model = SeedGPT(**dims).to(device)
    opt = seed_optimizer(model, recipe)
    rows = story_rows(splits.train, eos_id, recipe.seq_len)
    batches = SeedBatches(rows, recipe.batch_size, seed=seed)

    def step(i, total):
        micro = [tuple(t.to(device) for t in batches.next()) for _ in range(recipe.grad_accum)]
        loss_sum, _, count = train_step(seed_loss(model), opt, micro, device=device, dtype="fp32",
                                        grad_clip=recipe.grad_clip, lr=seed_lr(i, total, recipe))
        return loss_sum / count

    stats = train_for(budget_s, step)
    stats["tokens"] = stats["steps"] * recipe.batch_size * recipe.grad_accum * (recipe.seq_len - 1)
    stats["params"] = sum(p.numel() for p in model.parameters())
    return model, stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="training budget per recipe")
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/tinystories/tinystories-sample.jsonl"))
    p.add_argument("--tokenizer", default=str(ROOT.parent / "shared/data/gpt2-tokenizer"))
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed-size", choices=("seed", "tiny"), default="seed", help="size of the seed recipe's model")
    p.add_argument("--only", choices=("ours", "seed"), default=None, help="run one side only")
    p.add_argument("--eval-tokens", type=int, default=0, help="cap on scored test tokens (0 = the whole split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = default_dtype(device)
    tok = get_tokenizer(args.tokenizer)
    splits = prepare_data(args.data, tok, cache_dir=args.cache_dir, num_stories=0, progress=False)
    context = get_preset("tiny").model.max_seq_length
    budget = 60 * args.minutes
    results = {"minutes": args.minutes, "device": str(device), "test_tokens_total": len(splits.test) - 1}
    sides = [s for s in ("ours", "seed") if args.only in (None, s)]
    for side in sides:
        if side == "ours":
            model, stats = run_ours(splits, budget, device, dtype, args.seed)
        else:
            model, stats = run_seed(splits, tok.eos_id, budget, device, args.seed_size, args.seed)
        t = time.perf_counter()
        m = evaluate(model, splits.test, context, 16, device, dtype if side == "ours" else "fp32",
                     max_tokens=args.eval_tokens)
        stats.update(test_loss=m["loss"], test_perplexity=m["perplexity"], test_accuracy=m["accuracy"],
                     test_tokens=m["tokens"], eval_seconds=time.perf_counter() - t)
        results[side] = stats
        print(f"{side:>4}: {stats['steps']} steps, {stats['tokens']:,} tokens in {stats['train_seconds']:.0f} s "
              f"({stats['params'] / 1e6:.1f}M params) -> test perplexity {m['perplexity']:.2f}, "
              f"accuracy {100 * m['accuracy']:.1f}% over {m['tokens']:,} tokens", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if len(sides) == 2:
        print(f"perplexity ratio seed / ours: {results['seed']['test_perplexity'] / results['ours']['test_perplexity']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
