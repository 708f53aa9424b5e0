"""The train / validation split: which text validates. The one owner of the rule, decided on
the text alone, before any tokenizer exists.

- A source of several documents validates on whole documents: a document validates when its
  key (prepare.doc_keys: a hash of its file's name and its row) falls below val_split * 2**32,
  so about that fraction of the documents is held out, the same ones on every machine and every
  run, and a document keeps its side when files are added. Each side gets at least one: if no
  key is below the threshold, the lowest-keyed document validates, and if every key is, the
  highest-keyed one trains (the first of equal keys). training_text.TrainingText applies the
  same rule while it streams the text.
- A source of one text file is one document. It validates on its last val_split of its bytes,
  from `cut_of`: the last place before that point where every tokenizer splits anyway (before
  a line break that follows a letter or digit, else before whitespace that does, see
  sources.split_safely) within CUT_SEARCH bytes, else the character boundary at that point.
  The prepare pass ends a piece of the text there, so no token crosses the cut, and records
  the token at which validation starts; a bpe tokenizer learns from the text before it.
- A JSON lines or Parquet source of a single document has nothing to split: it is refused.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from mypt.data.sources import InputFile, split_safely, text_bytes, text_size
from mypt.errors import MyPTError

CUT_SEARCH = 1 << 20  # bytes before the point searched for a line break or whitespace to cut at


@dataclass(frozen=True)
class Split:
    """Where a dataset's tokens go: runs [start, end) of its token stream."""

    train: np.ndarray
    val: np.ndarray
    val_documents: int
    n_documents: int

    def tokens(self, runs: np.ndarray) -> int:
        return int((runs[:, 1] - runs[:, 0]).sum())


def one_document(files: Sequence[InputFile]) -> bool:
    """True for a source of one text file: it splits by bytes, not by documents."""
    return len(files) == 1 and files[0].kind == "text"


def cut_of(files: Sequence[InputFile], val_split: float) -> int | None:
    """The byte of a one-text-file source's text at which its validation starts (None: the source
    splits by documents, or val_split 0 validates on nothing)."""
    if not one_document(files) or val_split == 0:
        return None
    f = files[0]
    st = f.path.stat()
    return _text_cut(f, st.st_size, st.st_mtime_ns, val_split)


@lru_cache(maxsize=64)
def _text_cut(f: InputFile, size: int, mtime_ns: int, val_split: float) -> int:
    """cut_of for a file of this size and mtime (so a compressed file is measured once per run)."""
    del size, mtime_ns  # they key the cache
    n_bytes = text_size(f)
    point = max(0, min(int(n_bytes * (1 - val_split)), n_bytes - 1))  # some text validates
    start = max(0, point - CUT_SEARCH)
    raw = text_bytes(f, start, point)
    lead = 0
    while lead < min(3, len(raw)) and start > 0 and raw[lead] & 0xC0 == 0x80:  # the end of a character
        lead += 1
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(raw[lead:])  # a character cut at `point` is left off
    except UnicodeDecodeError:
        return point  # not UTF-8: reading the file refuses it, naming the first bad byte
    head, _ = split_safely(text, force=True)
    return start + lead + len(head.encode("utf-8", errors="surrogatepass"))


def val_threshold(val_split: float) -> int:
    """A document whose key is below this validates (see the module docstring for the exceptions)."""
    return int(val_split * 2**32)


def validates(keys: np.ndarray, val_split: float) -> np.ndarray:
    """Which of several documents (by their keys) validate: below the threshold, at least one on
    each side (also mypt.finetune's conversations)."""
    is_val = keys.astype(np.uint64) < np.uint64(val_threshold(val_split))
    if not is_val.any():
        is_val[int(np.argmin(keys))] = True
    if is_val.all():
        is_val[int(np.argmax(keys))] = False
    return is_val


def split(ends: np.ndarray, keys: np.ndarray, val_split: float, cut_token: int | None, label: str) -> Split:
    """Train and validation runs for documents ending at `ends`; `cut_token`: a one-text-file
    source's first validation token (see the module docstring)."""
    n = len(ends)
    if cut_token is not None:
        return Split(np.array([[0, cut_token]]), np.array([[cut_token, int(ends[0])]]), 0, 1)
    if n == 1:
        raise one_record_error(label)
    is_val = validates(keys, val_split)
    change = np.flatnonzero(is_val[1:] != is_val[:-1]) + 1
    first = np.concatenate([[0], change])
    last = np.concatenate([change, [n]]) - 1
    starts = np.where(first == 0, 0, ends[np.maximum(first - 1, 0)].astype(np.int64))
    runs = np.stack([starts, ends[last].astype(np.int64)], axis=1)
    val = is_val[first]
    return Split(runs[~val], runs[val], int(is_val.sum()), n)


def one_record_error(label: str) -> MyPTError:
    return MyPTError(f"{label} holds one document (one JSON line or Parquet row): validation takes whole "
                     "documents, so one is not enough; add documents, or pass its text as a plain text file "
                     "(a text file validates on its last --val_split)")
