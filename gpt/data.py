"""TinyStories, tokenized once into packed uint16 token files, and the batches drawn from them.

``prepare_data`` reads stories (the Hugging Face hub, or local .txt / .jsonl / .parquet files), keeps
their text exactly, appends EOS (50256) after every story, splits by story in order (70/20/10, or the
official validation split as test) and writes the tokens once (``stories.bin``, plus
``official_validation.bin`` for the official split) with a ``meta.json`` saying which token range of
which file each split is, under ``cache_dir/<key>/``. The key covers the source's fingerprint, the story count, the split mode
and the tokenizer, so a re-run reuses the files and a changed source is re-tokenized.

``TrainBatches`` draws random windows from the packed train stream (no padding), each process of a
distributed run its own share of one global sequence; ``eval_batches`` walks a split in non-overlapping windows so that every token is scored exactly once.

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
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from .config import SEED_NUM_STORIES
from .errors import UserError, one_line
from .tokenizer import EOS_ID, EOS_TOKEN, get_tokenizer

HUB_DATASET = "roneneldan/TinyStories"
EXTENSIONS = (".txt", ".jsonl", ".parquet")
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 2  # bump when the cache layout or the story parsing changes
FULL_HASH_BYTES = 16 << 20  # files up to this size are hashed whole; larger ones by first + last MiB
CHUNK_STORIES = 4096  # stories per tokenizer batch
MAX_EXAMPLES = 5  # skipped-story locations kept per reason
DEFAULT_CACHE_DIR = "data_cache"  # tokenized splits, one subdirectory per source and settings
HUB_PROBE_SECONDS = 5.0  # how long to wait for the hub to answer before failing (instead of ~30 s of retries)
SEED_ROW_TOKENS = 256  # the seed's rows: every story truncated/padded to 256 tokens with EOS
SEED_IGNORE_INDEX = 0  # the seed's loss ignored target id 0: the id of "!", not of its padding


class DataError(UserError, ValueError):
    """Unusable data source or data: the message is one line, fit to show a user as is."""


@dataclass
class TokenSplits:
    train: np.ndarray  # (n_train,) uint16 memmap: stories packed, EOS after every story
    val: np.ndarray  # (n_val,) uint16 memmap
    test: np.ndarray  # (n_test,) uint16 memmap
    meta: dict = field(default_factory=dict)  # counts, layout, fingerprint, tokenizer hash, skips; see prepare_data
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
    """Official format: stories separated by lines holding only <|endoftext|>. CRLF reads as LF.

    A file with text but no such line is not in this format (a whole file as one story is never
    what was meant): a ``DataError`` names the separator it expects.
    """
    official = "valid" in path.name.lower()
    lines: list[str] = []
    start = 1
    separators = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode_line(raw, path, lineno)
            line = line[:-1] if line.endswith("\r") else line
            if line.strip() != EOS_TOKEN:
                lines.append(line)
                continue
            separators += 1
            text = "\n".join(lines)
            if text.strip():
                yield _Story(text, official)
            else:
                skips.add("empty story", f"{path}:{start}")
            lines, start = [], lineno + 1
    text = "\n".join(lines)
    if text.strip() and not separators:
        raise DataError(f"{path}: not in TinyStories .txt format: no line holding only {EOS_TOKEN}, the line "
                        f"that separates stories (or pass .jsonl with a \"text\" field per story)")
    if text.strip():  # a last story without a closing separator; trailing blank lines are no story
        yield _Story(text, official)


def _read_jsonl(path: Path, skips: _Skips) -> Iterator[_Story]:
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
            yield _Story(obj["text"], _is_official_val(obj.get("split")) if "split" in obj else False)


def _read_parquet(path: Path, skips: _Skips) -> Iterator[_Story]:
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


def _read_files(files: list[Path], skips: _Skips) -> Iterator[_Story]:
    for p in files:
        suffix = p.suffix.lower()
        if suffix == ".txt":
            yield from _read_txt(p, skips)
        elif suffix == ".jsonl":
            yield from _read_jsonl(p, skips)
        else:
            yield from _read_parquet(p, skips)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub does not answer within ``HUB_PROBE_SECONDS`` (None: it answers, or
    offline mode is set and ``datasets`` will read its own cache). Proxies in the environment apply."""
    if _env_flag("HF_HUB_OFFLINE") or _env_flag("HF_DATASETS_OFFLINE"):
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_PROBE_SECONDS).close()
    except urllib.error.HTTPError:
        return None  # it answered (with an error status): reachable
    except (OSError, ValueError) as e:  # URLError, timeouts, refused connections, a malformed HF_ENDPOINT
        return f"{endpoint}: {getattr(e, 'reason', None) or e}"
    return None


