"""A prepared dataset on disk: is it still current, and its train / validation streams.

A dataset is current when its manifest lists the same files and every file's size and mtime
match; only a file whose size or mtime differ is hashed again, and if its content is the same
the manifest takes the new size and mtime. Opening one reads the manifest and the document
index, and maps the shards; nothing else is read, whatever the corpus size.

Validation is chosen by whole documents: a document goes to validation when its key (a hash
of its file's name and its row, see prepare.doc_keys) falls below val_split, so about that
fraction of the documents is held out, the same ones on every machine and every run, and a
document stays on its side when files are added. At least one document goes to each side. A
dataset of one document (one text file) keeps MyPT's earlier rule: the last val_split of its
tokens is validation, so results on one file compare with earlier runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mypt.data.prepare import FORMAT
from mypt.data.sampler import Shards, TokenStream
from mypt.data.sources import InputFile, hash_file
from mypt.errors import MyPTError
from mypt.fsutil import atomic_write_bytes, json_bytes, read_json


@dataclass(frozen=True)
class Split:
    """Where a dataset's tokens go: runs [start, end) of its token stream."""

    train: np.ndarray
    val: np.ndarray
    val_documents: int
    n_documents: int

    def tokens(self, runs: np.ndarray) -> int:
        return int((runs[:, 1] - runs[:, 0]).sum())


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest if it is whole and of this format, and its shards are all there."""
    path = folder / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = read_json(path)
        if manifest.get("format") != FORMAT:
            return None
        for shard in manifest["shards"]:
            size = shard["tokens"] * np.dtype(shard["dtype"]).itemsize
            if (folder / shard["file"]).stat().st_size != size:
                return None
    except (MyPTError, OSError, KeyError, TypeError, ValueError, AttributeError):
        return None
    return manifest


def current_manifest(folder: Path, files: list[InputFile]) -> tuple[dict[str, Any] | None, list[int]]:
    """(manifest, files whose size or mtime changed but whose content did not), or (None, [])
    when the dataset is missing or its files differ. Hashes only the files whose stat changed."""
    manifest = read_manifest(folder)
    if manifest is None or [m["path"] for m in manifest["files"]] != [str(f.path) for f in files]:
        return None, []
    touched = []
    for i, (f, m) in enumerate(zip(files, manifest["files"], strict=True)):
        st = f.path.stat()
        if (st.st_size, st.st_mtime_ns) != (m["size"], m["mtime_ns"]):
            if hash_file(f) != m["sha256"]:
                return None, []
            m["size"], m["mtime_ns"] = st.st_size, st.st_mtime_ns
            touched.append(i)
    return manifest, touched


def save_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(folder / "manifest.json", json_bytes(manifest), f"the prepared data {folder}/manifest.json")


def shards(folder: Path, manifest: dict[str, Any]) -> Shards:
    s = manifest["shards"]
    return Shards.open([folder / x["file"] for x in s], [x["dtype"] for x in s], [x["tokens"] for x in s])


def documents(folder: Path, manifest: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(end offsets, keys) of every document, in order."""
    n = manifest["n_documents"]
    ends, keys = np.empty(n, dtype=np.uint64), np.empty(n, dtype=np.uint32)
    at = 0
    for shard in manifest["shards"]:
        k = shard["documents"]
        raw = np.fromfile(folder / shard["docs"], dtype=np.uint8)
        ends[at:at + k] = raw[: 8 * k].view(np.uint64)
        keys[at:at + k] = raw[8 * k:].view(np.uint32)
        at += k
    return ends, keys


def split(ends: np.ndarray, keys: np.ndarray, val_split: float) -> Split:
    """Train and validation runs for documents ending at `ends` (see the module docstring)."""
    n = len(ends)
    if n == 1:
        body = int(ends[0]) - 1  # the end-of-text stays with the tail
        cut = int(body * (1 - val_split))
        return Split(np.array([[0, cut]]), np.array([[cut, int(ends[0])]]), 0, 1)
    is_val = keys.astype(np.uint64) < np.uint64(int(val_split * 2**32))
    if not is_val.any():
        is_val[int(np.argmin(keys))] = True
    if is_val.all():
        is_val[int(np.argmax(keys))] = False
    change = np.flatnonzero(is_val[1:] != is_val[:-1]) + 1
    first = np.concatenate([[0], change])
    last = np.concatenate([change, [n]]) - 1
    starts = np.where(first == 0, 0, ends[np.maximum(first - 1, 0)].astype(np.int64))
    runs = np.stack([starts, ends[last].astype(np.int64)], axis=1)
    val = is_val[first]
    return Split(runs[~val], runs[val], int(is_val.sum()), n)


def streams(folder: Path, manifest: dict[str, Any], val_split: float, table: np.ndarray | None,
            name: str) -> tuple[TokenStream, TokenStream, Split]:
    """The train and validation streams of a dataset, memory-mapped."""
    s = split(*documents(folder, manifest), val_split)
    store = shards(folder, manifest)
    return TokenStream(store, s.train, table, name), TokenStream(store, s.val, table, name), s
