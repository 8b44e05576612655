"""gpt.data: exact, once-only tokenization of TinyStories into cached splits, and the batches over them."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gpt.data as data_mod
from gpt.data import DataError, TrainBatches, eval_batches, main, prepare_data
from gpt.tokenizer import EOS_ID, get_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return get_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def records(stories_dir):
    with open(stories_dir / "tinystories-sample.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def texts(records):
    return [r["text"] for r in records]


@pytest.fixture(scope="module")
def story_ids(tok, texts):
    return [ids + [EOS_ID] for ids in tok.encode_batch(texts)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def full(stories_dir, tok, cache):
    return prepare_data(stories_dir / "tinystories-sample.jsonl", tok, cache, num_stories=0, progress=False)


def packed(story_ids):
    return np.array([t for ids in story_ids for t in ids], dtype=np.uint16)


def write_txt(path, stories, newline="\n"):
    path.write_bytes("".join(f"{s}\n<|endoftext|>\n" for s in stories).replace("\n", newline).encode())
    return path


def write_jsonl(path, stories, **fields):
    path.write_text("".join(json.dumps({"text": s, **fields}) + "\n" for s in stories), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------
# Splits of the shared sample


def test_seed_split_sizes_and_exact_tokens(full, story_ids):
    m = full.meta
    assert m["stories"] == {"train": 6090, "val": 1740, "test": 870}
    assert m["stories_read"] == 8700 and m["skipped"] == {}
    for name in ("train", "val", "test"):
        arr = getattr(full, name)
        assert isinstance(arr, np.memmap) and arr.dtype == np.uint16 and arr.ndim == 1
        assert len(arr) == m["tokens"][name] and arr[-1] == EOS_ID
    # The splits, in order, are every story's tokens once, each followed by EOS, split by story 70/20/10.
    assert np.array_equal(np.concatenate([full.train, full.val, full.test]), packed(story_ids))
    assert np.array_equal(full.val, packed(story_ids[6090:7830]))
    assert np.array_equal(full.test, packed(story_ids[7830:]))


@pytest.mark.parametrize("ci", ["true", ""])
def test_missing_shared_data_fails_in_ci_and_skips_elsewhere(ci, tmp_path):
    env = {**os.environ, "CI": ci, "TINYSTORIES_DIR": str(tmp_path / "missing")}
    test = "tests/test_data.py::test_seed_split_sizes_and_exact_tokens"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    if ci:
        assert run.returncode == 1 and "CI must run the data tests" in run.stdout, run.stdout
    else:
        assert run.returncode == 0 and "1 skipped" in run.stdout, run.stdout


def test_seed_test_split_holds_only_official_validation_stories(full, records, story_ids):
    """The sample ends with official validation stories, so the seed's last 10% is exactly those."""
    val = [ids for ids, r in zip(story_ids, records) if "validation" in r["split"]]
    assert len(val) >= 870
    assert np.array_equal(full.test, packed(val[-870:]))


def test_txt_and_jsonl_give_identical_tokens(full, stories_dir, tok, cache):
    txt = prepare_data(stories_dir / "tinystories-sample.txt", tok, cache, num_stories=0, progress=False)
    assert txt.path != full.path
    for name in ("train", "val", "test"):
        assert np.array_equal(getattr(txt, name), getattr(full, name))


def test_num_stories_takes_the_first_n(stories_dir, tok, cache, story_ids):
    s = prepare_data(stories_dir / "tinystories-sample.jsonl", tok, cache, num_stories=1000, progress=False)
    assert s.meta["stories"] == {"train": 700, "val": 200, "test": 100}
    assert np.array_equal(np.concatenate([s.train, s.val, s.test]), packed(story_ids[:1000]))


