"""TinyStories, tokenized once into packed uint16 token files, and the batches drawn from them.

``prepare_data`` reads stories (the Hugging Face hub, or local .txt / .jsonl / .parquet files), keeps
their text exactly, appends EOS (50256) after every story, splits by story in order (70/20/10, or the
official validation split as test) and writes ``train.bin`` / ``val.bin`` / ``test.bin`` + ``meta.json``
under ``cache_dir/<key>/``. The key covers the source's fingerprint, the story count, the split mode
and the tokenizer, so a re-run reuses the files and a changed source is re-tokenized.

``TrainBatches`` draws random windows from the packed train stream (no padding); ``eval_batches``
walks a split in non-overlapping windows so that every token is scored exactly once.

    python -m gpt.data --data PATH [--tokenizer DIR] [--num-stories N] [--cache-dir D] [--test-split seed|official]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from gpt.tokenizer import EOS_ID, EOS_TOKEN, TokenizerNotFound, get_tokenizer

HUB_DATASET = "roneneldan/TinyStories"
EXTENSIONS = (".txt", ".jsonl", ".parquet")
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1  # bump when the cache layout or the story parsing changes
FULL_HASH_BYTES = 16 << 20  # files up to this size are hashed whole; larger ones by first + last MiB
CHUNK_STORIES = 4096  # stories per tokenizer batch
MAX_EXAMPLES = 5  # skipped-story locations kept per reason


class DataError(ValueError):
    """Unusable data source or data: the message is one line, fit to show a user as is."""


@dataclass
class TokenSplits:
    train: np.ndarray  # (n_train,) uint16 memmap: stories packed, EOS after every story
    val: np.ndarray  # (n_val,) uint16 memmap
    test: np.ndarray  # (n_test,) uint16 memmap
    meta: dict = field(default_factory=dict)  # counts, fingerprint, tokenizer hash, skips; see prepare_data
    path: Path | None = None  # the cache directory holding the .bin files


# ---------------------------------------------------------------------------------------------------
# Reading stories


@dataclass
class _Story:
    text: str
    official_val: bool  # labelled as the official validation split (split field, or file name)


class _Skips:
    """Stories not used, counted by reason, with the first few locations of each."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(where)


def _is_official_val(label) -> bool:
    """True for split labels naming the validation split; merged labels like "train+validation" count."""
    return isinstance(label, str) and any(p.strip() in ("validation", "valid") for p in label.split("+"))


def _decode_line(raw: bytes, path: Path, lineno: int) -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start} of the line") from None
    if lineno == 1 and line.startswith("\ufeff"):
        line = line[1:]
    return line[:-1] if line.endswith("\n") else line


def _read_txt(path: Path, skips: _Skips) -> Iterator[_Story]:
    """Official format: stories separated by lines holding only <|endoftext|>. CRLF reads as LF."""
    official = "valid" in path.name.lower()
    lines: list[str] = []
    start = 1
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode_line(raw, path, lineno)
            line = line[:-1] if line.endswith("\r") else line
            if line.strip() != EOS_TOKEN:
                lines.append(line)
                continue
            text = "\n".join(lines)
            if text.strip():
                yield _Story(text, official)
            else:
                skips.add("empty story", f"{path}:{start}")
            lines, start = [], lineno + 1
    text = "\n".join(lines)
    if text.strip():  # a last story without a closing separator; trailing blank lines are no story
        yield _Story(text, official)


