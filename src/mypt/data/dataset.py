"""A prepared dataset on disk: is it still current, and its train / validation streams.

A dataset is current when its manifest lists the same files and every file's size and mtime
match; only a file whose size or mtime differ is hashed again, and if its content is the same
the manifest takes the new size and mtime. Opening one reads the manifest and the document
index, and maps the shards; nothing else is read, whatever the corpus size. What is read back
is checked before it is used: the document index and the cut against the manifest when a
dataset is opened, and every token id against the vocabulary as the sampler reads it, so a
damaged cache is one message naming its folder. Which tokens validate is split.py's rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mypt.data import split as splits
from mypt.data.prepare import FORMAT
from mypt.data.sampler import Shards, TokenStream, damaged
from mypt.data.sources import InputFile, hash_file
from mypt.errors import MyPTError
from mypt.fsutil import atomic_write_bytes, json_bytes, read_json


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest if it is whole, of this format and well formed, and its shards are all
    there (None: the dataset is prepared again)."""
    path = folder / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = read_json(path)
        if manifest.get("format") != FORMAT or not _well_formed(manifest):
            return None
        for shard in manifest["shards"]:
            size = shard["tokens"] * np.dtype(shard["dtype"]).itemsize
            if (folder / shard["file"]).stat().st_size != size:
                return None
    except (MyPTError, OSError, KeyError, TypeError, ValueError, AttributeError):
        return None
    return manifest


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _well_formed(m: dict[str, Any]) -> bool:
    """Every field that opening the dataset reads has its type (a KeyError or TypeError: not so)."""
    shards, cut, tok = m["shards"], m["cut"], m["tokenizer"]
    names = [(s["file"], s["docs"]) for s in shards]
    return (all(_count(v) for v in (m["n_tokens"], m["n_documents"], *(s["tokens"] for s in shards),
                                    *(s["documents"] for s in shards)))
            and sum(s["tokens"] for s in shards) == m["n_tokens"]
            and sum(s["documents"] for s in shards) == m["n_documents"]
            and names == [(f"{k:05d}.bin", f"{k:05d}.docs") for k in range(len(shards))]
            and all(s["dtype"] in ("uint16", "uint32") for s in shards)
            and all(isinstance(f["path"], str) and _count(f["size"]) and _count(f["mtime_ns"])
                    and isinstance(f["sha256"], str) for f in m["files"])
            and isinstance(m["content_sha256"], str) and isinstance(tok["kind"], str)
            and all(isinstance(c, str) and len(c) == 1 for c in tok.get("chars", []))
            and (cut is None or (_count(cut["byte"]) and _count(cut["token"]) and isinstance(cut["val_split"], float))))


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
    """(end offsets, keys) of every document, in order; a MyPTError if they do not fit the manifest."""
    n = manifest["n_documents"]
    ends, keys = np.empty(n, dtype=np.uint64), np.empty(n, dtype=np.uint32)
    at = 0
    for shard in manifest["shards"]:
        k = shard["documents"]
        raw = np.fromfile(folder / shard["docs"], dtype=np.uint8)
        if len(raw) != 12 * k or at + k > n:
            raise damaged(folder, f"{shard['docs']} does not hold the {k} documents its manifest lists")
        ends[at:at + k] = raw[: 8 * k].view(np.uint64)
        keys[at:at + k] = raw[8 * k:].view(np.uint32)
        at += k
    if at != n or not n or int(ends[-1]) != manifest["n_tokens"] or (np.diff(ends.astype(np.int64)) <= 0).any():
        raise damaged(folder, "its document index does not fit its manifest")
    return ends, keys


def streams(folder: Path, manifest: dict[str, Any], val_split: float, table: np.ndarray | None,
            n_ids: int, name: str, label: str) -> tuple[TokenStream, TokenStream, splits.Split]:
    """The train and validation streams of a dataset, memory-mapped; `n_ids`: the stored ids are below it."""
    ends, keys = documents(folder, manifest)
    cut = manifest["cut"]
    if cut is not None:
        assert cut["val_split"] == val_split, "the dataset folder's name includes the val_split it was cut for"
        if not 0 <= cut["token"] < int(ends[0]):
            raise damaged(folder, "its manifest's cut lies outside its document")
    s = splits.split(ends, keys, val_split, None if cut is None else cut["token"], label)
    store = shards(folder, manifest)
    return (TokenStream(store, s.train, table, name, n_ids), TokenStream(store, s.val, table, name, n_ids), s)