def test_official_split_uses_validation_stories_as_test(stories_dir, tok, cache, records, story_ids):
    s = prepare_data(stories_dir / "tinystories-sample.jsonl", tok, cache, num_stories=0, test_split="official",
                     progress=False)
    is_val = ["validation" in r["split"] for r in records]
    rest = [ids for ids, v in zip(story_ids, is_val) if not v]
    assert s.meta["stories"] == {"train": len(rest) * 7 // 9, "val": len(rest) - len(rest) * 7 // 9, "test": 996}
    assert np.array_equal(s.test, packed([ids for ids, v in zip(story_ids, is_val) if v]))
    assert np.array_equal(np.concatenate([s.train, s.val]), packed(rest))


def test_official_split_needs_labels(tmp_path, tok, texts):
    with pytest.raises(DataError, match="official validation split"):
        prepare_data(write_txt(tmp_path / "train.txt", texts[:20]), tok, tmp_path / "c", 0, "official", False)


# ---------------------------------------------------------------------------------------------------
# The cache


def test_cache_is_reused_without_tokenizing(full, stories_dir, tok, cache):
    class NoEncode:
        hash = tok.hash

        def encode_batch(self, texts):
            raise AssertionError("re-tokenized a cached source")

    mtime = os.stat(full.path / "stories.bin").st_mtime_ns
    again = prepare_data(stories_dir / "tinystories-sample.jsonl", NoEncode(), cache, num_stories=0, progress=False)
    assert again.path == full.path and again.meta == full.meta
    assert np.array_equal(again.train, full.train)
    assert os.stat(full.path / "stories.bin").st_mtime_ns == mtime


def test_cache_invalidated_when_source_changes(tmp_path, tok, texts):
    src = write_jsonl(tmp_path / "s.jsonl", texts[:10])
    first = prepare_data(src, tok, tmp_path / "c", 0, progress=False)
    write_jsonl(src, texts[:9] + [texts[10]])  # same story count, different last story
    second = prepare_data(src, tok, tmp_path / "c", 0, progress=False)
    assert second.path != first.path
    assert np.array_equal(second.test, packed([ids + [EOS_ID] for ids in tok.encode_batch([texts[10]])]))
    assert first.path.is_dir()  # earlier output is left alone


def test_incomplete_cache_is_rebuilt_and_no_temp_left(tmp_path, tok, texts):
    src = write_jsonl(tmp_path / "s.jsonl", texts[:10])
    first = prepare_data(src, tok, tmp_path / "c", 0, progress=False)
    (first.path / "stories.bin").write_bytes(b"\0\0")  # truncated by a crash
    second = prepare_data(src, tok, tmp_path / "c", 0, progress=False)
    assert second.path == first.path and len(second.val) == first.meta["tokens"]["val"]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [first.path.name]


def test_a_cache_that_cannot_be_written_is_one_line(tmp_path, tok, texts, monkeypatch):
    """A full disk while tokenizing, or a cache directory that cannot be made: a one-line DataError
    naming the cache, no temp directory left, earlier cache entries untouched."""
    src = write_jsonl(tmp_path / "s.jsonl", texts[:10])
    first = prepare_data(src, tok, tmp_path / "c", 0, progress=False)
    write_jsonl(src, texts[:12])  # another source: a new cache entry

    def full_disk(self, batch):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(data_mod._TokenWriter, "write", full_disk)
    with pytest.raises(DataError, match=f"^cannot write the token cache in {tmp_path / 'c'}: No space left on device$"):
        prepare_data(src, tok, tmp_path / "c", 0, progress=False)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [first.path.name]
    monkeypatch.undo()
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match=f"^cannot write the token cache in {tmp_path / 'file' / 'c'}: Not a directory$"):
        prepare_data(src, tok, tmp_path / "file" / "c", 0, progress=False)


def test_deterministic(tmp_path, tok, texts):
    src = write_jsonl(tmp_path / "s.jsonl", texts[:30])
    a = prepare_data(src, tok, tmp_path / "a", 0, progress=False)
    b = prepare_data(src, tok, tmp_path / "b", 0, progress=False)
    assert sorted(p.name for p in a.path.iterdir()) == ["meta.json", "stories.bin"]
    assert (a.path / "stories.bin").read_bytes() == (b.path / "stories.bin").read_bytes()
    assert a.meta["layout"] == b.meta["layout"]


