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
