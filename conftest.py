"""Test and benchmark set-up shared by tests/ and bench/.

Triton's interpreter on CPU-only machines, fixtures for the offline GPT-2 tokenizer files and
TinyStories sample (default ``../shared/data/...``; override with GPT2_TOKENIZER_DIR and
TINYSTORIES_DIR), and failures written as they happen where FAILURES_LOG names a file.
"""

import os
from pathlib import Path

import pytest
import torch

# Must happen before anything imports triton: without a GPU, kernels run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("SHARED_DIR", ROOT.parent / "shared"))


def _shared_dir(env: str, default: Path, marker: str, what: str) -> Path:
    """The shared data directory, or a skip when it is missing -- a failure in CI (CI=true), where a
    green run with the data tests skipped would mean nothing."""
    d = Path(os.environ.get(env, default))
    if not (d / marker).is_file():
        message = f"{what} not found in {d} (set {env})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI must run the data tests", pytrace=False)
        pytest.skip(message)
    return d


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return _shared_dir("GPT2_TOKENIZER_DIR", SHARED / "data" / "gpt2-tokenizer", "vocab.json", "GPT-2 tokenizer files")


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    return _shared_dir("TINYSTORIES_DIR", SHARED / "data" / "tinystories", "tinystories-sample.jsonl", "TinyStories sample")


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run what is marked slow_on_cpu (Triton's interpreter on a CPU: minutes each)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow_on_cpu: takes minutes on a CPU (Triton's interpreter); "
                                       "skipped there unless --slow")


def pytest_runtest_logreport(report):
    """With FAILURES_LOG set (bench/gpu.sh), each failure's report is appended to that file as it
    happens: a pass stopped by its time cap never prints its summary, and this keeps the reasons."""
    path = os.environ.get("FAILURES_LOG")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="minutes on a CPU (Triton's interpreter): run with --slow")
    for item in items:
        if "slow_on_cpu" in item.keywords:
            item.add_marker(skip)