def _read_jsonl(path: Path, skips: _Skips, labels_seen: list) -> Iterator[_Story]:
    """One JSON object per line with a "text" string; an optional "split" labels official validation."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode_line(raw, path, lineno)
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                skips.add("line is not JSON", where)
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                skips.add('no "text" string', where)
                continue
            if not obj["text"].strip():
                skips.add("empty story", where)
                continue
            if "split" in obj:
                labels_seen.append(True)
            yield _Story(obj["text"], _is_official_val(obj.get("split")) if "split" in obj else False)


def _read_parquet(path: Path, skips: _Skips, labels_seen: list) -> Iterator[_Story]:
    """A "text" column; an optional "split" column, else a file name containing "valid", labels validation."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for files that are not parquet
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__})") from None
    names = pf.schema_arrow.names
    if "text" not in names:
        raise DataError(f'{path}: no "text" column (columns: {", ".join(names)})')
    has_split = "split" in names
    if has_split or "valid" in path.name.lower():
        labels_seen.append(True)
    row = 0
    for batch in pf.iter_batches(columns=["text", "split"] if has_split else ["text"]):
        cols = batch.to_pydict()
        splits = cols["split"] if has_split else [None] * len(cols["text"])
        for text, label in zip(cols["text"], splits):
            row += 1
            if not isinstance(text, str) or not text.strip():
                skips.add("empty story", f"{path}:row {row}")
                continue
            yield _Story(text, _is_official_val(label) if has_split else "valid" in path.name.lower())


def _source_files(source: Path) -> list[Path]:
    if not source.exists():
        raise DataError(f"data source {source} does not exist")
    if source.is_file():
        if source.suffix.lower() not in EXTENSIONS:
            raise DataError(f"{source}: unknown file type {source.suffix!r} (use {', '.join(EXTENSIONS)})")
        files = [source]
    else:
        files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
        if not files:
            raise DataError(f"directory {source} holds no {', '.join(EXTENSIONS)} files")
        kinds = {p.suffix.lower() for p in files}
        if len(kinds) > 1:
            raise DataError(f"directory {source} mixes {', '.join(sorted(kinds))} files: pass one file or one format")
    for p in files:
        if p.stat().st_size == 0:
            raise DataError(f"{p} is empty")
    return files


def _read_files(files: list[Path], skips: _Skips, labels_seen: list) -> Iterator[_Story]:
    for p in files:
        suffix = p.suffix.lower()
        if suffix == ".txt":
            yield from _read_txt(p, skips)
        elif suffix == ".jsonl":
            yield from _read_jsonl(p, skips, labels_seen)
        else:
            yield from _read_parquet(p, skips, labels_seen)


def _read_hub(split: str, skips: _Skips) -> Iterator[_Story]:
    try:
        import datasets

        rows = iter(datasets.load_dataset(HUB_DATASET, split=split, streaming=True))
        first = next(rows, None)
    except Exception as e:  # offline, missing dataset, ...: datasets raises many types
        raise DataError(
            f"cannot load {HUB_DATASET} ({split}) from the Hugging Face hub ({type(e).__name__}): "
            f"pass local files with --data PATH"
        ) from None
    official = split == "validation"
    for i, row in enumerate(itertools.chain([] if first is None else [first], rows)):
        text = row.get("text")
        if isinstance(text, str) and text.strip():
            yield _Story(text, official)
        else:
            skips.add("empty story", f"hub {split} row {i}")


# ---------------------------------------------------------------------------------------------------
# Fingerprints and the cache


def _file_fingerprint(p: Path) -> dict:
    st = p.stat()
    h = hashlib.sha256()
    with p.open("rb") as f:
        if st.st_size <= FULL_HASH_BYTES:
            h.update(f.read())
        else:
            h.update(f.read(1 << 20))
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}


