"""What a resumable checkpoint of a training run holds (``TrainState``), and how it is built and
restored: the weights, optimizer and scaler, each rank's data position and RNG streams, the step
and token counters, early-stopping bookkeeping, the history, and which data the run trains on."""

from __future__ import annotations

import math
import random
from dataclasses import asdict
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from .config import TrainConfig
from .data import TrainBatches
from .graphstep import use_float_lr
from .model import GPT2Model

if TYPE_CHECKING:
    from .trainer import RunOptions


def rng_states(device: torch.device) -> dict:
    """Torch (CPU and CUDA), NumPy and Python RNG states as tensors and plain values (weights_only-safe)."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device).cpu() if device.type == "cuda" else None,
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos), "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss),
        "python_version": py_version, "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": py_gauss,
    }


def set_rng_states(s: dict, device: torch.device) -> None:
    torch.set_rng_state(s["torch"])
    if device.type == "cuda" and s["cuda"] is not None:
        torch.cuda.set_rng_state(s["cuda"], device)
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), s["numpy_pos"],
                         s["numpy_has_gauss"], s["numpy_gauss"]))
    random.setstate((s["python_version"], tuple(s["python_state"].tolist()), s["python_gauss"]))


def new_history() -> dict:
    """The seed's per-evaluation keys, plus when each evaluation happened and every logged train step.

    One train-loss definition everywhere (console, plot, both keys): the token-weighted mean loss
    over the steps since the previous log point (``--log-interval``); ``train_losses[i]`` is that
    figure at evaluation i.
    """
    return {
        "train_losses": [], "train_accuracies": [], "val_losses": [], "val_accuracies": [],
        "val_perplexities": [], "val_steps": [], "val_tokens": [],
        "train_log": {"steps": [], "tokens": [], "losses": [], "accuracies": []},
    }


class TrainState:
    """Everything a resumable checkpoint holds: the weights, optimizer and scaler, this rank's data
    position and RNG streams, the step and token counters, early-stopping bookkeeping, the history,
    and which data the run trains on (``data``: source, tokenizer hash, split sizes).

    ``checkpoint(gather)`` builds the checkpoint dict (a collective under DDP: ``gather`` collects one
    object from every rank); ``restore(ckpt)`` puts a checkpoint back. Both the best-model and the
    last checkpoint have this form; ``model_state_dict`` + ``config`` is the seed's part.
    """

    def __init__(self, model: GPT2Model, optimizer, scaler, batches: TrainBatches, tc: TrainConfig,
                 opts: RunOptions, device: torch.device, data: dict):
        self.model, self.optimizer, self.scaler, self.batches = model, optimizer, scaler, batches
        self.tc, self.opts, self.device, self.data = tc, opts, device, data
        self.step = 0  # optimizer steps taken
        self.tokens_seen = 0  # training tokens over all ranks
        self.best_val = math.inf  # best validation loss so far
        self.bad_evals = 0  # evaluations since the best one (early stopping)
        self.history = new_history()

    def checkpoint(self, gather: Callable[[object], list]) -> dict:
        batches = gather(self.batches.state_dict())
        rng = gather(rng_states(self.device))
        return {
            "model_state_dict": self.model.state_dict(), "config": self.model.config.to_dict(),
            "train_config": asdict(self.tc), "run_options": asdict(self.opts), "data": self.data,
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "step": self.step, "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val, "bad_evals": self.bad_evals, "history": self.history,
            "batches": batches, "rng": rng, "world_size": len(batches),
        }

    def restore(self, ck: dict, rank: int) -> None:
        """Load a checkpoint written by ``checkpoint``; raises KeyError/ValueError/... if it does not fit."""
        self.model.load_state_dict(ck["model_state_dict"])
        self.optimizer.load_state_dict(ck["optimizer"])
        use_float_lr(self.optimizer)  # as built; a --cuda-graph run makes them tensors again (after this)
        self.scaler.load_state_dict(ck["scaler"])
        self.batches.load_state_dict(ck["batches"][rank])
        set_rng_states(ck["rng"][rank], self.device)
        self.step, self.tokens_seen = ck["step"], ck["tokens_seen"]
        self.best_val, self.bad_evals, self.history = ck["best_val_loss"], ck["bad_evals"], ck["history"]


def data_identity(meta: dict) -> dict:
    """What identifies a run's data in its checkpoint, wherever the files are now: the tokenizer,
    the split mode and sizes, the source files' hashes (``source``, the path then, is for messages)."""
    fingerprint = meta.get("fingerprint")
    hashes = [f["sha256"] for f in fingerprint] if isinstance(fingerprint, list) else fingerprint
    return {"source": meta.get("source"), "tokenizer_hash": meta.get("tokenizer_hash"),
            "test_split": meta.get("test_split"), "tokens": meta.get("tokens"), "sha256": hashes}


def same_data(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "source"} == {k: v for k, v in b.items() if k != "source"}
