"""The README's benchmark tables are generated from the committed results (``bench/report.py``):
a result folder added, changed or removed without ``python -m bench.report --readme`` fails here."""

from bench.report import END, README, RESULTS, START, readme_section, report_name


def test_readme_tables_match_the_committed_results():
    text = README.read_text()
    assert text.count(START) == 1 and text.count(END) == 1
    section = text.split(START, 1)[1].split(END, 1)[0]
    assert section.strip() == readme_section().strip(), "run: python -m bench.report --readme"


def test_every_committed_benchmark_has_its_report():
    for path in RESULTS.glob("*/bench*.json"):
        assert (path.parent / report_name(path)).is_file(), f"run: python -m bench.report {path}"


def test_whole_call_and_kernel_only_figures_are_told_apart():
    from bench.report import table

    info = {"tflops": 7.4, "ratio_vs_sdpa": 0.598, "kernel_ratio_vs_sdpa": 1.251, "pct_peak_tflops": 0.7,
            "kernel_pct_copy_gbs": 59.3}
    data = {"benchmarks": [{"name": "test_attention[B16]", "group": "kernels", "extra_info": info,
                            "stats": {"mean": 1.444e-4}}]}
    row = next(line for line in table(data).splitlines() if line.startswith("| `test_attention"))
    assert row == ("| `test_attention[B16]` | 0.144 | 7.4 TFLOP/s | 0.598x sdpa, 1.25x sdpa (kernels) | "
                   "0.7% peak_tflops, 59.3% copy_gbs (kernels) |")


def test_step_profile_kernels_are_grouped_by_who_wrote_them():
    """The MFU benchmark's ``kernel_groups_ms``: run 3's twelve costliest kernels at batch 2,048 (as
    the profiler named them, cut to 80 characters) fall into GEMMs, our Triton kernels and torch's."""
    import json

    from bench.common import kernel_group, kernel_groups_ms, short_kernel_name

    step = json.loads((RESULTS / "2026-11-26-NVIDIA-H200-run3" / "bench_step.json").read_text())
    mfu = next(b for b in step["benchmarks"] if b["name"] == "test_train_step_mfu[2048]")
    times = {}
    for entry in mfu["extra_info"]["top_kernels"]:
        ms, _, name = entry.partition(" ms ")
        times[name] = float(ms)
    groups = kernel_groups_ms(times)
    assert groups == {"gemm": 187.778, "triton": 96.96, "torch": 30.034, "other": 0.0}
    assert kernel_group("_layer_norm_bwd_kernel") == "triton" and kernel_group("triton_poi_fused_add_0") == "triton"
    assert kernel_group("cudaMemsetAsync") == "other" and kernel_group("Memcpy DtoD (Device -> Device)") == "other"
    assert kernel_group("void at_cuda_detail::cub::DeviceRadixSortOnesweepKernel<x>") == "torch"
    gelu = ("void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::"
            "GeluBackwardCUDAKernelImpl(at::TensorIteratorBase&)::{lambda()#2}>(int, ...)")
    assert short_kernel_name(gelu).startswith("vectorized_elementwise_kernel<4, GeluBackwardCUDAKernelImpl(")


def test_pytest_bench_ends_with_the_figures_against_their_peers():
    """``python -m pytest bench`` prints, after pytest-benchmark's own table, the report's table of
    the benchmarks that ran: their headline figure and ratios against their peers (bench/conftest.py)."""
    import os
    import subprocess
    import sys

    from bench.report import README

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}  # (under xdist pytest-benchmark
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/test_bench_host.py",
                          "-k", "launcher_host_us and layer_norm and inference and not add"],  # would time nothing)
                         cwd=README.parent, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    ours = run.stdout.index("figures against their peers")
    assert ours > run.stdout.index("Name (time in us)")  # pytest-benchmark's table comes first
    rows = [line for line in run.stdout[ours:].splitlines() if line.startswith("| `test_")]
    assert len(rows) == 1 and rows[0].startswith("| `test_launcher_host_us[layer_norm, inference]` |"), rows
    assert "us of host time a call" in rows[0] and "x f_layer_norm |" in rows[0], rows[0]
