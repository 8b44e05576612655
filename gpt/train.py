"""The training command line: ``python train.py`` (or ``python -m gpt.train``); ``--help`` lists every flag.

Every ``GPTConfig``/``TrainConfig`` field is a flag (``--d-model``, ``--warmup-steps``...) overriding
the chosen preset. Outputs in ``--out-dir``: ``gpt2_best_model.pt`` (best validation loss),
``last.pt`` (for ``--resume``), ``training_history.json`` and ``training_curves_with_accuracy.png``.
The training itself is ``gpt.trainer``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import fields, replace
from pathlib import Path

import torch.distributed as dist

from .checkpoint import load_checkpoint
from .config import PRESETS, GPTConfig, TrainConfig, get_preset
from .data import DEFAULT_CACHE_DIR
from .errors import UserError
from .hardware import CPU_DEFAULT_DTYPE, DTYPES
from .ops import IMPLS, resolve_impl
from .trainer import LAST_NAME, RunOptions, TrainError, Trainer


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a GPT-2 on TinyStories. Preset values can be overridden by any flag below.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run = p.add_argument_group("run")
    run.add_argument("--preset", default="seed", choices=sorted(PRESETS), help="model + recipe preset ('tiny' for a CPU)")
    run.add_argument("--data", default=None, help="TinyStories .txt/.jsonl/.parquet file or directory (default: the HF hub)")
    run.add_argument("--tokenizer", default=None, help="GPT-2 tokenizer directory (vocab.json, merges.txt)")
    run.add_argument("--out-dir", default="out")
    run.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where tokenized splits are cached")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    run.add_argument("--impl", default="auto", choices=IMPLS, help="hot-op implementation (auto: triton on CUDA)")
    run.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                     help=f"autocast dtype (default: bf16 on CUDA, {CPU_DEFAULT_DTYPE} on CPU)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--resume", action="store_true", help=f"continue from OUT_DIR/{LAST_NAME}")
    run.add_argument("--seed", type=int, default=1337)
    run.add_argument("--log-interval", type=int, default=10, help="steps between metric reads (host syncs)")
    run.add_argument("--sample-length", type=int, default=100, help="tokens per generated sample at the end")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    # Every dataclass field is a flag; None means "the preset's value".
    for title, cls in (("model (GPTConfig)", GPTConfig), ("training (TrainConfig)", TrainConfig)):
        group = p.add_argument_group(title)
        for f in fields(cls):
            group.add_argument(_flag(f.name), type=type(f.default), default=None, dest=f.name,
                               help=f"preset value if omitted (seed: {f.default})")
    return p


def _overrides(ns: argparse.Namespace, cls) -> dict:
    return {f.name: getattr(ns, f.name) for f in fields(cls) if getattr(ns, f.name) is not None}


def validate_train_config(tc: TrainConfig, world_size: int = 1) -> None:
    checks = [
        (tc.batch_size >= 1, f"--batch-size must be >= 1, got {tc.batch_size}"),
        (tc.grad_accum >= 1, f"--grad-accum must be >= 1, got {tc.grad_accum}"),
        (tc.lr > 0, f"--lr must be > 0, got {tc.lr}"),
        (0 <= tc.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {tc.min_lr_ratio}"),
        (tc.weight_decay >= 0, f"--weight-decay must be >= 0, got {tc.weight_decay}"),
        (0 <= tc.beta1 < 1 and 0 <= tc.beta2 < 1, f"betas must be in [0, 1), got ({tc.beta1}, {tc.beta2})"),
        (tc.grad_clip >= 0, f"--grad-clip must be >= 0 (0 = off), got {tc.grad_clip}"),
        (tc.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {tc.warmup_steps}"),
        (tc.max_steps >= 0, f"--max-steps must be >= 0, got {tc.max_steps}"),
        (tc.max_steps > 0 or tc.epochs > 0, "need --max-steps > 0 or --epochs > 0"),
        (tc.eval_interval >= 0, f"--eval-interval must be >= 0, got {tc.eval_interval}"),
        (tc.eval_tokens >= 0, f"--eval-tokens must be >= 0, got {tc.eval_tokens}"),
        (tc.patience >= 0, f"--patience must be >= 0 (0 = never stop early), got {tc.patience}"),
        (tc.num_stories >= 0, f"--num-stories must be >= 0, got {tc.num_stories}"),
        (tc.grad_accum % world_size == 0,
         f"--grad-accum ({tc.grad_accum}) must be divisible by the number of processes ({world_size})"),
    ]
    for ok, msg in checks:
        if not ok:
            raise TrainError(msg)


def _configs(ns: argparse.Namespace, resume_ckpt: dict | None) -> tuple[GPTConfig, TrainConfig]:
    preset = get_preset(ns.preset)
    model_over, train_over = _overrides(ns, GPTConfig), _overrides(ns, TrainConfig)
    try:
        if resume_ckpt is None:
            return replace(preset.model, **model_over), replace(preset.train, **train_over)
        cfg = GPTConfig.from_dict(resume_ckpt["config"])
        for k, v in model_over.items():
            if getattr(cfg, k) != v:
                raise TrainError(f"--{k.replace('_', '-')} {v} differs from the checkpoint's {getattr(cfg, k)}; "
                                 "a resumed run keeps its model")
        return cfg, replace(TrainConfig(**resume_ckpt["train_config"]), **train_over)
    except (ValueError, TypeError, KeyError) as e:
        raise TrainError(str(e)) from None


def run(ns: argparse.Namespace) -> int:
    opts = RunOptions(**{f.name: getattr(ns, f.name) for f in fields(RunOptions)})
    if opts.log_interval < 1:
        raise TrainError(f"--log-interval must be >= 1, got {opts.log_interval}")
    if opts.sample_length < 1:
        raise TrainError(f"--sample-length must be >= 1, got {opts.sample_length}")
    resume_ckpt = None
    if opts.resume:
        last = Path(opts.out_dir) / LAST_NAME
        if not last.exists():
            raise TrainError(f"--resume: no checkpoint at {last}; start a run without --resume first")
        resume_ckpt = load_checkpoint(last)
        if "optimizer" not in resume_ckpt or "step" not in resume_ckpt:
            raise TrainError(f"--resume: {last} is a model-only checkpoint, not a resumable one")
    model_cfg, tc = _configs(ns, resume_ckpt)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate_train_config(tc, world)
    if resume_ckpt is not None and resume_ckpt.get("world_size", 1) != world:
        raise TrainError(f"--resume: the checkpoint was written by {resume_ckpt.get('world_size')} processes, "
                         f"this run has {world}")
    trainer = Trainer(opts, model_cfg, tc)
    trainer.setup(resume_ckpt)
    previous = signal.signal(signal.SIGINT, trainer._request_stop)  # from here on Ctrl-C stops at a step boundary
    try:
        if trainer.master:
            trainer.out.mkdir(parents=True, exist_ok=True)
            n = trainer.raw.num_params()
            print(f"model: {n / 1e6:.2f}M parameters ({model_cfg.num_layers} layers, d_model {model_cfg.d_model}, "
                  f"context {model_cfg.max_seq_length}) | impl {resolve_impl(opts.impl, trainer.device)} | "
                  f"{trainer.device} {trainer.dtype} | {world} process(es)")
            print(f"tokens per optimizer step: {tc.batch_size} seqs x {model_cfg.max_seq_length} tokens x "
                  f"{tc.grad_accum} accumulation = {trainer.tokens_per_step:,} | {trainer.max_steps} steps "
                  f"| train split {len(trainer.splits.train):,} tokens"
                  + (f" | resuming at step {trainer.state.step}" if resume_ckpt is not None else ""))
        reason = trainer.train()
    finally:
        signal.signal(signal.SIGINT, previous)
    if reason == "interrupted":
        if trainer.master:
            print(f"interrupted at step {trainer.state.step}: saved {trainer.out / LAST_NAME}; continue with --resume",
                  file=sys.stderr)
        return 130
    result = trainer.finish()
    if trainer.master:
        print(f"test perplexity {result['final_perplexity']:.2f} | test accuracy {100 * result['test_accuracy']:.1f}% "
              f"| {result['tokens_per_sec']:,.0f} tokens/s | outputs in {trainer.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return run(ns)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
