"""Tests for mypt.data: input checks, the token cache, train/val splits, the batch sampler."""

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import corpus_text

from mypt import data
from mypt.data import (
    TokenFile,
    batch_at,
    char_vocab_of_file,
    check_input_file,
    file_sha256,
    load_splits,
    prepare_tokens,
)
from mypt.errors import MyPTError
from mypt.tokenizers import CharTokenizer, build_tokenizer, train_bpe

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def gpt2():
    return build_tokenizer("gpt2")


@pytest.fixture(scope="module")
def bpe():
    return train_bpe([corpus_text(200_000) + "!!\n\n?\r\n'll 123456 \u00a0\u2028"], 1024, "test text")


def write(tmp_path: Path, content: str | bytes, name: str = "input.txt") -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def read_ids(token_file: TokenFile) -> list[int]:
    return np.fromfile(token_file.path, dtype=token_file.dtype).tolist()


# --- check_input_file ------------------------------------------------------------------------


def test_check_input_file_accepts_utf8_text(tmp_path):
    path = write(tmp_path, "héllo\n世界\n")
    assert check_input_file(str(path)) == path


BAD_INPUTS = {
    "missing": (None, r"does not exist; check the path"),
    "directory": ("DIR", r"is a directory"),
    "empty": (b"", r"is empty"),
    "binary": (
        b"text\x00\x01\x02",
        r"looks binary \(it contains NUL bytes, the first at byte offset 4\)",
    ),
    "latin1": (
        b"ok\nline two caf\xe9\n",
        r"is not valid UTF-8 \(first bad byte at byte offset 15, line 2\)",
    ),
    "truncated": (
        "ab\n🙂".encode()[:-1],
        r"is not valid UTF-8 \(first bad byte at byte offset 3, line 2\)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_rejected_and_nothing_is_written(tmp_path, gpt2, case):
    content, message = BAD_INPUTS[case]
    path = tmp_path / "input.txt"
    if content == "DIR":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(MyPTError, match=r"^input file .*input.txt " + message):
        check_input_file(path, chunk_size=4)
    cache = tmp_path / "cache"
    with pytest.raises(MyPTError, match=message):
        prepare_tokens(path, gpt2, cache, progress=False)
    assert not cache.exists()


def test_bad_utf8_offset_across_chunk_boundaries(tmp_path):
    # "é" is 2 bytes, so small chunks end inside characters; the bad byte follows 17 good ones.
    body = "é\né\n" * 2 + "abcde"
    assert len(body.encode("utf-8")) == 17
    path = write(tmp_path, body.encode("utf-8") + b"\xff" + "é".encode())
    for chunk_size in (1, 2, 3, 5, 1 << 20):
        with pytest.raises(MyPTError, match=r"byte offset 17, line 5\)"):
            check_input_file(path, chunk_size=chunk_size)


def test_file_sha256_and_char_vocab(tmp_path):
    text = "héllo 世界 🙂\nabc" * 50
    path = write(tmp_path, text)
    assert file_sha256(path, chunk_size=7) == hashlib.sha256(text.encode()).hexdigest()
    assert char_vocab_of_file(path, chunk_size=3) == sorted(set(text))


# --- prepare_tokens --------------------------------------------------------------------------


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="../shared/data/tinyshakespeare.txt absent")
def test_chunked_gpt2_tokenization_matches_whole_text(tmp_path, gpt2):
    token_file = prepare_tokens(SHAKESPEARE, gpt2, tmp_path, progress=False, chunk_size=8192)
    whole = gpt2.encode(SHAKESPEARE.read_text(encoding="utf-8"))
    assert token_file.n_tokens == len(whole)
    assert read_ids(token_file) == whole


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_chunked_tokenization_matches_whole_text_on_awkward_whitespace(tmp_path, request, kind, monkeypatch):
    # Tiny chunks over text full of whitespace runs, contractions, punctuation before newlines
    # and multibyte characters: every cut must land where the split pattern splits the whole
    # text anyway (bpe's pattern keeps "!\n" together, GPT-2's does not).
    tok = request.getfixturevalue(kind)
    monkeypatch.setattr(data, "MAX_CARRY_CHUNKS", 10**9)  # never force a cut
    pieces = list("ab xy\n\t\r'sé世🙂.,!9") + [
        "!\n",
        "123456",
        "'ll",
        "  \n",
        " \n",
        "  ",
        "\u00a0",
        "\u2028",
        "\x0b",
    ]
    rng = random.Random(1234)
    for trial in range(60):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 300)))
        path = write(tmp_path, text, f"t{trial}.txt")
        token_file = prepare_tokens(
            path, tok, tmp_path / "cache", progress=False, chunk_size=rng.randint(1, 32)
        )
        assert read_ids(token_file) == tok.encode(text), repr(text)