def _read_hub(split: str, skips: _Skips) -> Iterator[_Story]:
    """The hub split's stories. Connects at once (not at the first ``next``), so an unreachable hub
    fails in seconds, before any progress bar, with one line."""
    why = hub_unreachable()
    if why is not None:
        raise DataError(f"cannot load {HUB_DATASET} ({split}) from the Hugging Face hub, which does not answer "
                        f"({why}): pass local files with --data PATH (or set HF_DATASETS_OFFLINE=1 to use a "
                        f"copy cached by `datasets`)")
    try:
        import datasets

        rows = iter(datasets.load_dataset(HUB_DATASET, split=split, streaming=True))
        first = next(rows, None)
    except Exception as e:  # offline, missing dataset, ...: datasets raises many types
        raise DataError(
            f"cannot load {HUB_DATASET} ({split}) from the Hugging Face hub ({type(e).__name__}): "
            f"pass local files with --data PATH"
        ) from None
    return _hub_stories(split, first, rows, skips)


def _hub_stories(split: str, first, rows, skips: _Skips) -> Iterator[_Story]:
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
    try:
        with p.open("rb") as f:
            if st.st_size <= FULL_HASH_BYTES:
                h.update(f.read())
            else:
                h.update(f.read(1 << 20))
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    except OSError as e:  # no permission, an I/O error
        raise DataError(f"cannot read {p}: {e.strerror or one_line(e)}") from None
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}


