"""A torchrun worker for the graphed step under several processes (not a test module: launched by
tests/test_graphstep.py and tests/test_train_cli.py as ``python -m torch.distributed.run ...
tests/graphed_ddp.py MODE ...``), gloo on the CPU, and on a GPU host every rank on its one GPU.

    step OUT   ``GraphedTrainStep`` with the process group: rank r trains on ``rank_batches(step, r)``;
               each rank writes its weights, metrics and replay count to OUT/rank<r>.pt.
    train ARGS ``gpt.train.main(ARGS)`` with the CUDA-graph refusal lifted (on a CPU: the stand-in for
               the graph), so that the trainer's graphed step runs under torchrun.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from gpt import GPT2Model, GPTConfig, TrainConfig

CFG = GPTConfig(vocab_size=101, max_seq_length=16, num_layers=2, num_heads=2, d_model=32, d_ff=64, dropout=0.0)
WARMUP = 2
LRS = [2.0**-k for k in (7, 8, 8, 9, 10, 9, 11)]
OTHER_SHAPE_STEP = 5  # its micro-batches have 2 rows, not 3: an eager step after the capture


def micro_batches(seed: int, rows: int = 3, micro: int = 2) -> list:
    """``micro`` (x, y) pairs of (rows, 16) CPU tokens drawn from ``seed``, some targets ignored."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(micro):
        x = torch.randint(0, CFG.vocab_size, (rows, 16), generator=g)
        y = torch.randint(0, CFG.vocab_size, (rows, 16), generator=g)
        y[0, -3:] = -1
        out.append((x, y))
    return out


def rank_batches(step: int, rank: int) -> list:
    """Rank ``rank``'s micro-batches of ``step``: different on every rank and step."""
    return micro_batches(1000 * step + rank, rows=2 if step == OTHER_SHAPE_STEP else 3)


def device_of(rank: int) -> torch.device:
    return torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")


def graphed_steps(out: Path) -> None:
    from gpt.graphstep import Captured, GraphedTrainStep
    from gpt.step import build_optimizer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    device = device_of(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    replays = []
    replay = Captured.replay
    Captured.replay = lambda self: (replays.append(1), replay(self))[1]
    torch.manual_seed(0)
    model = GPT2Model(CFG, impl="auto").to(device)
    opt = build_optimizer(model, TrainConfig(), device)
    stepper = GraphedTrainStep(model, opt, device=device, dtype="fp32", grad_clip=1.0, warmup=WARMUP,
                               process_group=dist.group.WORLD)
    metrics = [stepper(rank_batches(step, rank), lr).clone() for step, lr in enumerate(LRS)]
    torch.save({"weights": {k: v.cpu() for k, v in model.state_dict().items()},
                "metrics": torch.stack(metrics).cpu(), "replays": len(replays), "eager_steps": stepper.eager_steps,
                "captured": stepper.captured}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def train(args: list) -> int:
    import gpt.trainer
    from gpt.train import main

    gpt.trainer.graph_refusal = lambda *a: None  # a CPU runs the stand-in for the graph
    return main(args)


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "step":
        graphed_steps(Path(rest[0]))
    elif mode == "train":
        sys.exit(train(rest))
    else:
        sys.exit(f"graphed_ddp.py: unknown mode {mode!r} (step, train)")
