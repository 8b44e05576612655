"""What the training tests share: a tiny run on 150 stories of the shared sample, and how to read its outputs."""

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory):
    """One token cache for every training test (tokenized once)."""
    return tmp_path_factory.mktemp("train_cache")


@pytest.fixture(scope="session")
def base_args(train_cache, stories_dir, tokenizer_dir):
    """A 1-layer d_model-32 model, context 32, on 150 stories: a step takes milliseconds."""
    return ["--preset", "tiny", "--data", str(stories_dir / "tinystories-sample.jsonl"),
            "--tokenizer", str(tokenizer_dir), "--cache-dir", str(train_cache), "--num-stories", "150",
            "--num-layers", "1", "--d-model", "32", "--num-heads", "2", "--d-ff", "64",
            "--max-seq-length", "32", "--batch-size", "4", "--eval-tokens", "512", "--sample-length", "8",
            "--no-progress", "--log-interval", "5"]


@pytest.fixture(scope="session")
def history():
    """``history(out_dir)``: a run's training_history.json."""
    return lambda out_dir: json.loads((Path(out_dir) / "training_history.json").read_text())