def test_training_text_is_the_text_before_the_validation_part(tmp_path):
    lines = [f"line {i} of the text, word{i}\n" for i in range(2000)]
    path = write(tmp_path, "".join(lines))
    size = path.stat().st_size
    for val_split in (0.1, 0.5):
        end = data.training_text_end(path, val_split)
        assert end == int(size * (1 - val_split))
        for chunk_size in (64, 1 << 20):
            text = "".join(data.training_text(path, end, chunk_size=chunk_size))
            assert path.read_text(encoding="utf-8").startswith(text)
            assert end - 64 < len(text.encode("utf-8")) <= end  # cut back to the last safe point only


def test_pathological_text_without_whitespace_still_tokenizes(tmp_path, gpt2):
    text = "x" * 5000
    token_file = prepare_tokens(write(tmp_path, text), gpt2, tmp_path, False, chunk_size=64)
    assert gpt2.decode(read_ids(token_file)) == text


def test_cache_file_name_dtype_and_contents(tmp_path, gpt2):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20
    path = write(tmp_path, text)
    sha = hashlib.sha256(text.encode()).hexdigest()

    token_file = prepare_tokens(path, gpt2, tmp_path / "cache", progress=False)
    assert token_file.path == tmp_path / "cache" / f"{sha[:16]}-gpt2.bin"
    assert token_file.sha256 == sha
    assert token_file.dtype == np.uint16
    assert read_ids(token_file) == gpt2.encode(text)

    char = CharTokenizer(char_vocab_of_file(path))
    char_file = prepare_tokens(path, char, tmp_path / "cache", progress=False)
    assert char_file.path.name == f"{sha[:16]}-{char.id_string()}.bin"
    assert char_file.dtype == np.uint16
    assert char.decode(read_ids(char_file)) == text
    bins = {token_file.path, char_file.path}
    assert set((tmp_path / "cache").iterdir()) == bins | {p.with_suffix(".json") for p in bins}


def test_large_vocabulary_uses_uint32(tmp_path):
    ranges = [(0x21, 0x7F), (0xA1, 0x800), (0x800, 0xD800), (0xE000, 0x10000), (0x10000, 0x10900)]
    text = "".join(chr(c) for lo, hi in ranges for c in range(lo, hi))
    path = write(tmp_path, text)
    tok = CharTokenizer(char_vocab_of_file(path))
    assert tok.n_vocab > 65535
    token_file = prepare_tokens(path, tok, tmp_path / "cache", progress=False, chunk_size=1 << 16)
    assert token_file.dtype == np.uint32
    ids = read_ids(token_file)
    assert ids == list(range(len(tok.chars)))  # the text is the sorted vocabulary itself
    assert tok.decode(ids) == text


def test_char_tokenizer_from_other_text_names_input_file(tmp_path):
    path = write(tmp_path, "hello wörld\n")
    with pytest.raises(MyPTError, match=r"^input file .*input.txt contains characters.*'ö'"):
        prepare_tokens(path, build_tokenizer("char", "hello world\n"), tmp_path / "c", False)


