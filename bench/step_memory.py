"""Peak memory of one training step's forward + backward, fused LM head against the unfused one.

Each measurement runs in a fresh Python process, so that nothing another measurement allocated
(or the allocator kept) is counted: the model (impl auto: the Triton kernels on CUDA, the PyTorch
path on a CPU; dropout off) and a random batch are built, gradients are absent, then one ``model(x, y).loss.backward()`` runs. On a CPU the figure is
the growth of the process's peak resident set over that step (Linux: the peak is reset through
``/proc/self/clear_refs`` just before, read from ``VmHWM``); on CUDA it is
``torch.cuda.max_memory_allocated`` above what was allocated before. The step's own gradient
buffers are part of both paths' figures; the optimizer is left out (the same for both).

    python -m bench.step_memory --head fused --batch 8      # prints one JSON line
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADS = ("fused", "unfused")


def _status_bytes(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def measure(head: str, batch: int, preset: str = "seed", dtype: str = "fp32", device: str = "cpu") -> dict:
    """Peak bytes of one forward + backward in this process (call it in a fresh one: see ``step_peak``)."""
    import torch

    from gpt import GPT2Model, get_preset
    from gpt.hardware import autocast
    from gpt.ops import linear_cross_entropy_unfused, select_ops

    config = get_preset(preset).model
    config = type(config)(**{**config.to_dict(), "dropout": 0.0})
    device = torch.device(device)
    torch.manual_seed(0)
    model = GPT2Model(config, impl="auto").to(device)
    if head == "unfused":
        model.impl = select_ops("auto", device)._replace(linear_cross_entropy=linear_cross_entropy_unfused)
    T = config.max_seq_length
    x = torch.randint(0, config.vocab_size, (batch, T), device=device)
    y = torch.randint(0, config.vocab_size, (batch, T), device=device)

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    with autocast(device, dtype):
        loss = model(x, y).loss
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_bytes("VmHWM") - base
    logit_bytes = batch * T * config.vocab_size * 4  # the full fp32 logits (their size in either dtype's loss)
    return {"head": head, "batch": batch, "preset": preset, "dtype": dtype, "device": device.type,
            "peak_bytes": peak, "fp32_logits_bytes": logit_bytes, "loss": loss.item()}


def step_peak(head: str, batch: int, preset: str = "seed", dtype: str = "fp32", device: str = "cpu",
              timeout: float = 600) -> dict:
    """``measure`` in a fresh subprocess (same interpreter and environment, this repository first on the path)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "bench.step_memory", "--head", head, "--batch", str(batch), "--preset", preset,
           "--dtype", dtype, "--device", device]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head", choices=HEADS, required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--preset", default="seed")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    print(json.dumps(measure(args.head, args.batch, args.preset, args.dtype, args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
