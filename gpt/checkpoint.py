"""Run outputs written atomically (checkpoints on a background thread: ``BackgroundWriter``), and
checkpoints read with ``weights_only=True`` and one-line errors."""

from __future__ import annotations

import copy
import os
import pickle
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from .config import GPTConfig
from .errors import UserError, one_line


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, or not one of ours. The message is one line for the user."""


class WriteError(UserError):
    """A run output could not be written (disk full, no permission, ...): one line; the file it was
    to replace is untouched."""


class _Recorded:
    """A file's ``write`` that remembers the OS error it raised: ``torch.save`` reports a full disk
    as a RuntimeError about zip positions ("unexpected pos 704 vs 598"), the cause lost."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace ``path`` with what ``write(file)`` writes: a temp file in the same directory,
    flushed to disk, then renamed over ``path``. A crash or Ctrl-C mid-write leaves the previous
    file untouched and no temp file behind. The file gets the usual permissions of a new file.
    An OS error on the way (a full disk, no permission) is a ``WriteError`` naming ``path`` and
    the cause; any other exception (``write``'s own) passes through as it is.
    """
    path = Path(path)
    tmp, recorded = None, None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            recorded = _Recorded(f)
            write(recorded)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = recorded.error if recorded is not None and recorded.error is not None else e
        if isinstance(cause, OSError):
            kept = f"; the previous {path.name} is untouched" if path.exists() else ""
            raise WriteError(f"cannot write {path}: {cause.strerror or one_line(cause)}{kept}") from None
        raise


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically (see ``atomic_write``)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def host_copy(obj):
    """A copy of ``obj`` (nested dicts, lists and tuples) that training cannot change under a writer
    thread: every tensor copied to the CPU (a GPU's copy waits for the work queued before it), every
    other value deep-copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return copy.deepcopy(obj)


class BackgroundWriter:
    """Checkpoint writes on a thread of their own, one at a time, so that training goes on meanwhile.

    ``save(obj, path, ...)`` copies ``obj`` to host memory (``host_copy``: the only part the caller
    waits for, tens of ms for a few hundred MB from a GPU) and returns; the thread then writes it to
    each path in turn with ``save_checkpoint`` (atomic, fsynced). On an H200 the seed preset's 537 MB
    checkpoints took about 1 s a file (run 3: 4.9 s for two evaluations of 8 forwards, each writing
    two files), longer than the 100 captured steps between two ``last.pt`` writes. A write's error
    (a full disk: ``WriteError``'s one line) is raised by the next ``save`` or ``wait``; the file it
    was replacing stays untouched.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, obj: dict, *paths: str | os.PathLike) -> None:
        self.wait()
        host = host_copy(obj)
        self._thread = threading.Thread(target=self._write, args=(host, [Path(p) for p in paths]),
                                        name="checkpoint-writer")  # not a daemon: exiting waits for the write
        self._thread.start()

    def _write(self, obj: dict, paths: list[Path]) -> None:
        try:
            for path in paths:
                save_checkpoint(obj, path)
        except BaseException as e:  # raised in the training thread by the next save or wait
            self._error = e

    def wait(self, raise_error: bool = True) -> None:
        """Block until the pending write has ended; raise its error unless told not to."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load one of our checkpoints safely (no code runs: ``weights_only=True``) and check its shape.

    Returns the dict with ``model_state_dict`` and ``config`` (a plain dict), plus whatever else was
    saved. Raises ``CheckpointError`` with a one-line message on any problem.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}; train one first with `python train.py`")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises retrying with weights_only=False, which runs the file's code: not ours to give.
        raise CheckpointError(f"{path} is not a loadable checkpoint of this project: it is not a torch file, or it "
                              f"holds Python objects that a weights-only load refuses to run") from None
    except PermissionError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror}") from None
    except Exception as e:  # torch.load fails on foreign bytes in many ways (zip, EOF, index, OS errors)
        raise CheckpointError(f"{path} is not a loadable checkpoint of this project: corrupt or truncated "
                              f"({type(e).__name__})") from None
    if not isinstance(obj, dict) or "model_state_dict" not in obj or "config" not in obj:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no model_state_dict/config)")
    try:
        GPTConfig.from_dict(obj["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has an invalid model config: {e}") from None
    return obj


def load_model(path: str | os.PathLike, map_location="cpu", impl: str = "auto"):
    """A ``GPT2Model`` with the weights of checkpoint ``path``."""
    return model_of(load_checkpoint(path, map_location), path, impl).to(map_location)


def model_of(ckpt: dict, path: str | os.PathLike, impl: str = "auto"):
    """The ``GPT2Model`` of a checkpoint ``load_checkpoint`` read from ``path`` (named in errors)."""
    from .model import GPT2Model

    model = GPT2Model.uninitialized(GPTConfig.from_dict(ckpt["config"]), impl=impl)
    try:
        model.load_state_dict(ckpt["model_state_dict"])  # strict: every weight gets its value
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the stored config: {one_line(e)}") from None
    return model
