"""Training data: validating the input text, caching it as tokens, and sampling batches.

This module owns checking an input file (exists, is UTF-8 text), tokenizing it once in bounded
memory into a flat binary token cache, splitting the tokens into train/val, and the resumable
random batch sampler. It knows nothing about the model or the CLI.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from tqdm import tqdm

from mypt.errors import MyPTError
from mypt.fsutil import check_regular_file
from mypt.tokenizers import Tokenizer

CHUNK_SIZE = 4 << 20  # bytes read (and roughly characters tokenized) per piece
TOKENIZE_THREADS = 4  # at most this many pieces tokenized at once (and no more than the cores)
MAX_CARRY_CHUNKS = 4  # how far a piece may grow while looking for a safe cut
MAX_TOKEN_BYTES = 128  # no token is longer: GPT-2's longest is 128 bytes, a character at most 4

# Safe cut points: just before a whitespace character that follows a non-whitespace one.
# GPT-2's pre-tokenizer never joins a non-space character with the whitespace after it, and
# the text from the whitespace on is split exactly as in the whole text (the pattern has no
# lookbehind), so tokenizing the two sides separately gives the same ids as the whole.
# (Cutting *after* whitespace is not safe: "a  \nB" splits as "a", "  ", "\n", "B" whole, but
# "a  \n" alone ends in one "  \n" pre-token.)  Prefer cuts before a newline.
_NEWLINE_CUT = re.compile(r"\S\n")
_WHITESPACE_CUT = re.compile(r"\S[ \t\r\n]")


@dataclass(frozen=True)
class TokenFile:
    """A flat binary file of token ids made by prepare_tokens()."""

    path: Path
    dtype: np.dtype
    n_tokens: int
    sha256: str  # of the input text file


# ---------------------------------------------------------------------------------------------
# Reading and checking the input


def _read_chunks(path: Path, chunk_size: int) -> Iterator[bytes]:
    try:
        with open(path, "rb") as f:
            while chunk := f.read(chunk_size):
                yield chunk
    except OSError as e:
        raise MyPTError(f"cannot read input file {path} ({e}); check its permissions") from e


def _bad_utf8(path: Path, offset: int, line: int) -> MyPTError:
    return MyPTError(
        f"input file {path} is not valid UTF-8 (first bad byte at byte offset {offset}, "
        f"line {line}); convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) and try again"
    )


def _decode_chunks(
    path: Path, chunk_size: int, on_bytes: Callable[[bytes], object] | None = None
) -> Iterator[tuple[str, int]]:
    """Yield (text, n_bytes) for each chunk; MyPTError on NUL bytes or invalid UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset = 0  # bytes fed to the decoder so far
    newlines = 0
    for chunk in _read_chunks(path, chunk_size):
        if on_bytes is not None:
            on_bytes(chunk)
        nul = chunk.find(b"\0")
        if nul >= 0:
            raise MyPTError(
                f"input file {path} looks binary (it contains NUL bytes, the first at byte "
                f"offset {offset + nul}); pass a UTF-8 text file"
            )
        pending = len(decoder.getstate()[0])
        try:
            text = decoder.decode(chunk)
        except UnicodeDecodeError as e:
            in_chunk = max(0, e.start - pending)
            line = newlines + chunk[:in_chunk].count(b"\n") + 1
            raise _bad_utf8(path, offset - pending + e.start, line) from e
        offset += len(chunk)
        newlines += chunk.count(b"\n")
        yield text, len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        pending = len(decoder.getstate()[0])
        raise _bad_utf8(path, offset - pending + e.start, newlines + 1) from e


def _check_path(path: Path) -> None:
    if not path.exists():
        raise MyPTError(f"input file {path} does not exist; check the path")
    if path.is_dir():
        raise MyPTError(f"input file {path} is a directory; pass a UTF-8 text file")
    check_regular_file(path, f"input file {path}")  # a FIFO or device would hang or never end
    if path.stat().st_size == 0:
        raise MyPTError(f"input file {path} is empty; pass a file with some text in it")


def _scan(path: Path, chunk_size: int) -> str:
    """Check the whole file is UTF-8 text and return its sha256, in one bounded-memory pass."""
    _check_path(path)
    hasher = hashlib.sha256()
    for _ in _decode_chunks(path, chunk_size, hasher.update):
        pass
    return hasher.hexdigest()


def check_input_file(path: str | Path, chunk_size: int = CHUNK_SIZE) -> Path:
    """The path of a readable, non-empty UTF-8 text file; MyPTError (naming it) otherwise."""
    path = Path(path)
    _scan(path, chunk_size)
    return path


