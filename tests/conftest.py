"""What the tests share: the device kernel tests run on, the perturbed model, and the tiny training run.

DEVICE is CUDA when there is a GPU, else the CPU, where the root ``conftest.py`` has turned on
Triton's interpreter. Every test that runs a Triton kernel puts its tensors and models there (test
modules import it: ``from conftest import DEVICE, perturbed_model``; pytest loads this file as
``conftest`` before it collects the modules beside it). Tests of the reference path alone stay on
the CPU. Triton is a hard dependency on Linux x86_64 (setup.py): the kernel tests fail, not skip,
without it.

``FullDisk`` is a file on a disk that fills up (test_checkpoint.py, test_train.py).

The training tests (test_train.py, test_train_cli.py) share ``base_args``: a 1-layer d_model-32
model, context 32, on 150 stories of the shared sample, tokenized once into ``train_cache``.
"""

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from gpt import GPT2Model, GPTConfig

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA_ONLY_REASON = "needs CUDA: Triton's interpreter returns garbage for tl.dot on bf16"


class FullDisk:
    """A file with ``room`` bytes left on its disk: a write past them raises ENOSPC, as the OS does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def perturbed_model(config: GPTConfig, *, device, seed: int = 0) -> GPT2Model:
    """An impl="torch" model (eval mode, on ``device``) whose biases and LayerNorm weights are off
    their defaults (zeros and ones), so that a kernel mixing them up cannot match the reference.

    The weights come from ``seed`` on the CPU's generator: the same values on every device.
    """
    torch.manual_seed(seed)
    model = GPT2Model(config, impl="torch")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
                p.add_(0.1 * torch.randn_like(p))
    return model.to(device).eval()


@pytest.fixture(autouse=True)
def tf32_left_as_found():
    """Every test leaves the process-wide TF32 switches as it found them. A training run used to leave
    them on, and later fp32 checks on the same GPU worker then ran in TF32 (the likely cause of two
    failures on an H200, 2026-11-26); ``gpt.hardware.tf32_matmuls`` now scopes them to the run."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    after = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert after == before, f"the test changed the TF32 switches (matmul, cudnn) from {before} to {after}"


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory):
    """One token cache for every training test (tokenized once)."""
    return tmp_path_factory.mktemp("train_cache")


@pytest.fixture(scope="session")
def base_args(train_cache, stories_dir, tokenizer_dir):
    """A 1-layer d_model-32 model, context 32, on 150 stories: a step takes milliseconds. In fp32
    whatever the CPU's default (bf16 with AMX: ``gpt.hardware.default_dtype``, tested apart), with
    eager steps on a GPU too (the CUDA default captures them: test_graphstep.py tests that apart)."""
    return ["--preset", "tiny", "--data", str(stories_dir / "tinystories-sample.jsonl"),
            "--tokenizer", str(tokenizer_dir), "--cache-dir", str(train_cache), "--num-stories", "150",
            "--num-layers", "1", "--d-model", "32", "--num-heads", "2", "--d-ff", "64",
            "--max-seq-length", "32", "--batch-size", "4", "--eval-tokens", "512", "--sample-length", "8",
            "--no-progress", "--log-interval", "5", "--dtype", "fp32", "--no-cuda-graph"]


@pytest.fixture(scope="session")
def history():
    """``history(out_dir)``: a run's training_history.json."""
    return lambda out_dir: json.loads((Path(out_dir) / "training_history.json").read_text())