# ---------------------------------------------------------------------------------------------------
# Other forms of the source


def test_crlf_txt_and_parquet_match_jsonl(tmp_path, tok, texts):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    stories = texts[:20]
    ref = prepare_data(write_jsonl(tmp_path / "s.jsonl", stories), tok, tmp_path / "c", 0, progress=False)
    pq.write_table(pa.table({"text": stories}), tmp_path / "s.parquet")
    crlf = write_txt(tmp_path / "s.txt", stories, newline="\r\n")
    for src in (tmp_path / "s.parquet", crlf):
        other = prepare_data(src, tok, tmp_path / "c", 0, progress=False)
        assert other.meta["stories"] == ref.meta["stories"]
        assert np.array_equal(np.concatenate([other.train, other.val, other.test]),
                              np.concatenate([ref.train, ref.val, ref.test]))


def test_directory_reads_files_in_name_order(tmp_path, tok, texts):
    d = tmp_path / "d"
    d.mkdir()
    write_jsonl(d / "b.jsonl", texts[10:20])
    write_jsonl(d / "a.jsonl", texts[:10])
    (d / "README.md").write_text("not data")
    s = prepare_data(d, tok, tmp_path / "c", 0, progress=False)
    assert np.array_equal(np.concatenate([s.train, s.val, s.test]),
                          packed([ids + [EOS_ID] for ids in tok.encode_batch(texts[:20])]))