def file_sha256(path: str | Path, chunk_size: int = CHUNK_SIZE) -> str:
    """Hex sha256 of the file's bytes."""
    hasher = hashlib.sha256()
    for chunk in _read_chunks(Path(path), chunk_size):
        hasher.update(chunk)
    return hasher.hexdigest()


def char_vocab_of_file(path: str | Path, chunk_size: int = CHUNK_SIZE) -> list[str]:
    """Sorted distinct characters of a UTF-8 text file, read in chunks."""
    chars: set[str] = set()
    for text, _ in _decode_chunks(Path(path), chunk_size):
        chars.update(text)
    return sorted(chars)


# ---------------------------------------------------------------------------------------------
# Tokenizing into the cache


def token_dtype(n_vocab: int) -> np.dtype:
    """The smallest dtype the token cache uses for ids below n_vocab."""
    return np.dtype(np.uint16 if n_vocab <= 65535 else np.uint32)


def _last_cut(text: str, pattern: re.Pattern[str]) -> int | None:
    """Index of the whitespace in the last match of `pattern`, searching back from the end."""
    window = 1 << 16
    while True:
        start = max(0, len(text) - window)
        last = None
        for match in pattern.finditer(text, start):
            last = match
        if last is not None:
            return last.start() + 1
        if start == 0:
            return None
        window *= 4


def _split_safely(text: str, force: bool) -> tuple[str, str]:
    """(head, rest): head tokenizes exactly as it would inside the whole text."""
    cut = _last_cut(text, _NEWLINE_CUT)
    if cut is None:
        cut = _last_cut(text, _WHITESPACE_CUT)
    if cut is None:
        return (text, "") if force else ("", text)
    return text[:cut], text[cut:]


def _pieces(path: Path, chunk_size: int) -> Iterator[tuple[str, int]]:
    """Yield (text, n_bytes_read) with the text cut only at safe points (see _NEWLINE_CUT)."""
    carry = ""
    for text, n_bytes in _decode_chunks(path, chunk_size):
        head, carry = _split_safely(carry + text, force=len(carry) >= MAX_CARRY_CHUNKS * chunk_size)
        yield head, n_bytes
    yield carry, 0


def _encode_pieces(path: Path, tokenizer: Tokenizer, chunk_size: int, workers: int) -> Iterator[tuple[np.ndarray, int]]:
    """Token array of each safely cut piece, in order, with the bytes of the file read for it.

    `workers` threads tokenize pieces side by side (tiktoken releases the GIL) while this thread
    reads and cuts the next piece and the caller writes finished ones, so no core waits for a
    batch to finish. At most workers + 1 pieces are in flight: memory stays bounded.
    """
    what = f"input file {path}"
    dtype = token_dtype(tokenizer.n_vocab)

    def encode(text: str) -> np.ndarray:
        return tokenizer.encode_array(text, what=what).astype(dtype, copy=False)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[tuple[Future[np.ndarray], int]] = deque()
        for text, n_bytes in _pieces(path, chunk_size):
            pending.append((pool.submit(encode, text), n_bytes))
            if len(pending) > workers:
                future, size = pending.popleft()
                yield future.result(), size
        while pending:
            future, size = pending.popleft()
            yield future.result(), size


def _write_tokens(
    path: Path,
    out: BinaryIO,
    tokenizer: Tokenizer,
    chunk_size: int,
    threads: int,
    progress: bool,
) -> int:
    n_tokens = 0
    total = path.stat().st_size
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"tokenizing {path.name}",
        file=sys.stderr,
        disable=not progress,
    ) as bar:
        workers = max(1, min(threads, os.cpu_count() or 1))
        for ids, n_bytes in _encode_pieces(path, tokenizer, chunk_size, workers):
            out.write(ids.tobytes())
            n_tokens += len(ids)
            bar.update(n_bytes)
    return n_tokens