def test_cache_is_reused_without_rewriting(tmp_path, gpt2, monkeypatch):
    path = write(tmp_path, "to be or not to be\n" * 100)
    first = prepare_tokens(path, gpt2, tmp_path / "cache", progress=False)
    before = os.stat(first.path)

    def fail(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(data, "_write_tokens", fail)
    second = prepare_tokens(path, gpt2, tmp_path / "cache", progress=False)
    after = os.stat(second.path)
    assert second == first
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_incomplete_cache_is_rebuilt_and_no_temp_files_remain(tmp_path, gpt2):
    path = write(tmp_path, "some text\n" * 10)
    first = prepare_tokens(path, gpt2, tmp_path, progress=False)
    first.path.with_suffix(".json").unlink()  # as if the run crashed before the sidecar
    first.path.write_bytes(b"\x01")  # and left junk under the final name
    again = prepare_tokens(path, gpt2, tmp_path, progress=False)
    assert read_ids(again) == gpt2.encode("some text\n" * 10)
    assert not list(tmp_path.glob("*.tmp"))


def test_progress_bar_goes_to_stderr(tmp_path, gpt2, capsys):
    prepare_tokens(write(tmp_path, "abc\n" * 100), gpt2, tmp_path / "c", progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "tokenizing input.txt" in captured.err and "B/s" in captured.err


# --- load_splits -----------------------------------------------------------------------------


def make_token_file(tmp_path: Path, n: int) -> TokenFile:
    path = tmp_path / "tokens.bin"
    np.arange(n, dtype=np.uint16).tofile(path)
    return TokenFile(path, np.dtype(np.uint16), n, "0" * 64)


def test_load_splits_parts(tmp_path):
    train, val = load_splits(make_token_file(tmp_path, 100), 0.1, 8, "input.txt")
    assert train.tolist() == list(range(90))
    assert val.tolist() == list(range(90, 100))
    with pytest.raises(ValueError):
        train[0] = 5  # read-only


def test_load_splits_too_short(tmp_path):
    token_file = make_token_file(tmp_path, 100)
    with pytest.raises(MyPTError) as err:
        load_splits(token_file, 0.1, 10, "data/tiny.txt")
    msg = str(err.value)
    assert msg.startswith("data/tiny.txt is too short: it has 100 tokens")
    assert "validation part (--val_split 0.1) has 10" in msg and "= 11" in msg
    assert "--block_size" in msg and "--val_split" in msg
    with pytest.raises(MyPTError, match="training part .* has 50, but .* = 61"):
        load_splits(token_file, 0.5, 60, "data/tiny.txt")


@pytest.mark.parametrize("val_split", [0.0, -0.1, 0.51, 1.0])
def test_load_splits_rejects_bad_val_split(tmp_path, val_split):
    with pytest.raises(MyPTError, match=r"^--val_split must be in \(0, 0.5\]"):
        load_splits(make_token_file(tmp_path, 1000), val_split, 8, "input.txt")


# --- batch_at ----------------------------------------------------------------------------------


def tokens(n: int = 5000) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 60000, n).astype(np.uint16)


def _find(arr: np.ndarray, window: list[int]) -> int:
    n = len(window)
    for start in range(len(arr) - n + 1):
        if arr[start : start + n].tolist() == window:
            return start
    raise AssertionError("window not found in data")


def test_batch_at_covers_the_last_token():
    arr = np.arange(6, dtype=np.uint16)  # exactly one window of block 5 + 1
    x, y = batch_at(arr, 5, 3, seed=0, index=0, device="cpu")
    assert x.tolist() == [[0, 1, 2, 3, 4]] * 3 and y.tolist() == [[1, 2, 3, 4, 5]] * 3


def test_batch_at_is_a_pure_function_of_seed_and_index():
    arr = tokens()
    x, y = batch_at(arr, 16, 4, seed=5, index=12, device="cpu")
    again_x, again_y = batch_at(arr, 16, 4, seed=5, index=12, device="cpu")
    assert torch.equal(x, again_x) and torch.equal(y, again_y)
    assert x.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    start = _find(arr, x[0].tolist())
    assert y[0].tolist() == arr[start + 1 : start + 17].tolist()
    assert not torch.equal(x, batch_at(arr, 16, 4, seed=5, index=13, device="cpu")[0])
    assert not torch.equal(x, batch_at(arr, 16, 4, seed=6, index=12, device="cpu")[0])
