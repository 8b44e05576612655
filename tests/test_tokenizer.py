"""gpt.tokenizer: ids identical to transformers' GPT2TokenizerFast, round trips, and how it is found."""

import json
import shutil

import pytest
import tiktoken

import gpt.tokenizer as gt
from gpt.tokenizer import TokenizerNotFound, get_tokenizer

AWKWARD = [
    "",
    " ",
    "Once upon a time",
    "   leading spaces and trailing   ",
    "\n\n",
    "a\n\nb\n\n\nc",
    "tabs\tand\t\ttabs \t \n mixed",
    "whitespace run          then text",
    "line\r\nwindows\rold mac",
    "It's, don't, we're, I've, I'm, you'll, he'd; IT'S DON'T 'tis",
    "'s's 's 't'",
    "digits 1234567890 3.14159 1,000,000 2023-11-26",
    "unicode: naïve café Ünïcödé 日本語のテキスト Привет мир",
    "emoji 🙂🙃 👩‍👩‍👧‍👦 🇫🇷 ✨",
    "mojibake: â€œHelloâ€\x9d she said, itâ€™s fine",
    "<|endoftext|>",
    "before<|endoftext|>after",
    " <|endoftext|> spaced <|endoftext|>",
    "<|endoftext|><|endoftext|>",
    "<|endoftext",
    "control \x00\x01\x7f chars and \u200b zero width",
    "!!!???...,,,;;;::: ---___ +++ ***",
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return get_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def hf(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2TokenizerFast.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def stories(stories_dir):
    with open(stories_dir / "tinystories-sample.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return texts[::29]  # 300 stories spread over the file, validation stories and mojibake included


def test_known_ids(tok):
    assert tok.encode("Once upon a time") == [7454, 2402, 257, 640]
    assert tok.eos_id == 50256 and tok.vocab_size == 50257
    assert tok.encode("<|endoftext|>") == [tok.eos_id]
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"


def test_matches_gpt2_tokenizer_fast_on_stories(tok, hf, stories):
    assert len(stories) == 300
    expected = hf(stories)["input_ids"]
    assert tok.encode_batch(stories) == expected
    assert tok.encode_batch(stories, num_threads=1) == expected
    assert [tok.encode(s) for s in stories[:20]] == expected[:20]


@pytest.mark.parametrize("text", AWKWARD)
def test_matches_gpt2_tokenizer_fast_on_awkward_text(tok, hf, text):
    ids = tok.encode(text)
    assert ids == hf.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, text]) == [ids, ids]


def test_round_trip_stories(tok, stories):
    assert [tok.decode(ids) for ids in tok.encode_batch(stories)] == stories


def test_hash_is_content_based(tok, tokenizer_dir, tmp_path):
    # The data-gym file names (encoder.json + vocab.bpe) hold the same vocabulary: same hash, same ids.
    shutil.copy(tokenizer_dir / "vocab.json", tmp_path / "encoder.json")
    shutil.copy(tokenizer_dir / "merges.txt", tmp_path / "vocab.bpe")
    other = get_tokenizer(tmp_path)
    assert len(tok.hash) == 64 and other.hash == tok.hash == get_tokenizer(tokenizer_dir).hash
    assert other.encode(AWKWARD[9]) == tok.encode(AWKWARD[9])


def test_mismatched_files_are_rejected(tokenizer_dir, tmp_path):
    shutil.copy(tokenizer_dir / "vocab.json", tmp_path / "vocab.json")
    merges = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    (tmp_path / "merges.txt").write_text("\n".join([merges[0], *merges[2:]]), encoding="utf-8")  # one merge lost
    with pytest.raises(TokenizerNotFound, match="not GPT-2's"):
        get_tokenizer(tmp_path)


@pytest.mark.parametrize("vocab", ["foreign character", "not a dict"])
def test_a_vocabulary_outside_gpt2s_byte_alphabet_is_rejected_in_one_line(tokenizer_dir, tmp_path, vocab):
    """Files that agree with each other but spell the space byte as U+00AD, a character that stands
    for no byte in GPT-2's alphabet (its space is "\u0120"), or a vocab.json that is no token -> id
    map, are not taken for GPT-2's vocabulary."""
    vocab_text = (tokenizer_dir / "vocab.json").read_text(encoding="utf-8")
    merges_text = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8")
    if vocab == "foreign character":
        ids = {token.replace("\u0120", "\u00ad"): i for token, i in json.loads(vocab_text).items()}
        merges_text = merges_text.replace("\u0120", "\u00ad")
    else:
        ids = list(json.loads(vocab_text))
    (tmp_path / "vocab.json").write_text(json.dumps(ids), encoding="utf-8")
    (tmp_path / "merges.txt").write_text(merges_text, encoding="utf-8")
    with pytest.raises(TokenizerNotFound) as err:
        get_tokenizer(tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


def test_explicit_directory_without_files(tmp_path):
    with pytest.raises(TokenizerNotFound, match="does not hold vocab.json"):
        get_tokenizer(tmp_path / "nowhere")


def test_env_var_resolution(tokenizer_dir, monkeypatch):
    monkeypatch.setenv("GPT2_TOKENIZER_DIR", str(tokenizer_dir))
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: pytest.fail("tiktoken consulted"))
    tok = get_tokenizer()
    assert tok.source == f"dir:{tokenizer_dir}"
    assert tok.encode("Once upon a time") == [7454, 2402, 257, 640]


def _offline(monkeypatch, tiktoken_error, hub_files=None):
    """tiktoken fails with tiktoken_error; the hub serves hub_files or fails. Returns the hub's calls."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("GPT2_TOKENIZER_DIR", raising=False)

    def get_encoding(name):
        raise tiktoken_error

    calls = []

    def hf_hub_download(repo, filename, local_files_only=False):
        calls.append(local_files_only)
        if hub_files is None:
            raise LocalEntryNotFoundError("offline")
        return str(hub_files / filename)

    monkeypatch.setattr(tiktoken, "get_encoding", get_encoding)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", hf_hub_download)
    return calls


def test_offline_error_says_how_to_pass_a_directory(monkeypatch):
    import requests

    calls = _offline(monkeypatch, requests.exceptions.ConnectionError("no network"))
    with pytest.raises(TokenizerNotFound) as err:
        get_tokenizer()
    msg = str(err.value)
    assert "--tokenizer DIR" in msg and "GPT2_TOKENIZER_DIR" in msg and "\n" not in msg
    assert calls == [True]  # a network failure skips the hub's slow online retries
    assert isinstance(err.value, RuntimeError)


def test_non_network_tiktoken_failure_tries_the_hub_online(monkeypatch):
    calls = _offline(monkeypatch, ValueError("hash mismatch"))
    with pytest.raises(TokenizerNotFound):
        get_tokenizer()
    assert calls == [True, False]


def test_hub_fallback(monkeypatch, tokenizer_dir):
    import requests

    calls = _offline(monkeypatch, requests.exceptions.ConnectionError("no network"), hub_files=tokenizer_dir)
    tok = get_tokenizer()
    assert tok.source == "hub:gpt2" and calls == [True, True]
    assert tok.encode("Once upon a time") == [7454, 2402, 257, 640]


def test_tiktoken_gpt2_is_used_when_no_directory(monkeypatch, tokenizer_dir):
    ranks = gt.ranks_from_files(tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt")
    enc = tiktoken.Encoding("gpt2", pat_str=gt.GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 50256})
    monkeypatch.delenv("GPT2_TOKENIZER_DIR", raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: enc if name == "gpt2" else pytest.fail(name))
    tok = get_tokenizer()
    assert tok.source == "tiktoken:gpt2"
    assert tok.hash == get_tokenizer(tokenizer_dir).hash