def _atomic_write(final: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(f) on a temp file next to `final`, then os.replace it into place."""
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=final.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sidecar(bin_path: Path) -> Path:
    return bin_path.with_suffix(".json")


def open_token_file(bin_path: str | Path) -> TokenFile | None:
    """The TokenFile at `bin_path` if it and its JSON sidecar are complete, else None."""
    bin_path = Path(bin_path)
    try:
        meta = json.loads(_sidecar(bin_path).read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        n_tokens, sha = int(meta["n_tokens"]), str(meta["input_sha256"])
        size = bin_path.stat().st_size
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if size != n_tokens * dtype.itemsize:
        return None
    return TokenFile(bin_path, dtype, n_tokens, sha)


def prepare_tokens(
    input_path: str | Path,
    tokenizer: Tokenizer,
    cache_dir: str | Path,
    progress: bool = True,
    chunk_size: int = CHUNK_SIZE,
    threads: int = TOKENIZE_THREADS,
) -> TokenFile:
    """Tokenize `input_path` once into cache_dir (reused on later calls) and describe the result.

    Reads in chunks of `chunk_size` bytes, so memory stays bounded whatever the file size.
    The .bin is written first and the .json sidecar last, each via temp file + os.replace, so a
    crash never leaves a file that looks complete.
    """
    path = Path(input_path)
    sha = _scan(path, chunk_size)
    cache_dir = Path(cache_dir)
    bin_path = cache_dir / f"{sha[:16]}-{tokenizer.id_string()}.bin"
    cached = open_token_file(bin_path)
    if cached is not None and cached.sha256 == sha:
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    n_tokens = 0

    def write_bin(f: BinaryIO) -> None:
        nonlocal n_tokens
        n_tokens = _write_tokens(path, f, tokenizer, chunk_size, threads, progress)

    _atomic_write(bin_path, write_bin)
    dtype = token_dtype(tokenizer.n_vocab)
    meta = {
        "dtype": dtype.name,
        "n_tokens": n_tokens,
        "input_sha256": sha,
        "tokenizer": tokenizer.id_string(),
        "input": str(path),
    }
    _atomic_write(_sidecar(bin_path), lambda f: f.write(json.dumps(meta).encode("utf-8")))
    return TokenFile(bin_path, dtype, n_tokens, sha)


# ---------------------------------------------------------------------------------------------
# Splits and batches


def load_splits(
    token_file: TokenFile, val_split: float, block_size: int, source: str
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) read-only memmaps: the first 1 - val_split of the tokens, then the rest."""
    if not 0 < val_split <= 0.5:
        raise MyPTError(f"--val_split must be in (0, 0.5], got {val_split}")
    n = token_file.n_tokens
    n_train = _split_point(n, val_split, block_size, source)
    data = np.memmap(token_file.path, dtype=token_file.dtype, mode="r", shape=(n,))
    return data[:n_train], data[n_train:]


def _split_point(n: int, val_split: float, block_size: int, source: str) -> int:
    """Where n tokens split into train and val; MyPTError unless each part holds one block."""
    n_train = int(n * (1 - val_split))
    need = block_size + 1
    for name, size in (("training", n_train), ("validation", n - n_train)):
        if size < need:
            raise MyPTError(
                f"{source} is too short: it has {n} tokens, so the {name} part "
                f"(--val_split {val_split}) has {size}, but one block needs block_size + 1 "
                f"= {need}; use a longer input file, a smaller --block_size, or another "
                "--val_split"
            )
    return n_train


def check_long_enough(
    path: Path, tokenizer: Tokenizer, val_split: float, block_size: int, source: str
) -> None:
    """MyPTError if the text is too short for a block in each split; reads only, writes nothing.

    A token is at most MAX_TOKEN_BYTES bytes, so only a file too small to be surely long
    enough is tokenized (in memory) to count; load_splits checks the same rule on the cache.
    """
    surely_tokens = Path(path).stat().st_size // MAX_TOKEN_BYTES
    if surely_tokens * min(val_split, 1 - val_split) >= block_size + 2:
        return
    text = Path(path).read_text(encoding="utf-8")
    _split_point(len(tokenizer.encode(text, what=f"input file {path}")), val_split, block_size, source)


def _windows(
    data: np.ndarray, starts: np.ndarray, block_size: int, device: str | torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """x = data[s : s + block_size] and y = data[s + 1 : s + block_size + 1] for each start s."""
    device = torch.device(device)
    windows = data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)
    x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return x.to(device), y.to(device)


def batch_at(
    data: np.ndarray,
    block_size: int,
    batch_size: int,
    seed: int,
    index: int,
    device: str | torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch number `index` of the stream for `seed`: a pure function of (seed, index).

    Stateless, so resuming a run needs no sampler state: the trainer passes a global batch index.
    """
    assert len(data) >= block_size + 1, "load_splits guarantees one block fits"
    rng = np.random.default_rng((seed, index))
    starts = rng.integers(0, len(data) - block_size, size=batch_size)
    return _windows(data, starts, block_size, device)
