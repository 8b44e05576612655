"""What ``python -m pytest bench`` prints at its end besides pytest-benchmark's own table: each
benchmark's figures against its peers (``bench/report.py``'s table: the headline unit, every ratio
against a peer measured in the same test, % of the device's peaks). pytest-benchmark's table times
single synchronised calls (at these sizes mostly launch latency), which says little of how a kernel
compares; the ratios are what the benchmarks are for."""

import platform
from datetime import datetime, timezone

import pytest

from bench.report import table


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's table: the last thing a run prints
def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    done = [b.as_dict(include_data=False) for b in getattr(session, "benchmarks", []) if b]
    if not done:
        return
    data = {"benchmarks": done, "datetime": datetime.now(timezone.utc).isoformat(),
            "machine_info": {"node": platform.node(), "cpu": {"brand_raw": platform.processor() or platform.machine()}}}
    terminalreporter.write_sep("=", "figures against their peers (bench/report.py; ratios > 1: ours is faster)")
    terminalreporter.write_line(table(data, level=2))