# ---------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("empty", "is empty"),
    ("separators only", "no stories found .*2 empty story"),
    ("bad utf-8", r"bad\.txt:3: invalid UTF-8"),
    ("unknown extension", "unknown file type '.csv'"),
    ("too few", "too few"),
    ("mixed directory", "mixes .jsonl, .txt"),
    ("all lines bad", 'no stories found .*1 line is not JSON, 1 no "text" string'),
])
def test_bad_input_is_a_one_line_data_error(tmp_path, tok, texts, case, match):
    path = {
        "missing": lambda: tmp_path / "nope.jsonl",
        "empty": lambda: write_txt(tmp_path / "e.txt", []),
        "separators only": lambda: write_txt(tmp_path / "s.txt", ["", "  "]),
        "bad utf-8": lambda: tmp_path / "bad.txt",
        "unknown extension": lambda: tmp_path / "s.csv",
        "too few": lambda: write_jsonl(tmp_path / "few.jsonl", texts[:2]),
        "mixed directory": lambda: tmp_path / "mixed",
        "all lines bad": lambda: tmp_path / "bad.jsonl",
    }[case]()
    (tmp_path / "bad.txt").write_bytes(b"ok story\n<|endoftext|>\nbroken \xff byte\n<|endoftext|>\n")
    (tmp_path / "bad.jsonl").write_text('{"text": 1\n{"title": "no text"}\n')
    (tmp_path / "s.csv").write_text("text\nhello\n")
    (tmp_path / "mixed").mkdir()
    write_jsonl(tmp_path / "mixed" / "a.jsonl", texts[:10])
    write_txt(tmp_path / "mixed" / "a.txt", texts[:10])
    with pytest.raises(DataError, match=match) as err:
        prepare_data(path, tok, tmp_path / "c", 0, progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_bad_jsonl_lines_are_counted_not_silently_dropped(tmp_path, tok, texts, capsys):
    src = tmp_path / "s.jsonl"
    lines = [json.dumps({"text": t}) for t in texts[:10]]
    lines[3:3] = ["not json", json.dumps({"title": "x"}), json.dumps({"text": "   "}), "", json.dumps(["a"])]
    src.write_text("\n".join(lines) + "\n")
    s = prepare_data(src, tok, tmp_path / "c", 0, progress=False)
    assert s.meta["stories_read"] == 10 and sum(s.meta["stories"].values()) == 10
    assert s.meta["skipped"] == {"line is not JSON": 1, 'no "text" string': 2, "empty story": 1}
    assert s.meta["skipped_examples"]["line is not JSON"] == [f"{src}:4"]
    err = capsys.readouterr().err
    assert "skipped: 1 empty story, 1 line is not JSON, 2 no \"text\" string" in err
    assert np.array_equal(np.concatenate([s.train, s.val, s.test]),
                          packed([ids + [EOS_ID] for ids in tok.encode_batch(texts[:10])]))


def test_cli(tmp_path, tokenizer_dir, texts, capsys):
    src = write_jsonl(tmp_path / "s.jsonl", texts[:40])
    args = ["--data", str(src), "--tokenizer", str(tokenizer_dir), "--cache-dir", str(tmp_path / "c"), "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "train:        28 stories" in out and str(tmp_path / "c") in out
    assert main(["--data", str(tmp_path / "nope.txt"), "--tokenizer", str(tokenizer_dir)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "nope.txt" in err
    assert main(["--data", str(src), "--tokenizer", str(tmp_path)]) == 1
    assert "does not hold vocab.json" in capsys.readouterr().err


def test_cli_as_the_readme_runs_it(tmp_path, tokenizer_dir, texts):
    """`python -m gpt.data ...` in a process of its own: its table and nothing on stderr (the package
    once imported gpt.data itself, and runpy warned that it was imported already)."""
    src = write_jsonl(tmp_path / "s.jsonl", texts[:40])
    out = subprocess.run([sys.executable, "-m", "gpt.data", "--data", str(src), "--tokenizer", str(tokenizer_dir),
                          "--cache-dir", str(tmp_path / "c"), "--quiet"],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == "" and "train:        28 stories" in out.stdout, out.stderr


# ---------------------------------------------------------------------------------------------------
# Batches


def test_eval_windows_cover_every_target_once(full):
    tokens = full.test
    for context, batch_size in [(64, 1), (64, 7), (100, 1000), (1, 5000)]:
        xs, ys = zip(*eval_batches(tokens, context, batch_size))
        assert all(x.shape == y.shape and x.shape[1] == context and x.dtype == torch.int64 for x, y in zip(xs, ys))
        x, y = torch.cat(xs).flatten(), torch.cat(ys).flatten()
        real = y >= 0
        # Targets, in order, are tokens[1:]; each is predicted from tokens[:i] within its window.
        assert torch.equal(y[real], torch.from_numpy(tokens[1:].astype(np.int64)))
        assert torch.equal(x[real], torch.from_numpy(tokens[:-1].astype(np.int64)))
        assert real[: len(tokens) - 1].all() and not real[len(tokens) - 1 :].any()
        assert (x[~real] == 0).all()


def test_eval_max_tokens_caps_targets(full):
    tokens = full.val
    ys = [y for _, y in eval_batches(tokens, 64, 3, max_tokens=1000)]
    y = torch.cat(ys).flatten()
    assert len(ys) == 6 and torch.equal(y[y >= 0], torch.from_numpy(tokens[1:1001].astype(np.int64)))
    with pytest.raises(ValueError):
        next(eval_batches(tokens[:1], 64, 3))


def test_train_batches_windows_and_determinism(full):
    tokens = full.train
    a = TrainBatches(tokens, 4, 32, seed=1)
    x, y = a.next()
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    flat = tokens.astype(np.int64)
    for row_x, row_y in zip(x, y):  # each row is one contiguous window of the stream
        starts = np.flatnonzero(flat[: len(flat) - 32] == int(row_x[0]))
        assert any(np.array_equal(flat[s : s + 33], np.r_[row_x.numpy(), row_y[-1].item()]) for s in starts)
    b = TrainBatches(tokens, 4, 32, seed=1)
    assert torch.equal(b.next()[0], x)
    assert not torch.equal(TrainBatches(tokens, 4, 32, seed=2).next()[0], x)
    assert not torch.equal(TrainBatches(tokens, 4, 32, seed=1, rank=1, world_size=2).next()[0], x)


def test_train_batches_ranks_share_one_global_sequence(full):
    """W ranks drawing A batches each see exactly the A * W batches one process draws, interleaved."""
    single = TrainBatches(full.train, 2, 16, seed=3)
    expected = [single.next()[0] for _ in range(6)]
    for rank in range(3):
        mine = TrainBatches(full.train, 2, 16, seed=3, rank=rank, world_size=3)
        for g in (rank, rank + 3):
            assert torch.equal(mine.next()[0], expected[g])


def test_train_batches_resume(full, tmp_path):
    a = TrainBatches(full.train, 3, 16, seed=7, rank=1, world_size=4)
    for _ in range(5):
        a.next()
    torch.save({"batches": a.state_dict()}, tmp_path / "state.pt")
    expected = [a.next() for _ in range(3)]
    b = TrainBatches(full.train, 3, 16, seed=0, rank=1, world_size=4)
    b.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["batches"])
    for (ex, ey), (gx, gy) in zip(expected, [b.next() for _ in range(3)]):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)
    with pytest.raises(ValueError, match="batch_size"):
        TrainBatches(full.train, 5, 16, seed=7).load_state_dict(a.state_dict())


def test_train_batches_short_stream():
    with pytest.raises(ValueError, match="context"):
        TrainBatches(np.arange(16, dtype=np.uint16), 2, 16, seed=0)
    x, y = TrainBatches(np.arange(17, dtype=np.uint16), 2, 16, seed=0).next()
    assert torch.equal(x[0], torch.arange(16)) and torch.equal(y[1], torch.arange(1, 17))


# ---------------------------------------------------------------------------------------------------
# The hub source (datasets.load_dataset replaced by a fake: no network here)


@pytest.fixture
def fake_hub(monkeypatch, texts):
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        if name != "roneneldan/TinyStories":
            raise ValueError(name)
        rows = {"train": texts[:40] + [""], "validation": texts[100:105]}[split]
        return ({"text": t} for t in rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(data_mod, "hub_unreachable", lambda: None)  # no probe of the real hub
    return calls


def test_hub_seed_protocol_and_offline_reuse(fake_hub, tmp_path, tok, texts, monkeypatch):
    s = prepare_data(None, tok, tmp_path / "c", num_stories=20, progress=False)
    assert fake_hub == [("roneneldan/TinyStories", "train", True)]
    assert s.meta["stories"] == {"train": 14, "val": 4, "test": 2} and s.meta["source"] == "hub:roneneldan/TinyStories"
    assert np.array_equal(np.concatenate([s.train, s.val, s.test]),
                          packed([ids + [EOS_ID] for ids in tok.encode_batch(texts[:20])]))
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub consulted for a cached split"))
    assert prepare_data(None, tok, tmp_path / "c", num_stories=20, progress=False).path == s.path


def test_hub_official_split_and_skips(fake_hub, tmp_path, tok, texts):
    s = prepare_data(None, tok, tmp_path / "c", num_stories=0, test_split="official", progress=False)
    assert [c[1] for c in fake_hub] == ["train", "validation"]
    assert s.meta["stories"] == {"train": 31, "val": 9, "test": 5} and s.meta["skipped"] == {"empty story": 1}
    assert np.array_equal(s.test, packed([ids + [EOS_ID] for ids in tok.encode_batch(texts[100:105])]))


def test_hub_unreachable(monkeypatch, tmp_path, tok):
    datasets = pytest.importorskip("datasets")

    def load_dataset(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DataError, match="cannot load roneneldan/TinyStories .*--data PATH"):
        prepare_data(None, tok, tmp_path / "c", num_stories=20, progress=False)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
