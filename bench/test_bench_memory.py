"""Peak memory of one seed-sized training step (forward + backward), fused LM head against unfused.

The seed preset at batch 8 and 32 (x 256 tokens; on CUDA batch 32 only, to keep the GPU suite
short), each measurement in a fresh process (``bench.step_memory``): on a CPU the growth of the
peak resident set over the step, fp32; on CUDA ``max_memory_allocated`` above the model, bf16
autocast, the Triton kernels. The unfused head (``F.linear`` + fp32
``F.cross_entropy`` + ``argmax``, ``gpt.ops.linear_cross_entropy_unfused``) holds all B x 256 x
50,257 logits and their gradient at once: 412 MB of fp32 logits at batch 8, 1.65 GB at batch 32.

    python -m pytest bench/test_bench_memory.py
"""

from __future__ import annotations

import pytest
import torch

from bench.common import record
from bench.step_memory import step_peak

pytestmark = pytest.mark.benchmark(group="memory")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = "bf16" if CUDA else "fp32"
PEAKS: dict[tuple[str, int], dict] = {}  # (head, batch) -> measurement, for ratios within this run


@pytest.mark.parametrize("head", ["unfused", "fused"])
@pytest.mark.parametrize("batch", [32] if CUDA else [8, 32])
def test_step_peak_memory(benchmark, batch, head):
    result = benchmark.pedantic(lambda: step_peak(head, batch, dtype=DTYPE, device=DEVICE), rounds=1, iterations=1)
    PEAKS[(head, batch)] = result
    info = {"peak_mib": round(result["peak_bytes"] / 2**20, 1), "batch": batch, "dtype": DTYPE,
            "fp32_logits_mib": round(result["fp32_logits_bytes"] / 2**20, 1)}
    other = PEAKS.get(("unfused", batch))
    if head == "fused" and other is not None:
        assert result["loss"] == pytest.approx(other["loss"], rel=1e-2 if DTYPE == "bf16" else 1e-5)
        info["ratio_vs_unfused"] = round(other["peak_bytes"] / result["peak_bytes"], 2)
        info["saved_mib"] = round((other["peak_bytes"] - result["peak_bytes"]) / 2**20, 1)
    record(benchmark, **info)
