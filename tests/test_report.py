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
