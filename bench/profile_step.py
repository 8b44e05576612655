"""Where one seed-sized training step spends its time: torch.profiler's top ops by self CPU time.

The step of ``bench/test_bench_train.py`` (seed model, 8 x 256 tokens, impl torch, fused AdamW,
clipping), one warm-up step, then one profiled step.

    python -m bench.profile_step --dtype bf16 --threads 1 [--head unfused] [--top 10]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from gpt import GPT2Model, GPTConfig, TrainConfig
from gpt.ops import TORCH_OPS, linear_cross_entropy_unfused
from gpt.step import build_optimizer, train_step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--head", default="fused", choices=("fused", "unfused"))
    p.add_argument("--top", type=int, default=10)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = GPTConfig(dropout=0.0)
    torch.manual_seed(0)
    model = GPT2Model(config, impl="torch")
    if args.head == "unfused":
        model.impl = TORCH_OPS._replace(name="torch-unfused", linear_cross_entropy=linear_cross_entropy_unfused)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (8, 256), generator=g)
    y = torch.cat([x[:, 1:], torch.full((8, 1), -1)], dim=1)
    cpu = torch.device("cpu")
    tc = TrainConfig()
    opt = build_optimizer(model, tc, cpu)

    def step():
        train_step(model, opt, [(x, y)], device=cpu, dtype=args.dtype, grad_clip=tc.grad_clip)

    step()
    t0 = time.perf_counter()
    step()
    print(f"one step: {time.perf_counter() - t0:.2f} s wall ({torch.get_num_threads()} threads, {args.dtype}, "
          f"{args.head} head)")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=48))
    return 0


if __name__ == "__main__":
    sys.exit(main())
