"""A prepared dataset on disk: is it still current, and its train / validation streams.

A dataset is current when its manifest lists the same files and every file's size and mtime
match; only a file whose size or mtime differ is hashed again, and if its content is the same
the manifest takes the new size and mtime. Opening one reads the manifest and the document
index, and maps the shards; nothing else is read, whatever the corpus size. Which tokens
validate is split.py's rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mypt.data import split as splits
from mypt.data.prepare import FORMAT
from mypt.data.sampler import Shards, TokenStream
from mypt.data.sources import InputFile, hash_file
from mypt.errors import MyPTError
from mypt.fsutil import atomic_write_bytes, json_bytes, read_json


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest if it is whole and of this format, and its shards are all there."""
    path = folder / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = read_json(path)
        if manifest.get("format") != FORMAT or not isinstance(manifest["cut"], dict | None):
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


def streams(folder: Path, manifest: dict[str, Any], val_split: float, table: np.ndarray | None,
            name: str, label: str) -> tuple[TokenStream, TokenStream, splits.Split]:
    """The train and validation streams of a dataset, memory-mapped."""
    ends, keys = documents(folder, manifest)
    cut = manifest["cut"]
    if cut is not None:
        assert cut["val_split"] == val_split, "the dataset folder's name includes the val_split it was cut for"
    s = splits.split(ends, keys, val_split, None if cut is None else cut["token"], label)
    store = shards(folder, manifest)
    return TokenStream(store, s.train, table, name), TokenStream(store, s.val, table, name), s
