"""The kernels for one Nsight Compute profile (``bash bench/gpu.sh profile``): where ours lost to their
peer on the H200 (README, "Measured"), each at the issue's shape, beside the peer at the same shape.

    ncu --clock-control none --profile-from-start off --nvtx --page details python bench/ncu_targets.py

Every target first runs ``WARMUP`` times outside the profiled range (Triton compiles and autotunes
there: the autotuner's own benchmark launches would otherwise fill the profile), then once inside
it (``torch.cuda.profiler.start()`` / ``stop()``), under an NVTX range named after it, so each
profiled kernel says which target launched it. Targets (bf16):

* ``attention`` / ``sdpa_flash``: causal attention forward + backward at (B, H, T, D) = (16, 8, 256, 64),
  ours (forward, delta pre-pass, dK/dV, dQ kernels) and SDPA's FlashAttention-2 backend (0.66x there);
* ``attention_dropout``: ours again with dropout_p = 0.1 on the probabilities (the Philox mask drawn in
  the forward and again in both backward kernels): its pipe utilisation against ``attention``'s says
  what the mask's integer work and layout conversions cost (not yet profiled);
* ``layer_norm`` / ``f_layer_norm``: LayerNorm forward + backward at 16,384 x 512 (0.48x eager);
* ``add_layer_norm_autocast``: the model's add + LayerNorm under autocast at 16,384 x 512 (bf16
  branch, fp32 residual stream, the LayerNorm written in bf16: ``out_dtype``);
* ``lm_head``: the fused LM head + cross-entropy forward + backward at 8,192 x 512 over GPT-2's
  vocabulary (its row kernel and the padded-vocabulary GEMMs; 0.33x torch.compile there);
* ``ce_rows`` / ``ce_rows_persistent``: the head's row kernel alone on one 5,336-row chunk of bf16
  logits, one program per row (the default) and a persistent grid of one 32-warp program per SM
  (``bench/test_bench_cross_entropy.py::test_row_kernel``'s candidate): their L2 hit rates and
  DRAM bytes say whether holding fewer rows in flight lets the gradient pass read from L2.

``--list`` prints the target names; ``--only NAME ...`` profiles a subset.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch
import torch.nn.functional as F

WARMUP = 3
TARGETS = ("attention", "sdpa_flash", "attention_dropout", "layer_norm", "f_layer_norm", "add_layer_norm_autocast", "lm_head", "ce_rows",
           "ce_rows_persistent")


def targets() -> dict[str, Callable[[], None]]:
    """name -> one forward + backward of that target on fixed CUDA inputs."""
    import kernels
    import kernels.cross_entropy as kce
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape, dtype=dt, grad=False):
        return torch.randn(*shape, device=dev, dtype=dtype, generator=g).requires_grad_(grad)

    q, k, v = (rand(16, 8, 256, 64, grad=True) for _ in range(3))  # (B, nh, T, hs)
    do = rand(16, 8, 256, 64)

    def attention():
        kernels.causal_attention(q, k, v).backward(do)

    def attention_dropout():
        kernels.causal_attention(q, k, v, dropout_p=0.1).backward(do)

    def sdpa_flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)

    x, dy = rand(16384, 512, grad=True), rand(16384, 512)
    w, b = rand(512, dtype=torch.float32, grad=True), rand(512, dtype=torch.float32, grad=True)  # fp32 masters

    def layer_norm():
        kernels.layer_norm(x, w, b).backward(dy)

    def f_layer_norm():  # eager under autocast: bf16 input, parameters cast to bf16
        F.layer_norm(x, (512,), w.to(dt), b.to(dt)).backward(dy)

    residual, ds = rand(16384, 512, dtype=torch.float32, grad=True), rand(16384, 512, dtype=torch.float32)

    def add_layer_norm_autocast():
        torch.autograd.backward(kernels.add_layer_norm(x, residual, w, b, out_dtype=dt), (dy, ds))

    h = rand(8192, 512, grad=True)  # final hidden states: bf16 from the final LayerNorm under autocast
    wte = rand(50257, 512, dtype=torch.float32, grad=True)  # the tied embedding, the fp32 master
    y = torch.randint(0, 50257, (8192,), device=dev, generator=g)

    def lm_head():
        kernels.linear_cross_entropy(h, wte, y, dtype=dt)[0].backward()

    vp = -(-50257 // kce.VOCAB_MULTIPLE) * kce.VOCAB_MULTIPLE
    rows = kce._chunk_rows(vp)
    chunk = rand(rows, vp)  # overwritten with its gradient by every call: the same work each time
    chunk_targets = torch.randint(0, 50257, (rows,), device=dev, generator=g)
    loss, hit = torch.empty(rows, device=dev), torch.empty(rows, device=dev, dtype=torch.int32)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count

    def ce_rows():
        kce._ce_rows(chunk, 50257, chunk_targets, loss, hit, -1, True)

    def ce_rows_persistent():
        kce._ce_rows(chunk, 50257, chunk_targets, loss, hit, -1, True, block=16384, warps=32, programs=sms)

    made = {"attention": attention, "sdpa_flash": sdpa_flash, "attention_dropout": attention_dropout,
            "layer_norm": layer_norm, "f_layer_norm": f_layer_norm, "add_layer_norm_autocast": add_layer_norm_autocast,
            "lm_head": lm_head, "ce_rows": ce_rows, "ce_rows_persistent": ce_rows_persistent}
    return {name: made[name] for name in TARGETS}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="print the target names and exit")
    p.add_argument("--only", nargs="+", metavar="NAME", help="profile these targets only")
    args = p.parse_args(argv)
    if args.list:
        print(" ".join(TARGETS))
        return 0
    unknown = sorted(set(args.only or ()) - set(TARGETS))
    if unknown:
        print(f"ncu_targets.py: unknown target(s) {unknown}; there are {list(TARGETS)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("ncu_targets.py: needs a CUDA GPU", file=sys.stderr)
        return 1
    chosen = {name: fn for name, fn in targets().items() if not args.only or name in args.only}
    for fn in chosen.values():
        for _ in range(WARMUP):
            fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for name, fn in chosen.items():
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"profiled: {' '.join(chosen)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
