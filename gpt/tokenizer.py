"""GPT-2's byte-level BPE tokenizer on tiktoken: the ids of ``transformers.GPT2TokenizerFast``, faster.

Resolution order of ``get_tokenizer(path)``:

1. an explicit directory (``path``, i.e. ``--tokenizer DIR`` on the CLIs, else the environment variable
   ``GPT2_TOKENIZER_DIR``) holding ``vocab.json`` + ``merges.txt`` (or ``encoder.json`` + ``vocab.bpe``);
2. tiktoken's own ``gpt2`` encoding (downloaded once, then cached by tiktoken);
3. the Hugging Face hub's ``gpt2`` repository (the same two files, cached by ``huggingface_hub``).

With none available, ``TokenizerNotFound`` says how to pass a directory.

``<|endoftext|>`` inside text: ``GPT2TokenizerFast`` treats it as the special token (id 50256) wherever
it appears, also mid-text ("a<|endoftext|>b" -> [64, 50256, 65]); ``encode`` and ``encode_batch`` do
the same, so ids match GPT2TokenizerFast on any text and ``decode(encode(s)) == s`` still holds.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import tiktoken

from .errors import UserError

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 50256
VOCAB_SIZE = 50257
ENV_VAR = "GPT2_TOKENIZER_DIR"
# GPT-2's pre-tokenizer: contractions, letter runs, digit runs, other symbols, whitespace.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# (vocabulary file, merges file) name pairs, in order of preference.
FILE_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))


class TokenizerNotFound(UserError, RuntimeError):
    """No GPT-2 tokenizer files could be found or downloaded (or the files given are not GPT-2's)."""


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted: character -> byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_to_byte = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            char_to_byte[chr(256 + extra)] = b
            extra += 1
    return char_to_byte


def ranks_from_files(vocab_path: Path, merges_path: Path) -> dict[bytes, int]:
    """tiktoken's mergeable ranks from GPT-2's vocab.json and merges.txt, checked against each other.

    Ranks are the 256 single bytes in vocab order, then one token per merge line; GPT-2's vocab.json
    gives every such token exactly that id (checked), so BPE ranks and token ids coincide. Tokens are
    matched as the files spell them (one stand-in character a byte) and turned into bytes once.
    """
    alphabet = _byte_alphabet()
    # Each stand-in character to the character of its byte value, which latin-1 encodes as that byte.
    table = {ord(c): b for c, b in alphabet.items()}
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        merge_lines = merges_path.read_text(encoding="utf-8").split("\n")
        ranks = {t: i for i, t in sorted((i, t) for t, i in vocab.items() if len(t) == 1)}  # the 256 bytes
        for line in merge_lines[1:]:  # line 0 is the "#version" header
            if line.strip():
                left, right = line.split()
                ranks[left + right] = len(ranks)
        expected = {t: i for t, i in vocab.items() if t != EOS_TOKEN}
    except (OSError, ValueError, AttributeError, TypeError) as e:  # (a vocab.json not a dict of ids)
        raise TokenizerNotFound(f"cannot read GPT-2 tokenizer files {vocab_path} / {merges_path}: {e}") from e
    if (ranks != expected or vocab.get(EOS_TOKEN) != EOS_ID or len(ranks) != EOS_ID
            or not set("".join(ranks)) <= alphabet.keys()):
        raise TokenizerNotFound(
            f"{vocab_path} and {merges_path} are not GPT-2's vocabulary and merges (ids do not match merge order)"
        )
    return {t.translate(table).encode("latin-1"): i for t, i in ranks.items()}


def _ranks_hash(ranks: dict[bytes, int]) -> str:
    """sha256 of the vocabulary content (ranks, split pattern, special token), whatever file it came from."""
    h = hashlib.sha256()
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        h.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
    h.update(GPT2_PATTERN.encode() + EOS_TOKEN.encode() + EOS_ID.to_bytes(4, "little"))
    return h.hexdigest()


class GPT2Tokenizer:
    """GPT-2 BPE on a tiktoken Encoding. ``source`` says where the vocabulary came from."""

    eos_id = EOS_ID
    vocab_size = VOCAB_SIZE

    def __init__(self, ranks: dict[bytes, int], source: str):
        self.source = source
        self.hash = _ranks_hash(ranks)
        self._enc = tiktoken.Encoding(
            name="gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOS_TOKEN: EOS_ID}
        )
        self._special = {EOS_TOKEN}

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special=self._special)

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts on ``num_threads`` threads (default: every core)."""
        threads = num_threads or os.cpu_count() or 1
        return self._enc.encode_batch(list(texts), num_threads=threads, allowed_special=self._special)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(list(ids))

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(source={self.source!r}, hash={self.hash[:12]})"


def _files_in(directory: Path) -> tuple[Path, Path] | None:
    for vocab_name, merges_name in FILE_PAIRS:
        if (directory / vocab_name).is_file() and (directory / merges_name).is_file():
            return directory / vocab_name, directory / merges_name
    return None


def _from_tiktoken() -> GPT2Tokenizer:
    enc = tiktoken.get_encoding("gpt2")
    return GPT2Tokenizer(enc._mergeable_ranks, "tiktoken:gpt2")


def _from_hub(local_only: bool) -> GPT2Tokenizer:
    from huggingface_hub import hf_hub_download

    vocab = hf_hub_download("gpt2", "vocab.json", local_files_only=local_only)
    merges = hf_hub_download("gpt2", "merges.txt", local_files_only=local_only)
    return GPT2Tokenizer(ranks_from_files(Path(vocab), Path(merges)), "hub:gpt2")


def get_tokenizer(path: str | os.PathLike | None = None) -> GPT2Tokenizer:
    """GPT-2's tokenizer from ``path`` / $GPT2_TOKENIZER_DIR, else tiktoken's cache, else the HF hub."""
    explicit = path if path is not None else os.environ.get(ENV_VAR) or None
    if explicit is not None:
        directory = Path(explicit)
        files = _files_in(directory)
        if files is None:
            names = " or ".join(f"{v} + {m}" for v, m in FILE_PAIRS)
            raise TokenizerNotFound(f"tokenizer directory {directory} does not hold {names}")
        return GPT2Tokenizer(ranks_from_files(*files), f"dir:{directory}")
    failures = []
    try:
        return _from_tiktoken()
    except Exception as e:  # tiktoken surfaces network, cache and hash errors with many types
        failures.append(f"tiktoken: {type(e).__name__}")
        offline = isinstance(e, OSError)  # a connection error: skip the hub's slow online retries
    for local_only in (True, False) if not offline else (True,):
        try:
            return _from_hub(local_only)
        except Exception as e:  # huggingface_hub raises OSError subclasses, HTTP and value errors
            failures.append(f"hub{' cache' if local_only else ''}: {type(e).__name__}")
    raise TokenizerNotFound(
        f"no GPT-2 tokenizer available ({'; '.join(failures)}): pass a directory holding vocab.json + "
        f"merges.txt with --tokenizer DIR or set {ENV_VAR}=DIR"
    )


__all__ = ["get_tokenizer", "GPT2Tokenizer", "TokenizerNotFound", "EOS_ID", "VOCAB_SIZE", "ranks_from_files"]
