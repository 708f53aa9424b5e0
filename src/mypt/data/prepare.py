"""One pass over a source's files: check, hash, tokenize, write shards, then the manifest.

A prepared dataset is a folder in the token cache:

    NNNNN.bin    token ids, uint16 where they fit (else uint32), `shard_tokens` per shard
    NNNNN.docs   the documents whose end-of-text lies in the shard: end offsets (uint64, in the
                 whole dataset's token stream, just past the end-of-text), then keys (uint32)
    manifest.json  written last: the files (sizes, mtimes, sha256, documents, tokens), the
                 content hash, the tokenizer and its hash, the shards with their sha256, and
                 for a source of one text file where its validation starts (`cut`: the byte
                 and the token, for the val_split it was prepared for; see split.py)

Every file is read once. The main thread reads, decompresses, checks and hashes; tokenizer
threads, one per core this process may use (tiktoken releases the GIL), encode batches of
documents side by side; the main thread collects the finished batches in order. At most
`workers + 1` batches are in flight and one shard is held until it is full (128 MiB at the
default size), so memory does not grow with the corpus. Each full shard is written through
fsutil.atomic_write like every other file.

Char datasets do not need the vocabulary in advance: each new character gets the next id in
order of first appearance (id 0 is the end-of-text), and the manifest lists the characters in
that order. The sampler maps these ids to a char tokenizer's ids as it reads (a 1-D lookup per
batch), so the input is read once and no shard is rewritten; any char model whose vocabulary
holds these characters can train on the same shards.

Crash safety: a shard is written to a temp name and renamed when whole; then its record
(NNNNN.json) says where in the input the next shard starts. A prepare killed at any point and
run again keeps the shards whose records and sha256 check out, restarts from the place the last
record names, and writes byte for byte what one uninterrupted pass writes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mypt.data.sources import CHUNK_SIZE, InputFile, Item, check_readable, items
from mypt.data.split import cut_of
from mypt.errors import MyPTError
from mypt.fsutil import (
    FileLock,
    LockHeld,
    atomic_write,
    is_temp_name,
    json_bytes,
    read_json,
    sha256_file,
)
from mypt.tokenizers import Tokenizer

FORMAT = 2  # 2: a source of one text file splits by bytes, at the cut its manifest records
SHARD_TOKENS = 1 << 26  # 64 Mi tokens: 128 MiB as uint16
CHAR_EOT = 0  # a char dataset's end-of-text id; characters are 1, 2, ... in order of first appearance
_SENTINEL = 0x110000  # the end-of-text among code points: one above the last code point
_UINT16_MAX = 65535
_KEPT = "shards already finished are kept: run the same command again to continue"


class WriteFailed(MyPTError):
    """Writing the prepared data failed (a full disk, say): what was finished is kept."""


def _write_bytes(path: Path, data: bytes) -> None:
    _write(path, [data])


def _write(path: Path, parts: Sequence[Any]) -> None:
    """Write the buffers `parts` as the file `path`, atomically."""
    try:
        atomic_write(path, lambda f: [f.write(part) for part in parts], f"the prepared data {path}")
    except MyPTError as e:
        raise WriteFailed(f"{e} ({_KEPT})") from None


def tokenize_threads() -> int:
    """The cores this process may run on (its CPU affinity, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def doc_keys(name: str, rows: np.ndarray) -> np.ndarray:
    """A uint32 key per document (file name, row), uniform and stable: it decides validation."""
    base = np.uint64(int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little"))
    x = rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ base
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(32)).astype(np.uint32)


# ---------------------------------------------------------------------------------------------
# Encoders: a batch of items -> token ids (in a worker thread), then finish() in order


@dataclass
class Batch:
    """Items of consecutive files, as columns, and the files that ended within it."""

    texts: list[str] = field(default_factory=list)
    ends: list[bool] = field(default_factory=list)
    files: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    done: dict[int, dict[str, Any]] = field(default_factory=dict)  # file index -> size, mtime, sha256
    n_chars: int = 0

    def add(self, file_index: int, item: Item) -> None:
        self.texts.append(item.text)
        self.ends.append(item.doc_end)
        self.files.append(file_index)
        self.positions.append(item.position)
        self.rows.append(item.row)
        self.n_chars += len(item.text)


def _unencodable(files: Sequence[InputFile], batch: Batch, i: int, exc: UnicodeEncodeError) -> MyPTError:
    f = files[batch.files[i]]
    where = f"line {batch.rows[i] + 1}" if f.kind == "jsonl" else f"row {batch.rows[i]}" if f.kind == "parquet" \
        else f"byte {batch.positions[i]}"
    return MyPTError(f"input file {f.label} {where}: the text holds {exc.object[exc.start:exc.end]!r}, an unpaired "
                     "surrogate that is not a character (a bad \\ud800-style escape?); fix or remove it")


def _joiner(tokenizer: Tokenizer) -> tuple[Any, str] | None:
    """(tiktoken Encoding, the special text it encodes as the end-of-text) if the tokenizer has both."""
    enc = getattr(tokenizer, "tiktoken_encoding", None)
    if enc is None:
        return None
    texts = [t for t in enc.special_tokens_set if enc.encode_single_token(t) == tokenizer.eot_id]
    return (enc, texts[0]) if texts else None


class TokenizerEncoder:
    """Ids from a tokenizer (gpt2, or any kind with an eot_id), an end-of-text after each document.

    With a tiktoken tokenizer, a run of whole documents is encoded in one call, joined by the
    end-of-text text (which tiktoken then encodes as that one token, each document on its own):
    the same ids as one call per document, with less per-call work and fewer GIL hand-overs. A
    run where a document itself holds that text is encoded document by document, so the text
    stays text.
    """

    def __init__(self, tokenizer: Tokenizer, files: Sequence[InputFile]) -> None:
        self.tokenizer, self.files = tokenizer, files
        self.key = tokenizer.id_string()
        self.eot = np.array([tokenizer.eot_id], dtype=np.uint32)
        self.joiner = _joiner(tokenizer)

    def encode(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        parts, lengths = [], np.empty(len(batch.texts), dtype=np.int64)
        i = 0
        while i < len(batch.texts):
            j = i + 1
            while self.joiner and batch.ends[i] and j < len(batch.texts) and batch.ends[j]:
                j += 1
            if j - i > 1 and self._encode_joined(batch, i, j, parts, lengths):
                i = j
                continue
            for k in range(i, j):
                self._encode_one(batch, k, parts, lengths)
            i = j
        return (np.concatenate(parts) if parts else np.empty(0, np.uint32)), lengths

    def _encode_one(self, batch: Batch, i: int, parts: list[np.ndarray], lengths: np.ndarray) -> None:
        try:
            ids = self.tokenizer.encode_array(batch.texts[i], what="the input")
        except UnicodeEncodeError as e:
            raise _unencodable(self.files, batch, i, e) from None
        parts.append(ids.astype(np.uint32, copy=False))
        if batch.ends[i]:
            parts.append(self.eot)
        lengths[i] = len(ids) + batch.ends[i]

    def _encode_joined(self, batch: Batch, i: int, j: int, parts: list[np.ndarray], lengths: np.ndarray) -> bool:
        """Documents i..j-1 in one call; False (nothing done) if one holds the end-of-text text."""
        enc, sep = self.joiner
        joined = sep.join(batch.texts[i:j]) + sep
        if joined.count(sep) != j - i:
            return False
        try:
            ids = enc.encode_to_numpy(joined, allowed_special={sep}, disallowed_special=())
        except UnicodeEncodeError:
            return False  # one by one, to name the document
        ends = np.flatnonzero(ids == self.eot[0])
        assert len(ends) == j - i, "the end-of-text only comes from the joins"
        lengths[i:j] = np.diff(ends, prepend=-1)
        parts.append(ids)
        return True

    def finish(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return tokens, None

    def describe(self) -> dict[str, Any]:
        spec = self.tokenizer.to_json()
        return {"kind": self.tokenizer.kind, "id": self.key, "eot": int(self.eot[0]),
                "sha256": hashlib.sha256(json_bytes(spec)).hexdigest()}


class CharEncoder:
    """Code points in the workers; ids by first appearance in finish(), which runs in order."""

    key = "chars"

    def __init__(self, files: Sequence[InputFile], chars: Sequence[str] = ()) -> None:
        self.files = files
        self.lut = np.full(_SENTINEL + 1, -1, dtype=np.int64)
        self.lut[_SENTINEL] = CHAR_EOT
        self.chars: list[str] = []
        for c in chars:
            self._add(ord(c))

    def _add(self, point: int) -> None:
        self.chars.append(chr(point))
        self.lut[point] = len(self.chars)

    def encode(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        parts, lengths = [], np.empty(len(batch.texts), dtype=np.int64)
        eot = np.array([_SENTINEL], dtype=np.uint32)
        for i, (text, end) in enumerate(zip(batch.texts, batch.ends, strict=True)):
            try:
                points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            except UnicodeEncodeError as e:
                raise _unencodable(self.files, batch, i, e) from None
            parts.append(points)
            if end:
                parts.append(eot)
            lengths[i] = len(points) + end
        return (np.concatenate(parts) if parts else np.empty(0, np.uint32)), lengths

    def finish(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(ids, where each new character first appears in this batch, in id order)."""
        ids = self.lut[points]
        missing = np.flatnonzero(ids < 0)
        if not len(missing):
            return ids, None
        new, first = np.unique(points[missing], return_index=True)
        order = np.argsort(first, kind="stable")
        for point in new[order].tolist():
            self._add(point)
        return self.lut[points], missing[first[order]]

    def describe(self) -> dict[str, Any]:
        text = "".join(self.chars)
        return {"kind": "chars", "id": self.key, "eot": CHAR_EOT, "chars": list(self.chars),
                "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


Encoder = TokenizerEncoder | CharEncoder


# ---------------------------------------------------------------------------------------------
# Progress: what a record holds, so that a killed prepare starts again where it was


@dataclass
class Progress:
    shard: int = 0  # the next shard's number
    tokens: int = 0  # tokens in finished shards
    documents: int = 0  # documents whose end-of-text lies in finished shards
    file: int = 0  # the item the next shard continues in: its file, position and row,
    position: int = 0
    row: int = 0
    skip: int = 0  # and how many of its tokens are already in finished shards
    file_documents: int = 0  # the counts of that file before that item
    file_tokens: int = 0
    n_chars: int = 0  # char datasets: the characters seen before that item
    cut_token: int = -1  # a one-text-file source: the token at its cut, once produced
    final: bool = False  # every file is done


def _shard_name(k: int, suffix: str) -> str:
    return f"{k:05d}.{suffix}"


class ShardWriter:
    """Writes the token stream into fixed-size shards, each with its documents and a record.

    `cut`: the byte of a one-text-file source's text where validation starts; the token the piece
    starting there begins with is its `cut_token`.
    """

    def __init__(self, folder: Path, files: Sequence[InputFile], shard_tokens: int, records: list[dict[str, Any]],
                 encoder: Encoder, cut: int | None) -> None:
        self.folder, self.files, self.size, self.encoder, self.cut = folder, files, shard_tokens, encoder, cut
        self.records = records  # the finished shards' records, in order
        start = Progress(**records[-1]["next"]) if records else Progress()
        self.progress = start
        self.produced = start.tokens - start.skip  # global offset of the next token produced
        self.file_docs = {start.file: start.file_documents}
        self.file_tokens = {start.file: start.file_tokens}
        self.done = {int(i): v for r in records for i, v in r["files"].items()}  # finished files' stats
        self.recorded_upto = start.file  # files below this are in earlier records
        self.n_chars = start.n_chars
        self.cut_token = start.cut_token
        self._open_shard()

    # -- the current shard, held until it is full

    def _open_shard(self) -> None:
        self.path = self.folder / _shard_name(self.progress.shard, "bin")
        self.dtype = np.dtype(np.uint16)
        self.parts: list[np.ndarray] = []
        self.count = 0
        self.doc_ends: list[np.ndarray] = []
        self.doc_keys: list[np.ndarray] = []

    def _write(self, ids: np.ndarray) -> None:
        if self.dtype == np.uint16 and len(ids) and int(ids.max()) > _UINT16_MAX:
            self.dtype = np.dtype(np.uint32)  # an id above 65535: the whole shard is uint32
            self.parts = [part.astype(self.dtype) for part in self.parts]
        self.parts.append(ids.astype(self.dtype))
        self.count += len(ids)

    # -- consuming batches

    def consume(self, batch: Batch, ids: np.ndarray, lengths: np.ndarray, new_at: np.ndarray | None) -> None:
        """Write one encoded batch: its tokens, documents, finished files, and any shard it fills."""
        files = np.asarray(batch.files, dtype=np.int64)
        ends_mask = np.asarray(batch.ends, dtype=bool)
        item_ends = self.produced + np.cumsum(lengths)
        self._tally(files, ends_mask, lengths)
        self._find_cut(batch, item_ends, lengths)
        self.done.update(batch.done)
        doc_ends = item_ends[ends_mask]
        keys = self._keys(files[ends_mask], np.asarray(batch.rows, dtype=np.int64)[ends_mask])
        pos = max(0, self.progress.tokens + self.count - self.produced)  # skip what finished shards hold
        while pos < len(ids):
            take = min(self.size - self.count, len(ids) - pos)
            self._write(ids[pos:pos + take])
            pos += take
            shard_end = self.produced + pos
            in_shard = (doc_ends > shard_end - self.count) & (doc_ends <= shard_end)
            self.doc_ends.append(doc_ends[in_shard])
            self.doc_keys.append(keys[in_shard])
            if self.count == self.size:
                j = int(np.searchsorted(item_ends, shard_end, side="left"))
                self._close(self._resume_at(batch, j, item_ends, lengths, files, ends_mask, new_at, shard_end))
        self.produced = int(item_ends[-1]) if len(item_ends) else self.produced
        self.n_chars = len(self.encoder.chars) if isinstance(self.encoder, CharEncoder) else 0

    def _find_cut(self, batch: Batch, item_ends: np.ndarray, lengths: np.ndarray) -> None:
        """The token the piece starting at the cut begins with (the source's only file is file 0)."""
        if self.cut is None or self.cut_token >= 0:
            return
        for j, (fi, position) in enumerate(zip(batch.files, batch.positions, strict=True)):
            if fi == 0 and position == self.cut:
                self.cut_token = int(item_ends[j] - lengths[j])
                return

    def _tally(self, files: np.ndarray, ends_mask: np.ndarray, lengths: np.ndarray) -> None:
        for fi in np.unique(files).tolist():
            mine = files == fi
            self.file_docs[fi] = self.file_docs.get(fi, 0) + int(ends_mask[mine].sum())
            self.file_tokens[fi] = self.file_tokens.get(fi, 0) + int(lengths[mine].sum())

    def _keys(self, files: np.ndarray, rows: np.ndarray) -> np.ndarray:
        keys = np.empty(len(files), dtype=np.uint32)
        for fi in np.unique(files).tolist():
            mine = files == fi
            keys[mine] = doc_keys(self.files[fi].name, rows[mine])
        return keys

    def _resume_at(self, batch: Batch, j: int, item_ends: np.ndarray, lengths: np.ndarray, files: np.ndarray,
                   ends_mask: np.ndarray, new_at: np.ndarray | None, shard_end: int) -> Progress:
        """Where the next shard starts: item j (which holds the shard's last token)."""
        fi = int(files[j])
        later = files[j:] == fi  # item j and the items after it in its file: not counted yet
        start = int(item_ends[j] - lengths[j])
        n_chars = self.n_chars
        if new_at is not None:
            n_chars += int(np.searchsorted(new_at, start - self.produced, side="left"))
        return Progress(
            shard=self.progress.shard + 1, tokens=shard_end,
            documents=self.progress.documents + sum(len(d) for d in self.doc_ends),
            file=fi, position=batch.positions[j], row=batch.rows[j], skip=shard_end - start,
            file_documents=self.file_docs[fi] - int(ends_mask[j:][later].sum()),
            file_tokens=self.file_tokens[fi] - int(lengths[j:][later].sum()), n_chars=n_chars,
            cut_token=self.cut_token if 0 <= self.cut_token < shard_end else -1)

    def _close(self, nxt: Progress) -> None:
        """Finish the shard: write it, then its documents, then its record."""
        hasher = hashlib.sha256()
        for part in self.parts:
            hasher.update(part)
        _write(self.path, self.parts)
        ends = np.concatenate(self.doc_ends).astype(np.uint64) if self.doc_ends else np.empty(0, np.uint64)
        keys = np.concatenate(self.doc_keys).astype(np.uint32) if self.doc_keys else np.empty(0, np.uint32)
        docs = ends.tobytes() + keys.tobytes()
        docs_path = self.folder / _shard_name(self.progress.shard, "docs")
        _write_bytes(docs_path, docs)
        record = {
            "shard": {"file": self.path.name, "dtype": self.dtype.name, "tokens": self.count,
                      "sha256": hasher.hexdigest(), "documents": len(ends),
                      "docs_sha256": hashlib.sha256(docs).hexdigest()},
            "next": asdict(nxt),
            "files": {str(i): self._file_done(i) for i in range(self.recorded_upto, nxt.file)},
        }
        if isinstance(self.encoder, CharEncoder):
            record["chars"] = self.encoder.chars[: nxt.n_chars]
        record_path = self.folder / _shard_name(self.progress.shard, "json")
        _write_bytes(record_path, json_bytes(record))
        self.records.append(record)
        self.recorded_upto = nxt.file
        self.progress = nxt
        self._open_shard()

    def _file_done(self, i: int) -> dict[str, Any]:
        """A finished file's record: name, size, mtime, sha256, and its document and token counts."""
        if "tokens" not in self.done[i]:
            self.done[i] = {**self.done[i], "documents": self.file_docs.get(i, 0), "tokens": self.file_tokens.get(i, 0)}
        return self.done[i]

    def finish(self, n_files: int) -> None:
        """After the last batch: close the last shard (if it holds anything) as the final one."""
        last = Progress(shard=self.progress.shard + 1, tokens=self.progress.tokens + self.count,
                        documents=self.progress.documents + sum(len(d) for d in self.doc_ends), file=n_files,
                        n_chars=self.n_chars, cut_token=self.cut_token, final=True)
        if self.count:
            self._close(last)
        for i in range(n_files):
            self._file_done(i)


# ---------------------------------------------------------------------------------------------
# The pass


def _stat(f: InputFile) -> dict[str, int]:
    st = os.stat(f.path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


class _Meter:
    """A sha256 that also moves the progress bar by the bytes it sees."""

    def __init__(self, bar: tqdm) -> None:
        self.sha, self.bar = hashlib.sha256(), bar

    def update(self, data: bytes) -> None:
        self.sha.update(data)
        self.bar.update(len(data))


def _run(files: Sequence[InputFile], stats: Sequence[dict[str, int]], text_field: str, encoder: Encoder,
         writer: ShardWriter, start: Progress, bar: tqdm, workers: int, chunk_size: int) -> None:
    pending: deque[tuple[Future, Batch]] = deque()

    def drain(limit: int) -> None:
        while len(pending) > limit:
            future, done = pending.popleft()
            tokens, lengths = future.result()
            ids, new_at = encoder.finish(tokens)
            writer.consume(done, ids, lengths, new_at)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        batch = Batch()
        for fi in range(start.file, len(files)):
            f = files[fi]
            if _stat(f) != stats[fi]:
                raise _changed(f)
            meter = _Meter(bar)
            first = fi == start.file
            for item in items(f, meter, text_field, start.position if first else 0, start.row if first else 0,
                              chunk_size, writer.cut):
                batch.add(fi, item)
                if batch.n_chars >= chunk_size:
                    pending.append((pool.submit(encoder.encode, batch), batch))
                    batch = Batch()
                    drain(workers)
            if _stat(f) != stats[fi]:
                raise _changed(f)
            batch.done[fi] = {"name": f.name, **stats[fi], "sha256": meter.sha.hexdigest()}
        pending.append((pool.submit(encoder.encode, batch), batch))
        drain(0)


def _changed(f: InputFile) -> MyPTError:
    return MyPTError(f"input file {f.label} changed while it was being prepared; wait until whatever writes it "
                     "has finished, then run the command again")


# ---------------------------------------------------------------------------------------------
# Resuming and finishing


def _plan(files: Sequence[InputFile], stats: Sequence[dict[str, int]], text_field: str, key: str,
          shard_tokens: int, cut: int | None) -> dict[str, Any]:
    return {"format": FORMAT, "tokenizer": key, "text_field": text_field, "shard_tokens": shard_tokens, "cut": cut,
            "files": [{"path": str(f.path), "name": f.name, **st} for f, st in zip(files, stats, strict=True)]}


def _verified(folder: Path, k: int) -> dict[str, Any] | None:
    """Record k if its shard and documents are whole and match their sha256, else None."""
    try:
        record = read_json(folder / _shard_name(k, "json"))
        shard = record["shard"]
        path = folder / shard["file"]
        if path.stat().st_size != shard["tokens"] * np.dtype(shard["dtype"]).itemsize:
            return None
        docs = folder / _shard_name(k, "docs")
        if sha256_file(path) != shard["sha256"] or sha256_file(docs) != shard["docs_sha256"]:
            return None
        Progress(**record["next"])
        return record
    except (MyPTError, OSError, KeyError, TypeError, ValueError):
        return None


def _resume(folder: Path, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The verified records of an earlier, interrupted prepare of the same plan (else none, and a
    clean folder); anything after the last good record is removed."""
    try:
        old = read_json(folder / "prepare.json") if (folder / "prepare.json").exists() else None
    except MyPTError:
        old = None
    records: list[dict[str, Any]] = []
    if old is not None and {**old, "shard_tokens": 0} == {**plan, "shard_tokens": 0}:
        plan["shard_tokens"] = old["shard_tokens"]
        while (record := _verified(folder, len(records))) is not None:
            records.append(record)
            if record["next"]["final"]:
                break
    keep = {"prepare.json", "lock"} | {_shard_name(k, s) for k in range(len(records)) for s in ("bin", "docs", "json")}
    for path in folder.iterdir():
        if path.name not in keep or is_temp_name(path.name):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if not records:
        _write_bytes(folder / "prepare.json", json_bytes(plan))
    return records


def _manifest(files: Sequence[InputFile], writer: ShardWriter, encoder: Encoder, text_field: str,
              shard_tokens: int, content_sha256: str, val_split: float) -> dict[str, Any]:
    records, done = writer.records, writer.done
    cut = None
    if writer.cut is not None:
        assert writer.cut_token >= 0, "the piece at the cut was produced"
        cut = {"val_split": val_split, "byte": writer.cut, "token": writer.cut_token}
    return {
        "format": FORMAT,
        "files": [{"path": str(f.path), "kind": f.kind, "compression": f.compression, **done[i]}
                  for i, f in enumerate(files)],
        "text_field": text_field,
        "content_sha256": content_sha256,
        "tokenizer": encoder.describe(),
        "n_tokens": sum(r["shard"]["tokens"] for r in records),
        "n_documents": sum(r["shard"]["documents"] for r in records),
        "shard_tokens": shard_tokens,
        "shards": [{**r["shard"], "docs": _shard_name(k, "docs")} for k, r in enumerate(records)],
        "cut": cut,
    }


def content_sha256(files: Sequence[InputFile], shas: Sequence[str], text_field: str) -> str:
    """A source's content hash. One text file: its own sha256 (as older MyPT recorded it)."""
    if len(files) == 1 and files[0].kind == "text" and files[0].compression is None:
        return shas[0]
    structured = any(f.kind != "text" for f in files)
    listing = {"files": [[f.name, s] for f, s in zip(files, shas, strict=True)],
               "text_field": text_field if structured else None}
    return hashlib.sha256(json_bytes(listing)).hexdigest()


def _encoder(tokenizer: Tokenizer | None, files: Sequence[InputFile], chars: Sequence[str] = ()) -> Encoder:
    if tokenizer is None or tokenizer.kind == "char":
        return CharEncoder(files, chars)
    return TokenizerEncoder(tokenizer, files)


def encoder_key(tokenizer: Tokenizer | None) -> str:
    """The tokenizer part of a dataset's folder name: 'chars' for char models, else its id_string."""
    return CharEncoder.key if tokenizer is None or tokenizer.kind == "char" else tokenizer.id_string()


def wait_for_lock(folder: Path, what: str, quiet: bool) -> FileLock:
    """Hold the folder's lock, waiting while another process prepares the same data."""
    lock = FileLock(folder / "lock", what)
    said = False
    while True:
        try:
            lock.acquire()
            return lock
        except LockHeld as e:
            if not said and not quiet:
                print(f"waiting: {e}", file=sys.stderr, flush=True)
                said = True
            time.sleep(0.5)


def prepare(files: Sequence[InputFile], text_field: str, tokenizer: Tokenizer | None, folder: Path, *,
            val_split: float, shard_tokens: int = SHARD_TOKENS, progress: bool = True, chunk_size: int = CHUNK_SIZE,
            threads: int | None = None, label: str = "") -> dict[str, Any]:
    """Prepare `files` into `folder` (resuming an interrupted prepare there) and return the
    manifest. tokenizer None (or a char tokenizer): a char dataset, characters by first appearance.
    val_split: where a source of one text file is cut (split.cut_of); threads: all cores if None.

    The caller holds the folder's lock. A bad input raises MyPTError; the caller removes the folder.
    """
    check_readable(files, text_field)
    stats = [_stat(f) for f in files]
    cut = cut_of(files, val_split)
    plan = _plan(files, stats, text_field, encoder_key(tokenizer), shard_tokens, cut)
    records = _resume(folder, plan)
    encoder = _encoder(tokenizer, files, records[-1].get("chars", []) if records else [])
    writer = ShardWriter(folder, files, plan["shard_tokens"], records, encoder, cut)
    if not writer.progress.final:
        start = writer.progress
        with tqdm(total=sum(st["size"] for st in stats), unit="B", unit_scale=True, unit_divisor=1024,
                  file=sys.stderr, disable=not progress, desc=f"preparing {label or files[0].name}") as bar:
            bar.update(sum(st["size"] for st in stats[: start.file]))
            _run(files, stats, text_field, encoder, writer, start, bar, threads or tokenize_threads(), chunk_size)
            writer.finish(len(files))
    records = writer.records
    if not sum(r["shard"]["documents"] for r in records):
        kinds = {f.kind for f in files}
        what = "every file is empty" if kinds == {"text"} else \
            f"every JSON line or Parquet row has an empty or null '{text_field}'"
        raise MyPTError(f"{label or files[0].label} has no documents ({what}); pass some text (or another "
                        "--text_field)")
    shas = [writer.done[i]["sha256"] for i in range(len(files))]
    manifest = _manifest(files, writer, encoder, text_field, plan["shard_tokens"],
                         content_sha256(files, shas, text_field), val_split)
    _write_bytes(folder / "manifest.json", json_bytes(manifest))
    for k in range(len(records)):
        (folder / _shard_name(k, "json")).unlink(missing_ok=True)
    (folder / "prepare.json").unlink(missing_ok=True)
    return manifest