def _cache_key(fingerprint, num_stories: int, test_split: str, tokenizer_hash: str) -> str:
    blob = json.dumps([FORMAT_VERSION, fingerprint, num_stories, test_split, tokenizer_hash], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _load_cached(directory: Path) -> TokenSplits | None:
    """The splits in a finished cache directory, or None when it is missing or incomplete."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
        arrays = {}
        for name in SPLITS:
            path = directory / f"{name}.bin"
            if path.stat().st_size != 2 * meta["tokens"][name]:
                return None
            arrays[name] = np.memmap(path, dtype=np.uint16, mode="r")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return TokenSplits(arrays["train"], arrays["val"], arrays["test"], meta, directory)


def _split_counts(n: int, ratios: tuple[int, ...]) -> list[int]:
    """Story counts per part, in order, for integer ratios (e.g. 7:2:1); the last part takes the rest."""
    total = sum(ratios)
    counts = [n * r // total for r in ratios[:-1]]
    return counts + [n - sum(counts)]


class _TokenWriter:
    """Appends tokenized stories (plus EOS) to a .bin file; remembers each story's token count."""

    def __init__(self, path: Path):
        self.path = path
        self.file = path.open("wb")
        self.lengths: list[int] = []

    def write(self, batch: list[list[int]]) -> None:
        flat = [t for ids in batch for t in (*ids, EOS_ID)]
        np.asarray(flat, dtype=np.uint16).tofile(self.file)
        self.lengths.extend(len(ids) + 1 for ids in batch)

    def close(self) -> None:
        self.file.close()


def _copy_tokens(src: np.ndarray, dst: Path, chunk: int = 1 << 24) -> None:
    with dst.open("wb") as f:
        for i in range(0, len(src), chunk):
            np.asarray(src[i : i + chunk]).tofile(f)


# ---------------------------------------------------------------------------------------------------
# prepare_data


def prepare_data(
    source,
    tokenizer,
    cache_dir="data_cache",
    num_stories: int = 270_000,
    test_split: str = "seed",
    progress: bool = True,
) -> TokenSplits:
    """Tokenize TinyStories once (or reuse the cache) and return packed train/val/test token streams.

    source: None for the hub dataset roneneldan/TinyStories, or a .txt / .jsonl / .parquet file or a
    directory of one of those formats (files in name order). num_stories: use the first N stories
    (0 = all). test_split "seed": the N stories split 70/20/10 in order; "official": test is the official
    validation split and the first N other stories split 7:2 into train/val.
    """
    if test_split not in ("seed", "official"):
        raise DataError(f"test_split must be 'seed' or 'official', got {test_split!r}")
    if num_stories < 0:
        raise DataError(f"num_stories must be >= 0 (0 = all), got {num_stories}")
    files = None if source is None else _source_files(Path(source))
    fingerprint = f"hub:{HUB_DATASET}" if files is None else [_file_fingerprint(p) for p in files]
    cache_dir = Path(cache_dir)
    final = cache_dir / _cache_key(fingerprint, num_stories, test_split, tokenizer.hash)
    cached = _load_cached(final)
    if cached is not None:
        return cached

    skips, labels_seen = _Skips(), []
    if files is None:
        stories = _read_hub("train", skips)
    else:
        stories = _read_files(files, skips, labels_seen)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        meta = _tokenize(stories, files, tokenizer, tmp, num_stories, test_split, skips, labels_seen, progress)
        meta["source"] = "hub:" + HUB_DATASET if files is None else str(Path(source).resolve())
        meta["fingerprint"] = fingerprint
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    splits = _load_cached(final)
    if splits is None:
        raise DataError(f"cache {final} could not be read back after writing it")
    if progress or splits.meta["skipped"]:
        _print_report(splits.meta, sys.stderr)
    return splits


def _tokenize(stories, files, tokenizer, tmp, num_stories, test_split, skips, labels_seen, progress) -> dict:
    """Tokenize the stories into tmp/{pool,test}.bin, split by story into train/val/test.bin; the meta."""
    official = test_split == "official"
    pool = _TokenWriter(tmp / "pool.bin")
    held = _TokenWriter(tmp / "official.bin") if official else None
    eot_in_text = 0
    start = time.time()
    bar = tqdm(total=num_stories or None, unit=" stories", desc="tokenizing", disable=not progress, file=sys.stderr)
    try:
        buffers: dict[bool, list[str]] = {False: [], True: []}  # is official validation -> texts

        def flush(is_val: bool) -> None:
            (held if is_val else pool).write(tokenizer.encode_batch(buffers[is_val]))
            if not is_val:
                bar.update(len(buffers[is_val]))
            buffers[is_val].clear()

        taken = 0
        for story in stories:
            is_val = official and story.official_val
            if not is_val and num_stories and taken >= num_stories:
                if not official:
                    break  # seed protocol: the first N stories; official still collects validation stories
                continue
            taken += not is_val
            eot_in_text += EOS_TOKEN in story.text
            buffers[is_val].append(story.text)
            if len(buffers[is_val]) >= CHUNK_STORIES:
                flush(is_val)
        for is_val in (False, True):
            if buffers[is_val]:
                flush(is_val)
        if official and files is not None and not labels_seen:
            raise DataError(
                "test_split='official' needs the official validation split: a jsonl 'split' field, a parquet "
                "'split' column or a file named *valid*; this source has none (use test_split='seed')"
            )
        if official and files is None:
            for chunk in _chunks(_read_hub("validation", skips), CHUNK_STORIES):
                held.write(tokenizer.encode_batch([s.text for s in chunk]))
    finally:
        bar.close()
        pool.close()
        if held is not None:
            held.close()

    n = len(pool.lengths)
    if n == 0:
        detail = f" (skipped: {_skip_text(skips.counts)})" if skips.counts else ""
        raise DataError(f"no stories found in the data source{detail}")
    counts = _split_counts(n, (7, 2) if official else (7, 2, 1))
    if official:
        if not held.lengths:
            raise DataError("test_split='official': the source holds no official validation stories")
        counts.append(len(held.lengths))
    if min(counts) == 0:
        raise DataError(f"{n} stories are too few for non-empty train/val/test splits (got {counts})")

    pool_tokens = np.memmap(pool.path, dtype=np.uint16, mode="r")
    ends = np.cumsum([0, *pool.lengths])
    bounds = np.cumsum([0, *counts[:2]])  # story index where train / val / (test) start
    for name, lo, hi in zip(SPLITS[:2], bounds[:-1], bounds[1:]):
        _copy_tokens(pool_tokens[ends[lo] : ends[hi]], tmp / f"{name}.bin")
    if official:
        held.path.rename(tmp / "test.bin")
        test_lengths = held.lengths
    else:
        _copy_tokens(pool_tokens[ends[bounds[2]] :], tmp / "test.bin")
        test_lengths = pool.lengths[bounds[2] :]
    del pool_tokens
    pool.path.unlink()
    lengths = [pool.lengths[bounds[0] : bounds[1]], pool.lengths[bounds[1] : bounds[2]], test_lengths]
    return {
        "format_version": FORMAT_VERSION,
        "test_split": test_split,
        "num_stories_requested": num_stories,
        "stories": dict(zip(SPLITS, counts)),
        "tokens": {name: int(sum(ls)) for name, ls in zip(SPLITS, lengths)},
        "stories_read": n + (len(held.lengths) if official else 0),
        "skipped": dict(skips.counts),
        "skipped_examples": skips.examples,
        "stories_with_endoftext_in_text": eot_in_text,
        "eos_id": EOS_ID,
        "tokenizer_hash": tokenizer.hash,
        "tokenizer_source": getattr(tokenizer, "source", type(tokenizer).__name__),
        "tokenize_seconds": round(time.time() - start, 2),
    }


def _chunks(stories: Iterator[_Story], size: int) -> Iterator[list[_Story]]:
    chunk = []
    for s in stories:
        chunk.append(s)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished temp directory into place; an incomplete old one is replaced, a complete one kept."""
    if final.exists():
        if _load_cached(final) is not None:
            return  # another process finished the same key first
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        tmp.rename(final)
    except OSError:
        if _load_cached(final) is None:
            raise


def _skip_text(counts: dict) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())) or "none"


def _print_report(meta: dict, file) -> None:
    """What reading found: stories read, skipped (why, and where first), <|endoftext|> inside stories."""
    print(f"read {meta['stories_read']:,} stories, skipped: {_skip_text(meta['skipped'])}", file=file)
    for reason, where in meta["skipped_examples"].items():
        more = " ..." if meta["skipped"][reason] > len(where) else ""
        print(f"  skipped ({reason}): {', '.join(where)}{more}", file=file)
    if meta["stories_with_endoftext_in_text"]:
        print(f"  {meta['stories_with_endoftext_in_text']:,} stories contain the text <|endoftext|>, "
              f"encoded as EOS like GPT2TokenizerFast does", file=file)


def _print_summary(splits: TokenSplits, file) -> None:
    m = splits.meta
    for name in SPLITS:
        print(f"{name:>5}: {m['stories'][name]:>9,} stories {m['tokens'][name]:>13,} tokens", file=file)
    _print_report(m, file)
    print(f"cache: {splits.path}", file=file)


# ---------------------------------------------------------------------------------------------------
# Batches


class TrainBatches:
    """Random windows of context+1 tokens from the packed train stream: no padding.

    Batch k of rank r draws its window starts from a generator seeded with (seed, r, k), so the state
    is three integers and a restored state continues the exact same sequence.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, context: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        if batch_size < 1 or context < 1:
            raise ValueError(f"batch_size and context must be >= 1, got {batch_size}, {context}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if len(tokens) < context + 1:
            raise ValueError(f"train stream has {len(tokens)} tokens, fewer than context + 1 = {context + 1}")
        self.tokens = tokens
        self.batch_size, self.context = batch_size, context
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = 0
        self._offsets = np.arange(context + 1)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, self.step])
        starts = rng.integers(0, len(self.tokens) - self.context, size=self.batch_size)
        windows = torch.from_numpy(self.tokens[starts[:, None] + self._offsets].astype(np.int64))  # (B, T+1)
        self.step += 1
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "step": self.step,
                "batch_size": self.batch_size, "context": self.context}

    def load_state_dict(self, state: dict) -> None:
        if (state["batch_size"], state["context"]) != (self.batch_size, self.context):
            raise ValueError(
                f"batch state is for batch_size={state['batch_size']}, context={state['context']}; "
                f"this loader has {self.batch_size}, {self.context}"
            )
        self.seed, self.rank, self.step = int(state["seed"]), int(state["rank"]), int(state["step"])


