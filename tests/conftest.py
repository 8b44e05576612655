"""Shared test set-up: Triton's interpreter on CPU-only machines, and paths to ../shared data."""

import os
from pathlib import Path

import pytest
import torch

# Must happen before anything imports triton: without a GPU, kernels run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
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