def _cache_key(fingerprint, num_stories: int, test_split: str, tokenizer_hash: str) -> str:
    blob = json.dumps([FORMAT_VERSION, fingerprint, num_stories, test_split, tokenizer_hash], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _counted_stories(meta: dict) -> int:
    """Stories that ``num_stories`` counts: all kept ones, official validation stories excepted."""
    s = meta["stories"]
    return s["train"] + s["val"] + (s["test"] if meta["test_split"] == "seed" else 0)


def _load_cached(directory: Path) -> TokenSplits | None:
    """The splits in a finished cache directory, or None when it is missing or incomplete."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
        arrays = {}
        for name in SPLITS:
            file, start, end = meta["layout"][name]
            path = directory / file
            if path.stat().st_size != 2 * meta["file_tokens"][file] or not 0 <= start < end <= meta["file_tokens"][file]:
                return None
            arrays[name] = np.memmap(path, dtype=np.uint16, mode="r", offset=2 * start, shape=(end - start,))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return TokenSplits(arrays["train"], arrays["val"], arrays["test"], meta, directory)


def _split_counts(n: int, ratios: tuple[int, ...]) -> list[int]:
    """Story counts per part, in order, for integer ratios (e.g. 7:2:1); the last part takes the rest."""
    total = sum(ratios)
    counts = [n * r // total for r in ratios[:-1]]
    return counts + [n - sum(counts)]


class _TokenWriter:
    """Appends tokenized stories (each followed by EOS) to a .bin file; remembers each story's length."""

    def __init__(self, path: Path):
        self.path = path
        self.file = path.open("wb")
        self.lengths: list[int] = []  # tokens per story, EOS included

    def write(self, batch: list[list[int]]) -> None:
        flat = [t for ids in batch for t in (*ids, EOS_ID)]
        self.file.write(np.asarray(flat, dtype=np.uint16).tobytes())  # write(): a full disk is ENOSPC, not tofile's "N requested and M written"
        self.lengths.extend(len(ids) + 1 for ids in batch)

    def close(self) -> None:
        self.file.close()


# ---------------------------------------------------------------------------------------------------
# prepare_data

STORIES_FILE, HELD_OUT_FILE = "stories.bin", "official_validation.bin"


def prepare_data(
    source,
    tokenizer,
    cache_dir=DEFAULT_CACHE_DIR,
    num_stories: int = SEED_NUM_STORIES,
    test_split: str = "seed",
    progress: bool = True,
) -> TokenSplits:
    """Tokenize TinyStories once (or reuse the cache) and return packed train/val/test token streams.

    source: None for the hub dataset roneneldan/TinyStories, or a .txt / .jsonl / .parquet file or a
    directory of one of those formats (files in name order). num_stories: use the first N stories
    (0 = all). test_split "seed": the N stories split 70/20/10 in order; "official": test is the official
    validation split and the first N other stories split 7:2 into train/val.

    Every token is written once: the kept stories go, in order, to ``stories.bin`` (official
    validation stories to ``official_validation.bin``), and each split is a memory map of a range of
    one file, recorded in ``meta.json``'s ``layout``.
    """
    if test_split not in ("seed", "official"):
        raise DataError(f"test_split must be 'seed' or 'official', got {test_split!r}")
    if num_stories < 0:
        raise DataError(f"num_stories must be >= 0 (0 = all), got {num_stories}")
    official = test_split == "official"
    files = None if source is None else _source_files(Path(source))
    fingerprint = f"hub:{HUB_DATASET}" if files is None else [_file_fingerprint(p) for p in files]
    cache_dir = Path(cache_dir)
    final = cache_dir / _cache_key(fingerprint, num_stories, test_split, tokenizer.hash)
    cached = _load_cached(final)
    if cached is not None:
        return cached
    # A source with fewer than num_stories stories gives the same splits as num_stories=0 (all):
    # one cache entry, under the key of "all", whatever count each command asked for.
    every = cache_dir / _cache_key(fingerprint, 0, test_split, tokenizer.hash)
    if num_stories:
        cached = _load_cached(every)
        if cached is not None and _counted_stories(cached.meta) < num_stories:
            return cached

    skips = _Skips()
    if files is not None:
        stories = _read_files(files, skips)
    elif official:  # the hub's train split holds no validation stories: stop reading it after N
        train = _read_hub("train", skips)
        stories = itertools.chain(itertools.islice(train, num_stories) if num_stories else train,
                                  _read_hub("validation", skips))
    else:
        stories = _read_hub("train", skips)
    tmp = cache_dir / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        start = time.time()
        kept, held, eot_in_text = _tokenize(stories, tokenizer, tmp, num_stories, official, progress)
        if official and not held:
            raise DataError(
                "test_split='official' needs the official validation split (a jsonl 'split' field, a parquet "
                "'split' column or a file named *valid*); this source has no such story (use test_split='seed')"
            )
        meta = _layout(kept, held, official, skips)
        if num_stories and len(kept) < num_stories:  # the source ran out: these are all its stories
            num_stories, final = 0, every
        meta.update(
            format_version=FORMAT_VERSION, test_split=test_split, num_stories_requested=num_stories,
            stories_read=len(kept) + len(held), skipped=dict(skips.counts), skipped_examples=skips.examples,
            stories_with_endoftext_in_text=eot_in_text, eos_id=EOS_ID, tokenizer_hash=tokenizer.hash,
            tokenizer_source=getattr(tokenizer, "source", type(tokenizer).__name__),
            tokenize_seconds=round(time.time() - start, 2),
            source="hub:" + HUB_DATASET if files is None else str(Path(source).resolve()), fingerprint=fingerprint,
        )
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _publish(tmp, final)
    except OSError as e:  # a full disk, no permission, a source that fails to read: the cache is left as it was
        if e.filename is not None and files is not None and Path(e.filename) in files:
            raise DataError(f"cannot read {e.filename}: {e.strerror or one_line(e)}") from None
        raise DataError(f"cannot write the token cache in {cache_dir}: {e.strerror or one_line(e)}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    splits = _load_cached(final)
    if splits is None:
        raise DataError(f"cache {final} could not be read back after writing it")
    if progress or splits.meta["skipped"]:
        _print_report(splits.meta, sys.stderr)
    return splits


def _tokenize(stories: Iterator[_Story], tokenizer, out: Path, num_stories: int, official: bool,
              progress: bool) -> tuple[list[int], list[int], int]:
    """Tokenize the first ``num_stories`` stories (0 = all) into ``out/stories.bin`` and, when
    ``official``, the official validation stories into ``out/official_validation.bin``.

    Returns the token counts per story of each file and how many stories contain "<|endoftext|>".
    """
    writers = {False: _TokenWriter(out / STORIES_FILE)}
    if official:
        writers[True] = _TokenWriter(out / HELD_OUT_FILE)
    buffers: dict[bool, list[str]] = {False: [], True: []}  # held out (official validation)? -> texts
    eot_in_text = 0
    bar = tqdm(total=num_stories or None, unit=" stories", desc="tokenizing", disable=not progress, file=sys.stderr)

    def flush(held_out: bool) -> None:
        writers[held_out].write(tokenizer.encode_batch(buffers[held_out]))
        if not held_out:
            bar.update(len(buffers[held_out]))
        buffers[held_out].clear()

    try:
        for story in stories:
            held_out = official and story.official_val
            if not held_out and num_stories and len(writers[False].lengths) + len(buffers[False]) >= num_stories:
                if not official:
                    break  # seed protocol: the first N stories; official still collects validation stories
                continue
            eot_in_text += EOS_TOKEN in story.text
            buffers[held_out].append(story.text)
            if len(buffers[held_out]) >= CHUNK_STORIES:
                flush(held_out)
        for held_out in writers:
            if buffers[held_out]:
                flush(held_out)
    finally:
        bar.close()
        for w in writers.values():
            w.close()
    return writers[False].lengths, writers[True].lengths if official else [], eot_in_text


def _layout(kept: list[int], held: list[int], official: bool, skips: _Skips) -> dict:
    """Split the kept stories by count (7:2:1, or 7:2 with the held-out stories as test) into token
    ranges of their files: the meta's ``layout``, ``file_tokens``, ``stories`` and ``tokens``."""
    if not kept:
        detail = f" (skipped: {_skip_text(skips.counts)})" if skips.counts else ""
        raise DataError(f"no stories found in the data source{detail}")
    counts = _split_counts(len(kept), (7, 2) if official else (7, 2, 1)) + ([len(held)] if official else [])
    if min(counts) == 0:
        raise DataError(f"{len(kept)} stories are too few for non-empty train/val/test splits (got {counts})")
    ends = np.cumsum([0, *kept]).tolist()  # token offset of each story boundary in stories.bin
    first = np.cumsum([0, *counts[:2]]).tolist()  # index of each split's first story
    layout = {name: [STORIES_FILE, ends[first[i]], ends[first[i] + counts[i]]] for i, name in enumerate(SPLITS[:2])}
    layout["test"] = [HELD_OUT_FILE, 0, sum(held)] if official else [STORIES_FILE, ends[first[2]], ends[-1]]
    file_tokens = {STORIES_FILE: ends[-1], **({HELD_OUT_FILE: sum(held)} if official else {})}
    return {"layout": layout, "file_tokens": file_tokens, "stories": dict(zip(SPLITS, counts)),
            "tokens": {name: end - start for name, (_, start, end) in layout.items()}}


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

    Global batch g draws its window starts from a generator seeded with (seed, g), so any batch can be
    drawn on its own. Rank r of W draws global batches r, r + W, r + 2W, ...: with A micro-batches
    per rank, optimizer step s covers global batches s*A*W ... s*A*W + A*W - 1, exactly what one
    process with A*W micro-batches draws, so DDP and single-process accumulation see the same data.
    The state is a few integers, and a restored state continues the exact same sequence.
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
        self.drawn = 0  # batches this rank has drawn
        self._offsets = np.arange(context + 1)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) of this rank, each (batch_size, context) int64: y is x shifted by one token."""
        g = self.drawn * self.world_size + self.rank  # the global batch index
        rng = np.random.default_rng([self.seed, g])
        starts = rng.integers(0, len(self.tokens) - self.context, size=self.batch_size)
        windows = torch.from_numpy(self.tokens[starts[:, None] + self._offsets].astype(np.int64))  # (B, T+1)
        self.drawn += 1
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "drawn": self.drawn, "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "context": self.context}

    def load_state_dict(self, state: dict) -> None:
        mine = {"batch_size": self.batch_size, "context": self.context, "rank": self.rank,
                "world_size": self.world_size}
        theirs = {k: state[k] for k in mine}
        if theirs != mine:
            raise ValueError(f"batch state is for {theirs}; this loader has {mine}")
        self.seed, self.drawn = int(state["seed"]), int(state["drawn"])


def story_rows(tokens: np.ndarray, eos_id: int = EOS_ID, seq_len: int = SEED_ROW_TOKENS) -> np.ndarray:
    """The seed's rows from a packed EOS-separated stream: each story + EOS on its own row, truncated
    or padded with EOS to ``seq_len`` tokens. (n_stories, seq_len) int64"""
    tokens = np.asarray(tokens)
    ends = np.flatnonzero(tokens == eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    rows = np.full((len(ends), seq_len), eos_id, dtype=np.int64)
    for i, (s, e) in enumerate(zip(starts, ends)):
        n = min(e + 1 - s, seq_len)
        rows[i, :n] = tokens[s:s + n]
    return rows


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
    p.add_argument("--num-stories", type=int, default=SEED_NUM_STORIES, help="use the first N stories (0 = all)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    p.add_argument("--test-split", choices=("seed", "official"), default="seed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        splits = prepare_data(args.data, get_tokenizer(args.tokenizer), args.cache_dir, args.num_stories,
                              args.test_split, progress=not args.quiet)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 1
    _print_summary(splits, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
