"""Checkpoints: atomic writes, weights-only loading, one-line errors for bad files."""

import os
import pickle
import threading

import pytest
import torch

from gpt import GPT2Model, GPTConfig
import gpt.checkpoint
from gpt.checkpoint import (BackgroundWriter, CheckpointError, WriteError, atomic_write, load_checkpoint, load_model,
                            save_checkpoint)

from conftest import FullDisk

SMALL = GPTConfig(vocab_size=50, max_seq_length=8, num_layers=1, num_heads=2, d_model=16, d_ff=32)


def test_round_trip(tmp_path):
    model = GPT2Model(SMALL)
    save_checkpoint({"model_state_dict": model.state_dict(), "config": SMALL.to_dict()}, tmp_path / "c.pt")
    again = load_model(tmp_path / "c.pt")
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


class _Unpicklable:
    def __reduce__(self):
        raise pickle.PicklingError("refuses to be pickled")


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"model_state_dict": {}, "config": SMALL.to_dict()}, path)
    before = path.read_bytes()
    with pytest.raises(pickle.PicklingError, match="refuses"):
        save_checkpoint({"bad": _Unpicklable()}, path)  # fails mid-write
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def fill_disk(monkeypatch, room: int) -> None:
    """Every later ``atomic_write`` writes to a disk with ``room`` bytes free."""
    real = gpt.checkpoint._Recorded.__init__
    monkeypatch.setattr(gpt.checkpoint._Recorded, "__init__", lambda self, f: real(self, FullDisk(f, room)))


@pytest.mark.parametrize("room", [0, 100, 5000])
def test_a_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch, room):
    """torch.save itself turns the OS's ENOSPC into a RuntimeError about zip positions; the write
    names the file and the cause instead, and leaves the earlier checkpoint and no temp file."""
    path = tmp_path / "c.pt"
    save_checkpoint({"model_state_dict": {}, "config": SMALL.to_dict()}, path)
    before = path.read_bytes()
    fill_disk(monkeypatch, room)
    big = {"model_state_dict": GPT2Model(SMALL).state_dict(), "config": SMALL.to_dict()}
    with pytest.raises(WriteError) as e:
        save_checkpoint(big, path)
    assert str(e.value) == f"cannot write {path}: No space left on device; the previous c.pt is untouched"
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    with pytest.raises(WriteError, match=r"^cannot write .*new\.json: No space left on device$"):
        atomic_write(tmp_path / "new.json", lambda f: f.write(b"{}" * 4000))  # no earlier file
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_background_writes_a_snapshot_while_the_caller_goes_on(tmp_path, monkeypatch):
    """``BackgroundWriter.save`` returns while the write is still going: what it writes is ``obj`` as
    it was at the call (the caller changes its tensors and lists right after, as training does),
    to every path in order; the next save waits for that write."""
    release, written = threading.Event(), []
    real = gpt.checkpoint.save_checkpoint

    def slow(obj, path):
        assert release.wait(10)
        written.append(path.name)
        real(obj, path)

    monkeypatch.setattr(gpt.checkpoint, "save_checkpoint", slow)
    weights, history = torch.zeros(4), [1.0]
    writer = BackgroundWriter()
    writer.save({"w": weights, "history": history, "step": 3}, tmp_path / "best.pt", tmp_path / "last.pt")
    weights += 7
    history.append(2.0)
    assert written == [] and not (tmp_path / "last.pt").exists()  # still writing, the caller already on
    release.set()
    writer.save({"w": weights, "history": history, "step": 4}, tmp_path / "last.pt")  # waits for the first
    assert written[:2] == ["best.pt", "last.pt"]
    writer.wait()
    assert written == ["best.pt", "last.pt", "last.pt"]
    best, last = (torch.load(tmp_path / name, weights_only=True) for name in ("best.pt", "last.pt"))
    assert torch.equal(best["w"], torch.zeros(4)) and best["history"] == [1.0] and best["step"] == 3
    assert torch.equal(last["w"], torch.full((4,), 7.0)) and last["history"] == [1.0, 2.0]


def test_a_background_write_error_is_raised_by_the_next_save_or_wait(tmp_path):
    """A write that fails (here: its directory is a file) raises its one-line ``WriteError`` in the
    caller at the next ``wait`` (or ``save``), once; ``wait(raise_error=False)`` drops it."""
    (tmp_path / "file").write_text("x")
    writer = BackgroundWriter()
    writer.save({"step": 1}, tmp_path / "file" / "last.pt")
    with pytest.raises(WriteError, match=f"cannot write {tmp_path / 'file' / 'last.pt'}"):
        writer.wait()
    writer.wait()  # raised once
    writer.save({"step": 2}, tmp_path / "file" / "last.pt")
    with pytest.raises(WriteError):
        writer.save({"step": 3}, tmp_path / "ok.pt")
    assert not (tmp_path / "ok.pt").exists()  # the save that raised queued nothing
    writer.save({"step": 4}, tmp_path / "file" / "last.pt")
    writer.wait(raise_error=False)
    writer.save({"step": 5}, tmp_path / "ok.pt")
    writer.wait()
    assert torch.load(tmp_path / "ok.pt", weights_only=True)["step"] == 5


def test_a_directory_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(WriteError, match=r"^cannot write .*file/sub/c\.pt: Not a directory$"):
        save_checkpoint({"model_state_dict": {}, "config": SMALL.to_dict()}, tmp_path / "file" / "sub" / "c.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("content,match", [
    (b"", "not a loadable"),
    (b"garbage" * 10, "not a loadable"),
])
def test_corrupt_files(tmp_path, content, match):
    (tmp_path / "c.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path / "c.pt")


def test_code_running_pickle_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model_state_dict": _Evil(), "config": {}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a loadable"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_foreign_and_missing(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="python train.py"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"model_state_dict": {}, "config": {"d_model": 5, "num_heads": 2}}, tmp_path / "badcfg.pt")
    with pytest.raises(CheckpointError, match="invalid model config"):
        load_checkpoint(tmp_path / "badcfg.pt")