def eval_batches(tokens: np.ndarray, context: int, batch_size: int,
                 max_tokens: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows over a split: window w is tokens[w*context : w*context + context + 1].

    x holds a window's first ``context`` tokens, y the next ones; the last, partial window is padded
    with 0 in x and -1 (ignored) in y. Every token but the first is a target exactly once, whatever
    the batch size. max_tokens > 0 scores only the first max_tokens targets.
    """
    if context < 1 or batch_size < 1:
        raise ValueError(f"context and batch_size must be >= 1, got {context}, {batch_size}")
    targets = len(tokens) - 1
    if max_tokens > 0:
        targets = min(targets, max_tokens)
    if targets < 1:
        raise ValueError(f"a split needs at least 2 tokens to evaluate, got {len(tokens)}")
    windows = -(-targets // context)
    for w0 in range(0, windows, batch_size):
        k = min(batch_size, windows - w0)
        lo = w0 * context
        n = min(k * context, targets - lo)  # targets in this batch
        seg = np.asarray(tokens[lo : lo + n + 1], dtype=np.int64)
        x = np.zeros(k * context, dtype=np.int64)
        y = np.full(k * context, -1, dtype=np.int64)
        x[:n], y[:n] = seg[:-1], seg[1:]
        yield torch.from_numpy(x).view(k, context), torch.from_numpy(y).view(k, context)


# ---------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt.data", description="Tokenize TinyStories into cached splits.")
    p.add_argument("--data", default=None, help="a .txt/.jsonl/.parquet file or a directory of them "
                                                "(default: the hub dataset roneneldan/TinyStories)")
    p.add_argument("--tokenizer", default=None, help="directory with vocab.json + merges.txt (or $GPT2_TOKENIZER_DIR)")
    p.add_argument("--num-stories", type=int, default=270_000, help="use the first N stories (0 = all)")
    p.add_argument("--cache-dir", default="data_cache")
    p.add_argument("--test-split", choices=("seed", "official"), default="seed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        splits = prepare_data(args.data, get_tokenizer(args.tokenizer), args.cache_dir, args.num_stories,
                              args.test_split, progress=not args.quiet)
    except (DataError, TokenizerNotFound) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 1
    _print_summary(splits, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
