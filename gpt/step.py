"""One optimizer step and one evaluation: the building blocks that the loop (``gpt.trainer``), the
CUDA-graphed step (``gpt.graphstep``), the benchmarks and ``bench/time_budget.py`` all call.

* ``build_optimizer`` and ``lr_at``: the optimizer and the schedule of a ``TrainConfig``.
* ``merge_micro_batches``: a step's micro-batches as fewer, larger forwards (same loss, same step).
* ``train_step``: forward, backward, clipping and the update over a step's micro-batches
  (``accumulate_gradients``, then ``apply_gradients``). It never waits on the device: loss, correct
  and counted targets come back in a device tensor that the caller reads when it chooses (the
  loop: every ``--log-interval`` steps).
* ``score`` / ``evaluate``: loss, perplexity and accuracy over every real token once
  (``TEST_PROTOCOL``), in forwards of ``default_eval_batch`` windows unless asked otherwise;
  ``evaluate_seed_protocol`` scores a model the way the seed did (stories padded to 256 with EOS,
  padding counted; ``SEED_PROTOCOL``), for comparison with its figures.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .config import TrainConfig
from .data import SEED_IGNORE_INDEX, SEED_ROW_TOKENS, eval_batches, story_rows
from .hardware import autocast
from .tokenizer import EOS_ID

TEST_PROTOCOL = "every real token of the test split once: stories packed with one EOS between them, no padding"
SEED_PROTOCOL = (f"the seed's: every test story on its own row, truncated or padded with EOS to {SEED_ROW_TOKENS} "
                 f"tokens, padding counted as targets, target id {SEED_IGNORE_INDEX} ('!') ignored; "
                 "text not stripped of quotes as the seed's was")


# On CUDA a validation or test forward takes at least this many tokens by default. Forward-only
# passes keep no activations, so a large one costs little memory (the seed model at 65,536 tokens:
# ~1 GiB of transient activations and the head's 512 MiB chunk), and a GPU runs larger GEMMs nearer
# its peak: on an H200 (run 3) the seed model's captured training step went from 930,383 tokens/s
# at 8,192 tokens a step to 958,288 at 32,768 and 1,263,214 at 131,072.
EVAL_FORWARD_TOKENS = 65536


def default_eval_batch(sequences: int, context: int, device: torch.device, max_tokens: int = 0) -> int:
    """Windows per validation / test forward when none is asked for: ``sequences`` (a step's, in
    train.py), and on CUDA at least ``EVAL_FORWARD_TOKENS`` tokens' worth of ``context`` windows --
    but no more than a pass capped at ``max_tokens`` (> 0) needs, as a graphed pass pads its batches
    to one shape. The scores do not depend on it."""
    if torch.device(device).type != "cuda":
        return sequences
    wanted = -(-EVAL_FORWARD_TOKENS // context)
    if max_tokens > 0:
        wanted = min(wanted, -(-max_tokens // context))
    return max(sequences, wanted)


class StopTraining(Exception):
    """Ctrl-C arrived: the loop stops at the next step boundary and writes a resumable checkpoint
    (``score`` raises it when its ``should_stop`` says so)."""


def build_optimizer(model: torch.nn.Module, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on every parameter (``weight_decay_on='all'``, the seed's) or on
    matrices only (dim >= 2, embeddings included; 'matrices'); fused (one pass over each parameter)
    on CUDA and CPU: 57 vs 250 ms a step for the seed model on one CPU thread."""
    params = [p for p in model.parameters() if p.requires_grad]
    if tc.weight_decay_on == "all":
        groups = [{"params": params, "weight_decay": tc.weight_decay}]
    else:
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=device.type in ("cuda", "cpu"))


