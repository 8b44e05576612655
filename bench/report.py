"""Turn pytest-benchmark JSON into a markdown table and plots, and the README's results section.

    python -m pytest bench --benchmark-json bench/results/<date>-<machine>/bench.json
    python -m bench.report bench/results/<date>-<machine>/bench.json   # writes report.md + plots beside it
                                                   # (bench_<part>.json -> report_<part>.md)
    python -m bench.report --readme                                    # README section from all results

Each benchmark's headline figure is the first unit it recorded in ``extra_info`` among UNITS.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"

# (extra_info key, column title), in order of preference for the headline figure.
UNITS = [("mb_per_s", "MB/s"), ("tokens_per_s", "tokens/s"), ("tflops", "TFLOP/s"), ("gbs", "GB/s"), ("peak_mib", "MiB peak"),
         ("host_us", "us of host time a call")]
# Every recorded ratio against a peer ("ratio_vs_X" / "speedup_vs_X": whole calls; "kernel_ratio_vs_X":
# the profiler's device time alone, launch cost excluded) and every "% of a peak" figure (likewise).
RATIO_PREFIXES = ("ratio_vs_", "speedup_vs_", "kernel_ratio_vs_")
PCT_PREFIXES = ("pct_", "kernel_pct_")
X_PARAMS = ("T", "seq_len", "rows", "cache_len", "N", "batch", "batch_size")


def load(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: cannot read benchmark JSON {path}: {e}") from None
    if "benchmarks" not in data:
        raise SystemExit(f"error: {path} is not pytest-benchmark JSON (no 'benchmarks' key)")
    return data


def headline(info: dict) -> tuple[str, float] | None:
    for key, title in UNITS:
        if isinstance(info.get(key), (int, float)):
            return title, float(info[key])
    return None


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def table(data: dict, level: int = 3) -> str:
    """One markdown table per group: benchmark, mean time, headline figure, ratios and % of peak."""
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b.get("group") or "ungrouped"].append(b)
    machine = data.get("machine_info", {})
    lines = [f"Machine: {machine.get('node', '?')}, {machine.get('cpu', {}).get('brand_raw', '?')}; "
             f"device: {next((b['extra_info'].get('device') for b in data['benchmarks'] if b['extra_info'].get('device')), 'cpu')}; "
             f"date: {data.get('datetime', '?')[:10]}", ""]
    for group in sorted(groups):
        lines += [f"{'#' * level} {group}", "", "| benchmark | mean ms | figure | vs peer | % peak |", "|---|---|---|---|---|"]
        for b in sorted(groups[group], key=lambda b: b["name"]):
            info = b.get("extra_info", {})
            head = headline(info)
            ratio = ", ".join(f"{fmt(v)}x {k.split('_vs_', 1)[1]}{' (kernels)' * k.startswith('kernel_')}"
                              for k, v in info.items() if k.startswith(RATIO_PREFIXES) and isinstance(v, (int, float)))
            pct = ", ".join(f"{fmt(v)}% {k.split('pct_', 1)[1]}{' (kernels)' * k.startswith('kernel_')}"
                            for k, v in info.items() if k.startswith(PCT_PREFIXES) and isinstance(v, (int, float)))
            figure = f"{fmt(head[1])} {head[0]}" if head else ""
            lines.append(f"| `{b['name']}` | {b['stats']['mean'] * 1e3:.3f} | {figure} | {ratio} | {pct} |")
        lines.append("")
    return "\n".join(lines)


def plots(data: dict, out: Path) -> list[Path]:
    """Headline figure against the varying size parameter, one line per benchmark function."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(list)  # (group, unit, base name + fixed params) -> [(x, y)]
    for b in data["benchmarks"]:
        head = headline(b.get("extra_info", {}))
        params = b.get("params") or {}
        xkey = next((k for k in X_PARAMS if isinstance(params.get(k), (int, float))), None)
        if head is None or xkey is None:
            continue
        rest = ",".join(f"{k}={v}" for k, v in sorted(params.items()) if k != xkey)
        base = b["name"].split("[")[0] + (f"[{rest}]" if rest else "")
        series[(b.get("group") or "ungrouped", head[0], xkey, base)].append((params[xkey], head[1]))
    written = []
    by_plot = defaultdict(list)
    for (group, unit, xkey, base), pts in series.items():
        if len(pts) > 1:
            by_plot[(group, unit, xkey)].append((base, sorted(pts)))
    for (group, unit, xkey), lines in sorted(by_plot.items()):
        fig, ax = plt.subplots(figsize=(7, 4))
        for base, pts in lines:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=base)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xkey)
        ax.set_ylabel(unit)
        ax.set_title(f"{group}: {unit} against {xkey}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        path = out / f"{re.sub(r'[^A-Za-z0-9]+', '_', f'{group}_{unit}_{xkey}').strip('_')}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def report_name(path: Path) -> str:
    """bench.json -> report.md; bench_<part>.json (the GPU suite's parts) -> report_<part>.md."""
    return "report.md" if path.stem == "bench" else f"report_{path.stem.removeprefix('bench_')}.md"


def render(path: Path) -> Path:
    data = load(path)
    out = path.parent
    pngs = plots(data, out)
    md = f"# Benchmark results: {out.name}\n\n" + table(data)
    md += "".join(f"\n![{p.stem}]({p.name})\n" for p in pngs)
    report = out / report_name(path)
    report.write_text(md)
    return report


def readme_section() -> str:
    """A section linking every committed result folder, newest first, with its tables inlined."""
    files = sorted(RESULTS.glob("*/bench*.json"), key=lambda p: (p.parent.name, p.name), reverse=True)
    if not files:
        return "No benchmark results committed yet."
    return "\n".join(f"#### `{p.parent.name}/{p.name}` ([report](bench/results/{p.parent.name}/{report_name(p)}))\n\n"
                     + table(load(p), level=5) for p in files)


def update_readme() -> None:
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"error: README has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{readme_section()}\n{END}{tail}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="*", type=Path, help="pytest-benchmark JSON files to render")
    p.add_argument("--readme", action="store_true", help="rewrite the README's results section")
    args = p.parse_args(argv)
    if not args.json and not args.readme:
        p.error("give a benchmark JSON file or --readme")
    for path in args.json:
        print(f"wrote {render(path)}")
    if args.readme:
        update_readme()
        print(f"updated {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
