"""Issue 12's goals, judged from committed GPU results: one markdown row per goal, measured or not.

    python -m bench.goals bench/results/<date>-<gpu>/ [bench/results/<date>-<gpu>-run2/ ...]

Later folders override earlier ones benchmark by benchmark (a second call that re-ran a part).
Every number comes from the JSON and history files ``bench/gpu.sh`` writes; a goal whose
benchmark is missing says "not measured". The ratios are ours over the peer's time (> 1: ours is
faster), wall clock as a user sees it (CUDA events around back-to-back calls, launches included),
with the kernels-only ratio beside it where the benchmark recorded one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

L2_BYTES = 50 << 20  # the H100's L2, the larger of the two lent GPUs'; the LayerNorm goal's tensors exceed it
ATTENTION_SHAPES = ((16, 8, 256), (4, 12, 1024))  # (B, H, T), D = 64: the seed's and GPT-2 small's
LAYER_NORM_PEER_SHAPE = "16384x512"
RESULTS_H200 = [Path(__file__).resolve().parent / "results" / name  # the first lent GPU's two calls
                for name in ("2026-11-26-NVIDIA-H200", "2026-11-26-NVIDIA-H200-run2")]
RESULTS_H200_RUN3 = RESULTS_H200[0].parent / "2026-11-26-NVIDIA-H200-run3"  # the second lent GPU


def load(folders: list[Path]) -> tuple[dict, dict]:
    """(benchmark name -> extra_info, train run name -> history) over ``folders``, later ones winning."""
    benches, runs = {}, {}
    for folder in folders:
        for path in sorted(folder.glob("bench*.json")):
            for b in json.loads(path.read_text())["benchmarks"]:
                benches[b["name"]] = b.get("extra_info", {})
        for path in sorted(folder.glob("train_*_history.json")):
            runs[path.name.removeprefix("train_").removesuffix("_history.json")] = json.loads(path.read_text())
    return benches, runs


def _x(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def attention(benches: dict) -> tuple[str, str]:
    parts, met = [], True
    for B, H, T in ATTENTION_SHAPES:
        for which in ("fwd", "fwd+bwd"):
            info = benches.get(f"test_attention[B{B}-H{H}-T{T}-{which}]")
            if info is None:
                return "not measured at the goal's shapes", "unmeasured"
            met &= info["ratio_vs_sdpa"] >= 1.0
            parts.append(f"({B}, {H}, {T}) {which} {_x(info['ratio_vs_sdpa'])} ({info['tflops']} TFLOP/s; kernels "
                         f"{_x(info.get('kernel_ratio_vs_sdpa'))})")
    return "; ".join(parts), "yes" if met else "no"


def layer_norm(benches: dict) -> tuple[str, str]:
    parts, met, measured = [], True, False
    for label, kind in (("LayerNorm", "test_layer_norm"), ("add+LayerNorm", "test_add_layer_norm")):
        big = {name: info for name, info in benches.items() if name.startswith(f"{kind}[")
               and name.endswith("-fwd+bwd]") and _activation_bytes(name) > L2_BYTES}
        peer = benches.get(f"{kind}[{LAYER_NORM_PEER_SHAPE}-fwd+bwd]")
        if not big or peer is None:
            parts.append(f"{label} not measured")
            continue
        measured = True
        worst = min(big.items(), key=lambda kv: kv[1]["pct_copy_gbs"])
        parts.append(f"{label} fwd+bwd above L2 at least {worst[1]['pct_copy_gbs']}% of copy bandwidth "
                     f"({_shape(worst[0])}; kernels {worst[1].get('kernel_pct_copy_gbs', 'n/a')}%), "
                     f"{_x(peer['ratio_vs_eager'])} eager at {LAYER_NORM_PEER_SHAPE} (kernels "
                     f"{_x(peer.get('kernel_ratio_vs_eager'))})")
        met &= all(info["pct_copy_gbs"] >= 85 for info in big.values()) and peer["ratio_vs_eager"] >= 1.5
    if not measured:
        return "not measured", "unmeasured"
    return "; ".join(parts), ("yes" if met else "no") if all("not measured" not in p for p in parts) else (
        "no" if not met else "partly measured")


def _shape(name: str) -> str:
    return name.split("[", 1)[1].split("-", 1)[0]


def _activation_bytes(name: str) -> int:
    rows, n = (int(v) for v in _shape(name).split("x"))
    return rows * n * 2  # one bf16 activation


def train_step(benches: dict) -> tuple[str, str]:
    tps = {k.split("[", 1)[1].rstrip("]"): v["tokens_per_s"] for k, v in benches.items()
           if k.startswith(("test_train_step_ours[", "test_train_step_cuda_graph["))}
    eager = [tps[k] for k in ("ours_torch", "ours_torch_unfused") if k in tps]
    compiled = [tps[k] for k in ("ours_torch_compile", "ours_torch_compile_unfused") if k in tps]
    ours = {k: tps[k] for k in ("ours_triton", "triton") if k in tps}  # eager step; --cuda-graph's step
    if not eager or "ours_triton" not in ours:
        return "not measured", "unmeasured"
    best = max(ours.values())
    parts = [f"triton {ours['ours_triton']:,.0f} tokens/s" + (f", with --cuda-graph {ours['triton']:,.0f}" if "triton" in ours
                                                             else ""),
             f"{best / max(eager):.2f}x the best eager PyTorch ({max(eager):,.0f})"]
    met = best / max(eager) >= 1.3
    if compiled:
        parts.append(f"{best / max(compiled):.2f}x its torch.compile ({max(compiled):,.0f})")
        met &= best / max(compiled) >= 1.0
    else:
        parts.append("torch.compile peer not measured")
    if "triton" in ours and "torch" in tps:  # context, not a goal: the plain model's step graphed as well
        parts.append(f"{ours['triton'] / tps['torch']:.2f}x plain PyTorch CUDA-graphed too ({tps['torch']:,.0f})")
    return "; ".join(parts), ("yes" if met else "no") if compiled else ("no" if not met else "unmeasured")


def mfu(benches: dict) -> tuple[str, str]:
    runs = {int(k.split("[", 1)[1].rstrip("]")): v for k, v in benches.items() if k.startswith("test_train_step_mfu[")}
    if not runs:
        return "not measured", "unmeasured"
    batch = max(runs)
    info = runs[batch]
    return (f"batch {batch}: {100 * info['mfu']:.1f}% ({info['tflops']} TFLOP/s, {info['peak_mem_gib']} GiB peak); "
            + ", ".join(f"batch {b}: {100 * runs[b]['mfu']:.1f}%" for b in sorted(runs) if b != batch),
            "yes" if info["mfu"] >= 0.40 else "no")


# gpu.sh's train runs beside torch and triton: run 1-3's "graph" (--cuda-graph, before it was the
# default), later runs' "eager" (--no-cuda-graph, since; fewer steps: its speed only).
OTHER_RUNS = {"graph": "--cuda-graph", "eager": "--no-cuda-graph"}


def train_match(runs: dict) -> tuple[str, str]:
    if "torch" not in runs or "triton" not in runs:
        return "not measured", "unmeasured"
    a, b = runs["torch"], runs["triton"]
    ppl = abs(b["final_perplexity"] / a["final_perplexity"] - 1)
    pairs = list(zip(a["train_log"]["losses"], b["train_log"]["losses"])) + list(zip(a["val_losses"], b["val_losses"]))
    curve = max(abs(y / x - 1) for x, y in pairs)
    text = (f"test perplexity {a['final_perplexity']:.4f} (torch) vs {b['final_perplexity']:.4f} (triton), "
            f"{100 * ppl:.4f}% apart; losses at most {100 * curve:.4f}% apart")
    text += f"; tokens/s: torch {a.get('tokens_per_sec', 0):,.0f}, triton {b.get('tokens_per_sec', 0):,.0f}"
    for name, label in OTHER_RUNS.items():
        if name in runs:
            other = runs[name]
            text += f", triton {label} {other.get('tokens_per_sec', 0):,.0f}"
            text += (f" (test perplexity {other['final_perplexity']:.4f})" if other.get("steps") == a.get("steps")
                     else f" (over its {other.get('steps')} steps)")
    return text, "yes" if ppl <= 0.01 and curve <= 0.01 else "no"


def sampling(benches: dict) -> tuple[str, str]:
    parts = []
    for mode in ("eager", "compiled", "cuda_graph"):
        info = benches.get(f"test_sample_cuda[1-{mode}]")
        if info is not None:
            parts.append(f"{mode} {info['tokens_per_s']:,.0f} tokens/s = {_x(info['ratio_vs_hf'])} transformers "
                         f"({info['hf_tokens_per_s']:,.0f})")
    inside, after = (benches.get(f"test_sampled_decoding_cuda[{w}]") for w in ("in_graph", "after_replay"))
    if inside is not None:
        text = (f"the seed's sampling drawn in the decode graph {inside['tokens_per_s']:,.0f} tokens/s = "
                f"{_x(inside['ratio_vs_hf'])} transformers sampling ({inside['hf_tokens_per_s']:,.0f})")
        if after is not None:
            text += (f", {_x(inside['tokens_per_s'] / after['tokens_per_s'])} drawing after each replay "
                     f"({after['tokens_per_s']:,.0f})")
        parts.append(text)
    return ("; ".join(parts), "measured") if parts else ("not measured", "unmeasured")


def table(folders: list[Path]) -> str:
    benches, runs = load(folders)
    rows = [
        ("attention fwd and fwd+bwd >= 1.0x SDPA-FA2 at (16, 8, 256) and (4, 12, 1024), D 64", attention(benches)),
        ("LayerNorm, add+LayerNorm fwd+bwd >= 85% of copy bandwidth above L2; >= 1.5x eager at 16,384 x 512",
         layer_norm(benches)),
        ("train step, batch 32 x 256: triton >= 1.3x best eager PyTorch, >= 1.0x torch.compile", train_step(benches)),
        ("MFU >= 40% at the largest batch that fits", mfu(benches)),
        ("train.py 200 steps, triton vs torch: curves and test perplexity within 1%", train_match(runs)),
        ("sampling, batch 1: tokens/s vs transformers, eager and graph-captured", sampling(benches)),
    ]
    lines = ["| goal (issue 12) | measured | met? |", "|---|---|---|"]
    lines += [f"| {goal} | {text} | {verdict} |" for goal, (text, verdict) in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="result folders, earliest first")
    args = p.parse_args(argv)
    missing = [str(f) for f in args.folders if not f.is_dir()]
    if missing:
        print(f"goals: no such folder: {', '.join(missing)}", file=sys.stderr)
        return 1
    print(table(args.folders))
    return 0


if __name__ == "__main__":
    sys.exit(main())
