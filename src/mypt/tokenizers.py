"""Tokenizers: text <-> token ids, and their JSON form.

This module owns the two tokenizers MyPT supports ("gpt2": GPT-2 BPE built offline from the
shipped ranks file; "char": one id per character of the training text), their common interface,
saving/loading them as JSON, and StreamDecoder for printing generated tokens as they arrive.
It knows nothing about the model, the data pipeline or the CLI.
"""

from __future__ import annotations

import abc
import base64
import codecs
import functools
import hashlib
import importlib.resources
import itertools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tiktoken

from mypt.errors import MyPTError

GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = "<|endoftext|>"
GPT2_EOT_ID = 50256
KNOWN_KINDS = ("gpt2", "char")
_MAX_LISTED_CHARS = 10


class Tokenizer(abc.ABC):
    """What every tokenizer offers. `what` in encode names the text in error messages."""

    kind: str
    n_vocab: int
    eot_id: int | None  # the end-of-text token that ends every training document (None: a legacy char model)

    @abc.abstractmethod
    def encode(self, text: str, what: str = "prompt") -> list[int]:
        """Token ids of `text` (special-token strings are ordinary text)."""

    @abc.abstractmethod
    def encode_array(self, text: str, what: str = "prompt") -> np.ndarray:
        """encode() as a numpy integer array, without a Python list in between (large texts)."""

    @abc.abstractmethod
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw UTF-8 bytes of `ids` (may end inside a multibyte character)."""

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @abc.abstractmethod
    def start_ids(self) -> list[int]:
        """The ids an empty prompt starts from."""

    @abc.abstractmethod
    def to_json(self) -> dict:
        """A JSON-serialisable dict that tokenizer_from_json() turns back into this tokenizer."""

    @abc.abstractmethod
    def id_string(self) -> str:
        """A short stable key (safe in file names) that changes whenever the ids would."""


# ---------------------------------------------------------------------------------------------
# GPT-2


def _gpt2_ranks_bytes() -> bytes:
    resource = importlib.resources.files("mypt") / "assets" / "gpt2.tiktoken"
    try:
        data = resource.read_bytes()
    except OSError as e:
        raise MyPTError(
            f"cannot read the shipped GPT-2 ranks file {resource} ({e}); reinstall mypt"
        ) from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_SHA256:
        raise MyPTError(
            f"the shipped GPT-2 ranks file {resource} is corrupted (sha256 {digest}, expected "
            f"{GPT2_SHA256}); reinstall mypt"
        )
    return data


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    """Parse tiktoken's "<base64 token> <rank>" lines (same format load_tiktoken_bpe reads)."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """The GPT-2 tiktoken Encoding, built from the verified shipped file (never the network).

    The ranks are parsed from the bytes whose sha256 was just checked, rather than through
    tiktoken.load.load_tiktoken_bpe, which reads and writes a shared cache in the temp dir.
    """
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=_parse_ranks(_gpt2_ranks_bytes()),
        special_tokens={GPT2_EOT: GPT2_EOT_ID},
    )


class GPT2Tokenizer(Tokenizer):
    """GPT-2 byte-level BPE (50257 ids, id 50256 is <|endoftext|>)."""

    kind = "gpt2"
    eot_id = GPT2_EOT_ID

    def __init__(self) -> None:
        self._enc = gpt2_encoding()
        self.n_vocab = self._enc.n_vocab

    @property
    def tiktoken_encoding(self) -> tiktoken.Encoding:
        """The tiktoken Encoding underneath (the data module encodes whole batches of documents with it)."""
        return self._enc

    def encode(self, text: str, what: str = "prompt") -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_array(self, text: str, what: str = "prompt") -> np.ndarray:
        # no special tokens allowed and none disallowed: the same ids as encode_ordinary, and
        # tiktoken releases the GIL for the whole call, so threads tokenize side by side
        return self._enc.encode_to_numpy(text, disallowed_special=())

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self._enc.decode_bytes([int(i) for i in ids])

    def start_ids(self) -> list[int]:
        return [GPT2_EOT_ID]

    def to_json(self) -> dict:
        return {"kind": "gpt2"}

    def id_string(self) -> str:
        return "gpt2"


# ---------------------------------------------------------------------------------------------
# Characters


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)


def _sorted_unique(chars: Sequence[str]) -> bool:
    return all(a < b for a, b in itertools.pairwise(chars))


def _format_chars(chars: Sequence[str]) -> str:
    shown = ", ".join(repr(c) for c in chars[:_MAX_LISTED_CHARS])
    more = len(chars) - _MAX_LISTED_CHARS
    return shown + (f" and {more} more" if more > 0 else "")


class CharTokenizer(Tokenizer):
    """One id per character; ids are indices into the sorted list of the training characters,
    and the id after them is the end-of-text (eot=False: a model saved before it existed)."""

    kind = "char"

    def __init__(self, chars: Sequence[str], eot: bool = True) -> None:
        assert chars and all(len(c) == 1 for c in chars), "chars must be single characters"
        assert _sorted_unique(chars), "chars must be sorted and unique"
        self.chars = list(chars)
        self.eot_id = len(self.chars) if eot else None
        self.n_vocab = len(self.chars) + eot
        self._points = _code_points("".join(self.chars))

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        if not text:
            raise MyPTError("the char tokenizer needs a non-empty training text")
        return cls(sorted(set(text)))

    def encode(self, text: str, what: str = "prompt") -> list[int]:
        return self.encode_array(text, what).tolist()

    def encode_array(self, text: str, what: str = "prompt") -> np.ndarray:
        points = _code_points(text)
        ids = np.searchsorted(self._points, points)
        np.minimum(ids, len(self.chars) - 1, out=ids)
        unknown = self._points[ids] != points
        if unknown.any():
            self._raise_unknown(text, unknown, what)
        return ids

    def _raise_unknown(self, text: str, unknown: np.ndarray, what: str) -> None:
        bad = sorted({text[i] for i in np.flatnonzero(unknown).tolist()})
        raise MyPTError(
            f"{what} contains characters not in this model's vocabulary: {_format_chars(bad)} "
            "(the char tokenizer only knows the characters of its training text)"
        )

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8", errors="surrogatepass")

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
        return "".join(chars[i] if i < len(chars) else GPT2_EOT for i in map(int, ids))

    def start_ids(self) -> list[int]:
        points = self._points
        newline = int(np.searchsorted(points, ord("\n")))
        found = newline < len(points) and int(points[newline]) == ord("\n")
        return [newline] if found else [0]

    def to_json(self) -> dict:
        return {"kind": "char", "chars": list(self.chars), **({"eot": True} if self.eot_id is not None else {})}

    def id_string(self) -> str:
        digest = hashlib.sha256("".join(self.chars).encode("utf-8", errors="surrogatepass"))
        return "char-" + digest.hexdigest()[:12] + ("" if self.eot_id is not None else "-noeot")


# ---------------------------------------------------------------------------------------------
# Construction and JSON


def _unknown_kind(kind: object, where: str) -> MyPTError:
    known = ", ".join(repr(k) for k in KNOWN_KINDS)
    return MyPTError(f"{where}unknown tokenizer kind {kind!r}; the known kinds are {known}")


def build_tokenizer(kind: str, text: str | None = None) -> Tokenizer:
    """A new tokenizer of `kind`; "char" builds its vocabulary from `text`."""
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":
        if text is None:
            raise ValueError("build_tokenizer('char') needs the training text")
        return CharTokenizer.from_text(text)
    raise _unknown_kind(kind, "")


def _chars_from_json(chars: object, source: str) -> list[str]:
    ok = (
        isinstance(chars, list)
        and len(chars) > 0
        and all(isinstance(c, str) and len(c) == 1 for c in chars)
        and _sorted_unique(chars)
    )
    if not ok:
        raise MyPTError(
            f"{source}: the char tokenizer's 'chars' must be a non-empty, sorted list of distinct "
            "single characters; the file is damaged, restore or re-create it"
        )
    return chars  # type: ignore[return-value]


def tokenizer_from_json(d: dict, source: str) -> Tokenizer:
    """The tokenizer described by `d` (as made by to_json); `source` names it in errors."""
    if not isinstance(d, dict):
        raise MyPTError(f"{source}: tokenizer description must be a JSON object, got {d!r:.80}")
    kind = d.get("kind")
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":
        return CharTokenizer(_chars_from_json(d.get("chars"), source), eot=d.get("eot") is True)
    raise _unknown_kind(kind, f"{source}: ")


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write `tok` as JSON to `path` (not atomic; the caller handles that)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tok.to_json(), f, ensure_ascii=False)
        f.write("\n")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer saved by save_tokenizer()."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MyPTError(f"cannot read tokenizer file {path} ({e}); check the path") from e
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise MyPTError(
            f"tokenizer file {path} is not valid JSON (line {e.lineno}, column {e.colno}: "
            f"{e.msg}); the file is damaged, restore or re-create it"
        ) from e
    return tokenizer_from_json(d, str(path))


# ---------------------------------------------------------------------------------------------
# Streaming


class StreamDecoder:
    """Turns generated ids into text piece by piece, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """The text that `token_id` completes ("" while a character is still incomplete)."""
        return self._decoder.decode(self._tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        """Whatever is held back (an incomplete character becomes U+FFFD); resets the decoder."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text
