"""Choosing, saving and loading a tokenizer: its kind name, its tokenizer.json form, and files."""

from __future__ import annotations

from pathlib import Path

from mypt.errors import MyPTError
from mypt.fsutil import atomic_write_bytes, check_regular_file, json_bytes, read_json
from mypt.tokenizers.base import Tokenizer
from mypt.tokenizers.bpe import bpe_from_json
from mypt.tokenizers.char import CharTokenizer, char_from_json
from mypt.tokenizers.gpt2 import GPT2Tokenizer, gpt2_from_json
from mypt.tokenizers.hf_bpe import hf_bpe_from_json

KNOWN_KINDS = ("gpt2", "char", "bpe")


def _unknown_kind(kind: object, where: str) -> MyPTError:
    known = ", ".join(repr(k) for k in KNOWN_KINDS)
    return MyPTError(f"{where}unknown tokenizer kind {kind!r}; the known kinds are {known}")


def build_tokenizer(kind: str, text: str | None = None) -> Tokenizer:
    """A new tokenizer of `kind`; "char" builds its vocabulary from `text` (bpe: tokenizers.train_bpe)."""
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":
        if text is None:
            raise ValueError("build_tokenizer('char') needs the training text")
        return CharTokenizer.from_text(text)
    if kind == "bpe":
        raise ValueError("a bpe tokenizer is trained: use mypt.tokenizers.train_bpe")
    raise _unknown_kind(kind, "")


def tokenizer_from_json(d: dict, source: str) -> Tokenizer:
    """The tokenizer described by `d` (as made by to_json); `source` names it in errors."""
    if not isinstance(d, dict):
        raise MyPTError(f"{source}: tokenizer description must be a JSON object, got {d!r:.80}")
    kind = d.get("kind")
    if kind == "gpt2":
        return gpt2_from_json(d, source)
    if kind == "char":
        return char_from_json(d, source)
    if kind == "bpe":
        return bpe_from_json(d, source)
    if kind == "hf_bpe":  # an imported model's own tokenizer (mypt import), never built or trained here
        return hf_bpe_from_json(d, source)
    if kind is None:
        raise MyPTError(f"{source}: not a MyPT tokenizer file (it has no \"kind\"); pass a tokenizer.json "
                        "that MyPT wrote (mypt tokenizer train, or a checkpoint's)")
    raise _unknown_kind(kind, f"{source}: ")


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write `tok` as JSON to `path`, atomically."""
    atomic_write_bytes(Path(path), json_bytes(tok.to_json()), f"tokenizer file {path}")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer saved by save_tokenizer() (or a checkpoint's tokenizer.json)."""
    return tokenizer_from_json(read_json(Path(path), "tokenizer"), str(path))


def tokenizer_file(path: str) -> Tokenizer:
    """The tokenizer saved in the file `path` (--tokenizer FILE.json)."""
    if not Path(path).exists():
        known = ", ".join(KNOWN_KINDS)
        raise MyPTError(f"--tokenizer {path}: no such file; pass one of {known}, or a tokenizer .json file "
                        "(mypt tokenizer train writes one)")
    check_regular_file(path, f"--tokenizer {path}")
    return load_tokenizer(path)


def tokenizer_for(choice: str) -> Tokenizer:
    """--tokenizer gpt2 or FILE.json as a tokenizer (char and bpe ones are made from the data)."""
    return build_tokenizer("gpt2") if choice == "gpt2" else tokenizer_file(choice)