def lr_at(step: int, tc: TrainConfig, max_steps: int) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` down to ``lr * min_lr_ratio``."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    span = max(1, max_steps - tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / span)
    min_lr = tc.lr * tc.min_lr_ratio
    return min_lr + 0.5 * (tc.lr - min_lr) * (1 + math.cos(math.pi * progress))


def sums_of(out) -> torch.Tensor:
    """An ``LMLoss`` as ``[loss * count, correct, count]``: float64 on its device, detached, so that
    batches add up exactly and the mean is taken once at the end."""
    return torch.stack([out.loss.detach().double() * out.count, out.correct.double(), out.count.double()])


def forward_sums(model, x: torch.Tensor, y: torch.Tensor, device: torch.device, dtype: str) -> torch.Tensor:
    """``sums_of(model(x, y))`` under autocast, x and y moved to ``device`` first (asynchronously
    from the host): one evaluation batch, as ``score`` adds them up."""
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    with autocast(device, dtype):
        return sums_of(model(x, y))


def merge_factor(n: int, tokens_each: int, max_tokens: int) -> int:
    """How many of ``n`` micro-batches of ``tokens_each`` tokens ``merge_micro_batches`` puts in one
    forward: the largest divisor of n whose runs hold at most ``max_tokens`` tokens (0: 1)."""
    return max(d for d in range(1, n + 1) if n % d == 0 and (d == 1 or 0 < d * tokens_each <= max_tokens))


def merge_micro_batches(micro: list, max_tokens: int) -> list:
    """``micro`` [(x, y), ...] as fewer, larger micro-batches: runs of k consecutive ones concatenated
    along the rows, k the largest divisor of len(micro) whose runs hold at most ``max_tokens`` tokens
    (0, or micro-batches of different shapes: none merged). The same rows in the same order, so when
    every micro-batch counts the same targets -- packed training windows always do -- ``train_step``'s
    mean of the micro-batch means is the same loss and the step the same, up to float rounding (and
    dropout's draws). Gradient accumulation exists to bound memory; at the seed preset's 4 x 256
    tokens a micro-batch, its eight forwards a step are small, inefficient kernels on a GPU."""
    n = len(micro)
    if n < 2 or any(x.shape != micro[0][0].shape for x, _ in micro):
        return micro
    k = merge_factor(n, micro[0][0].numel(), max_tokens)
    if k == 1:
        return micro
    return [(torch.cat([x for x, _ in micro[i:i + k]]), torch.cat([y for _, y in micro[i:i + k]]))
            for i in range(0, n, k)]


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Iterable, *,
               device: torch.device, dtype: str, grad_clip: float = 0.0,
               scaler: Optional[torch.amp.GradScaler] = None, lr: Optional[float] = None) -> torch.Tensor:
    """One optimizer step over ``micro_batches`` [(x, y), ...] (gradient accumulation, the loss averaged
    over them): forward under autocast, backward, then clip the global gradient norm, step, clear.

    ``model(x, y)`` returns an ``LMLoss``; a DDP model all-reduces on the last micro-batch only.
    ``scaler`` is fp16's loss scaler (None or disabled: no scaling). Returns the step's
    ``[sum of loss * count, correct, count]`` as a float64 tensor on the device: no host sync
    (but fp16's), so the caller reads metrics when it chooses. ``accumulate_gradients`` and
    ``apply_gradients`` are its two halves (``gpt.graphstep`` all-reduces between them under torchrun).
    """
    if lr is not None:
        for group in optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):  # a captured step's lr (gpt.graphstep): written in place
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
    metrics = accumulate_gradients(model, micro_batches, device=device, dtype=dtype, scaler=scaler)
    apply_gradients(optimizer, grad_clip=grad_clip, scaler=scaler)
    optimizer.zero_grad(set_to_none=True)
    return metrics


def accumulate_gradients(model: torch.nn.Module, micro_batches: Iterable, *, device: torch.device, dtype: str,
                         scaler: Optional[torch.amp.GradScaler] = None) -> torch.Tensor:
    """Forward and backward over ``micro_batches``, each loss divided by their number, the gradients
    added to the parameters' ``.grad``: the step's ``[sum of loss * count, correct, count]`` (float64)."""
    micro = list(micro_batches)
    metrics = torch.zeros(3, dtype=torch.float64, device=device)
    for i, (x, y) in enumerate(micro):
        if device.type == "cuda" and x.device.type == "cpu":  # batches from the host: copy without a sync
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        last = i == len(micro) - 1
        sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else contextlib.nullcontext()
        with sync:
            with autocast(device, dtype):
                out = model(x, y)
            loss = out.loss / len(micro)
            (loss if scaler is None else scaler.scale(loss)).backward()
        metrics += sums_of(out)
    return metrics


def apply_gradients(optimizer: torch.optim.Optimizer, *, grad_clip: float = 0.0,
                    scaler: Optional[torch.amp.GradScaler] = None) -> None:
    """Clip the global norm of the parameters' gradients to ``grad_clip`` (0: no clipping), then step.
    The gradients stay (the caller clears them)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if grad_clip > 0:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()


@torch.no_grad()
def score(model, batches: Iterable, device: torch.device, dtype: str, rank: int = 0, world_size: int = 1,
          should_stop=None, desc: str | None = None, total: int | None = None, *, forward=None) -> dict:
    """Loss, perplexity and accuracy over the targets (!= -1) of ``batches`` [(x, y), ...].

    ``model(x, y)`` must return an ``LMLoss``. Under DDP each rank takes every world_size-th batch
    and the sums are all-reduced, so every rank gets the same numbers. ``desc``: show a progress
    bar (with an ETA) of ``total`` batches under that name. ``forward(x, y)``: a batch's sums as
    ``forward_sums`` makes them (None: that function; ``gpt.graphstep.GraphedEval``: replayed from a
    CUDA graph), called with the model in eval mode and gradients off.
    """
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * count, correct, count
    bar = None
    if desc is not None:
        mine = None if total is None else len(range(rank, total, world_size))
        bar = tqdm(total=mine, desc=desc, unit="batch", leave=False, dynamic_ncols=True, file=sys.stderr)
    try:
        for i, (x, y) in enumerate(batches):
            if should_stop is not None and should_stop():
                raise StopTraining
            if i % world_size != rank:
                continue
            sums += forward_sums(model, x, y, device, dtype) if forward is None else forward(x, y)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if world_size > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    loss_sum, correct, count = sums.tolist()
    loss = loss_sum / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": correct / max(count, 1.0),
            "tokens": int(count)}


def evaluate(model, tokens, context: int, batch_size: int, device: torch.device, dtype: str,
             max_tokens: int = 0, rank: int = 0, world_size: int = 1, should_stop=None,
             desc: str | None = None, *, forward=None) -> dict:
    """Loss, perplexity and next-token accuracy over the real tokens of ``tokens`` (each once), in
    non-overlapping windows of ``context`` (``gpt.data.eval_batches``); see ``score``."""
    targets = len(tokens) - 1 if max_tokens <= 0 else min(len(tokens) - 1, max_tokens)
    total = math.ceil(math.ceil(targets / context) / batch_size)  # batches eval_batches yields
    return score(model, eval_batches(tokens, context, batch_size, max_tokens), device, dtype, rank, world_size,
                 should_stop, desc, total, forward=forward)


def evaluate_seed_protocol(model, tokens, batch_size: int, device: torch.device, dtype: str, rank: int = 0,
                           world_size: int = 1, desc: str | None = None, *, forward=None) -> dict:
    """The seed's test figures for ``model`` on the packed split ``tokens`` (``SEED_PROTOCOL``): every
    story on its own row of ``SEED_ROW_TOKENS`` (``gpt.data.story_rows``), x = row[:-1], y = row[1:],
    the EOS padding counted as targets and target id ``SEED_IGNORE_INDEX`` ignored, as the seed did.
    Adds ``rows`` (stories scored) and ``protocol`` to ``score``'s dict; a model whose context is
    shorter than a row gets ``{"perplexity": None, "reason": ..., "protocol": ...}`` instead."""
    context = model.config.max_seq_length
    if context < SEED_ROW_TOKENS - 1:
        return {"perplexity": None, "reason": f"needs a context of at least {SEED_ROW_TOKENS - 1} tokens; this "
                                              f"model's is {context}", "protocol": SEED_PROTOCOL}
    rows = torch.from_numpy(story_rows(tokens, EOS_ID, SEED_ROW_TOKENS))
    targets = rows[:, 1:].masked_fill(rows[:, 1:] == SEED_IGNORE_INDEX, -1)
    batches = ((rows[i:i + batch_size, :-1], targets[i:i + batch_size]) for i in range(0, len(rows), batch_size))
    total = -(-len(rows) // batch_size)
    return {**score(model, batches, device, dtype, rank, world_size, None, desc, total, forward=forward),
            "rows": len(rows),
            "protocol": SEED_PROTOCOL}
