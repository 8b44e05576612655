"""The fused LM head's point: a seed-sized training step on a CPU peaks lower without the (N, V) logits.

One forward + backward of the seed model at 8 x 256 tokens (fp32 logits 2,048 x 50,257 = 412 MB),
each path in a fresh process (``bench.step_memory``: growth of the peak resident set over the step).
The unfused head holds the logits, their log-softmax and their gradient at once; the fused one a
chunk of 166 rows. Noise (allocator caching, thread pools) is tens of MB; the bound is 206 MB.
"""

import sys

import pytest

from bench.step_memory import step_peak

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")


def test_fused_head_lowers_the_step_peak_by_at_least_half_the_logits():
    fused = step_peak("fused", batch=8)
    unfused = step_peak("unfused", batch=8)
    assert fused["loss"] == pytest.approx(unfused["loss"], rel=1e-5)  # the same step
    logits = fused["fp32_logits_bytes"]
    saved = unfused["peak_bytes"] - fused["peak_bytes"]
    print(f"step peak: fused {fused['peak_bytes'] / 1e6:.0f} MB, unfused {unfused['peak_bytes'] / 1e6:.0f} MB, "
          f"saved {saved / 1e6:.0f} MB = {saved / logits:.2f} x the logits")
    assert saved >= logits / 2
