"""Benchmark set-up: Triton's interpreter on CPU-only machines, shared-data fixtures, CUDA marker."""

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("SHARED_DIR", ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    d = Path(os.environ.get("GPT2_TOKENIZER_DIR", SHARED / "data" / "gpt2-tokenizer"))
    if not (d / "vocab.json").is_file():
        pytest.skip(f"GPT-2 tokenizer files not found in {d} (set GPT2_TOKENIZER_DIR)")
    return d


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    d = Path(os.environ.get("TINYSTORIES_DIR", SHARED / "data" / "tinystories"))
    if not (d / "tinystories-sample.jsonl").is_file():
        pytest.skip(f"TinyStories sample not found in {d} (set TINYSTORIES_DIR)")
    return d
