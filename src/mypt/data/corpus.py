"""A run's training data: named sources with weights, each a prepared dataset in the cache.

Without a mixture there is one source, "input", made of every --input_file value. A mixture
file (`--data mix.json`) names several:

    {"sources": [
        {"name": "prose", "input_file": ["books/", "essays.jsonl"], "weight": 0.7},
        {"name": "code", "input_file": "code/**/*.py", "weight": 0.3, "text_field": "content"}
    ]}

Weights are relative (they need not sum to 1); relative paths are taken from the mixture
file's folder. Paths are stored absolute, so a run resumes from any working directory.

Each source is prepared into `cache/<tokenizer>-<key>/`, the key a hash of its inputs (as
given), its text field, the tokenizer and, for a source of one text file, the val_split it is
cut at (split.py); the manifest inside holds the content hash. The corpus' content hash is
the one recorded in training_state.json and compared on resume and across machines: a single
source's own hash (a single text file: the file's sha256, as older MyPT recorded it), or a
hash of the sources' names, weights and hashes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mypt.data import builtin, dataset
from mypt.data import split as splits
from mypt.data.prepare import (
    CHAR_EOT,
    FORMAT,
    SHARD_TOKENS,
    WriteFailed,
    content_sha256,
    encoder_key,
    prepare,
    wait_for_lock,
)
from mypt.data.sampler import Mixture
from mypt.data.sources import CHUNK_SIZE, InputFile, hash_file, list_files, shown
from mypt.errors import MyPTError
from mypt.fsutil import json_bytes, read_json, write_error
from mypt.tokenizers import Tokenizer

CACHE_DIR = ".cache"  # the token cache, inside the checkpoints folder
DEFAULT_TEXT_FIELD = "text"
SOURCE_KEYS = {"name", "input_file", "weight", "text_field"}
MAX_WEIGHT = 1e6  # weights are relative; below this any number of them sums to a finite total


@dataclass(frozen=True)
class Source:
    """One named source: what it reads (absolute paths, folders or globs) and its weight."""

    name: str
    inputs: tuple[str, ...]
    text_field: str = DEFAULT_TEXT_FIELD
    weight: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "input_file": list(self.inputs), "text_field": self.text_field,
                "weight": self.weight}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Source:
        return cls(d["name"], tuple(d["input_file"]), d.get("text_field", DEFAULT_TEXT_FIELD), d.get("weight", 1.0))


def _absolute(value: str, base: Path | None = None) -> str:
    if builtin.is_builtin(value):
        return builtin.check_name(value)
    path = Path(os.path.expanduser(value))
    return os.path.abspath(path if base is None or path.is_absolute() else base / path)


def sources_from_flags(input_files: Sequence[str] | None, text_field: str | None,
                       data_file: str | None) -> list[Source] | None:
    """The sources the command line names (None: it names none)."""
    if data_file is not None:
        if input_files:
            raise MyPTError(f"--data {data_file} and --input_file both name the training data; pass one of them "
                            "(list every input in the mixture file)")
        return read_mixture(Path(data_file), text_field)
    if not input_files:
        if text_field is not None:
            raise MyPTError(f"--text_field {text_field}: name the files it applies to with --input_file (on resume "
                            "too: the recorded inputs keep their recorded field)")
        return None
    if any(not v.strip() for v in input_files):  # an unset shell variable: would mean the current folder
        raise MyPTError("--input_file '': an empty path; name a file, folder or glob")
    field_name = text_field or DEFAULT_TEXT_FIELD
    return [Source("input", tuple(_absolute(v) for v in input_files), field_name)]


def _check_source(d: object, where: str) -> None:
    if not isinstance(d, dict):
        raise MyPTError(f"{where} must be an object with name, input_file and weight")
    unknown = sorted(set(d) - SOURCE_KEYS)
    if unknown:
        raise MyPTError(f"{where}: unknown key '{unknown[0]}'; the keys are {', '.join(sorted(SOURCE_KEYS))}")
    if not isinstance(d.get("name"), str) or not d["name"].strip():
        raise MyPTError(f"{where}: 'name' must be a non-empty string")
    inputs = d.get("input_file")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(v, str) and v for v in inputs):
        raise MyPTError(f"{where}: 'input_file' must be a path (file, folder or glob) or a list of them")
    weight = d.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= MAX_WEIGHT:
        raise MyPTError(f"{where}: 'weight' ({str(weight)[:40]}) must be a number above 0 and at most {MAX_WEIGHT:g} "
                        "(weights are relative: 0.7 and 0.3 mix as 7 and 3 do)")
    if not isinstance(d.get("text_field", DEFAULT_TEXT_FIELD), str):
        raise MyPTError(f"{where}: 'text_field' must be a string")


def read_mixture(path: Path, text_field: str | None = None) -> list[Source]:
    """The sources of a mixture file; every problem names the file and the source."""
    doc = read_json(path, "mixture file")
    entries = doc.get("sources") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise MyPTError(f"{path}: expected {{\"sources\": [{{\"name\": ..., \"input_file\": ..., \"weight\": ...}}, "
                        "...]}} with at least one source")
    if isinstance(doc, dict) and set(doc) != {"sources"}:
        raise MyPTError(f"{path}: unknown key '{sorted(set(doc) - {'sources'})[0]}'; the file holds only 'sources'")
    sources, base = [], path.parent
    for i, d in enumerate(entries):
        _check_source(d, f"{path}: source {i + 1}")
        inputs = d["input_file"] if isinstance(d["input_file"], list) else [d["input_file"]]
        field_name = d.get("text_field", text_field or DEFAULT_TEXT_FIELD)
        sources.append(Source(d["name"], tuple(_absolute(v, base) for v in inputs), field_name,
                              float(d.get("weight", 1.0))))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise MyPTError(f"{path}: the source name '{next(n for n in names if names.count(n) > 1)}' is used twice; "
                        "give each source its own name")
    return sources


# ---------------------------------------------------------------------------------------------
# Preparing


@dataclass
class Prepared:
    """A source and its prepared dataset."""

    source: Source
    folder: Path
    manifest: dict[str, Any]

    @property
    def content_sha256(self) -> str:
        return self.manifest["content_sha256"]


@dataclass
class Corpus:
    """Every source of a run, prepared."""

    parts: list[Prepared]
    created: list[tuple[Path, list[Path]]] = field(default_factory=list)  # datasets made now, with new parents

    @property
    def content_sha256(self) -> str:
        return corpus_sha256(self.parts[0].source, [(p.source, p.content_sha256) for p in self.parts])

    def chars(self) -> list[str]:
        """The sorted characters of every source (char datasets)."""
        return sorted({c for p in self.parts for c in p.manifest["tokenizer"]["chars"]})

    def discard_created(self) -> None:
        """Remove the datasets this process prepared (the run stopped on its input: leave nothing)."""
        for folder, made in reversed(self.created):
            _remove(folder, made)


def corpus_sha256(first: Source, hashes: Sequence[tuple[Source, str]]) -> str:
    if len(hashes) == 1 and first.name == "input":
        return hashes[0][1]
    listing = [[s.name, s.weight, h] for s, h in hashes]
    return hashlib.sha256(json_bytes(listing)).hexdigest()


def source_files(source: Source, cache: Path) -> list[InputFile]:
    """The files a source reads (the built-in corpus is written into the cache first)."""
    files = [InputFile(builtin.builtin_path(v, cache), builtin.file_name(v), "text", None)
             for v in dict.fromkeys(source.inputs) if builtin.is_builtin(v)]
    others = [v for v in source.inputs if not builtin.is_builtin(v)]
    return files + list_files(others) if others else files


def dataset_folder(source: Source, files: Sequence[InputFile], tokenizer: Tokenizer | None, cache: Path,
                   val_split: float) -> Path:
    key = encoder_key(tokenizer)
    structured = any(f.kind != "text" for f in files)
    ident = {"format": FORMAT, "inputs": list(source.inputs), "tokenizer": key,
             "text_field": source.text_field if structured else None,
             "val_split": val_split if splits.one_document(files) else None}
    return cache / f"{key}-{hashlib.sha256(json_bytes(ident)).hexdigest()[:16]}"


def _mkdirs(folder: Path) -> list[Path]:
    """Make folder and its missing parents; the ones made, outermost first."""
    made = []
    for p in reversed([folder, *folder.parents]):
        if not p.exists():
            made.append(p)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(f"the token cache folder {folder}", exc) from None
    return made


def _prepare_one(source: Source, files: list[InputFile], tokenizer: Tokenizer | None, folder: Path,
                 corpus: Corpus, val_split: float, progress: bool, shard_tokens: int, chunk_size: int) -> Prepared:
    made = _mkdirs(folder)
    lock = wait_for_lock(folder, f"preparing {folder.name}", quiet=not progress)
    try:
        manifest, _ = dataset.current_manifest(folder, files)  # another process may have just finished it
        if manifest is None:
            manifest = prepare(files, source.text_field, tokenizer, folder, val_split=val_split,
                               shard_tokens=shard_tokens, progress=progress, chunk_size=chunk_size,
                               label=source_label(source, [f.path for f in files]))
            corpus.created.append((folder, made))
    except WriteFailed:
        raise
    except MyPTError:
        _remove(folder, made)  # a bad input: leave nothing behind
        raise
    finally:
        lock.release()
    return Prepared(source, folder, manifest)


def _files_sha256(source: Source, files: Sequence[InputFile]) -> str:
    """The content hash of a source's files as they are now (each file read in full)."""
    return content_sha256(files, [hash_file(f) for f in files], source.text_field)


def source_label(source: Source, paths: Sequence[str | Path]) -> str:
    """A source of these files in messages: its file, its number of files, or its name in a mixture."""
    if len(source.inputs) == 1 and builtin.is_builtin(source.inputs[0]):
        return source.inputs[0]
    if source.name != "input":
        return f"source '{source.name}'"
    return shown(paths[0]) if len(paths) == 1 else f"the {len(paths)} input files"


def _remove(folder: Path, made: Sequence[Path]) -> None:
    """Remove a dataset folder, and the folders made for it if nothing else is in them."""
    shutil.rmtree(folder, ignore_errors=True)
    for p in reversed(made):
        try:
            p.rmdir()
        except OSError:
            pass


def _current(source: Source, files: list[InputFile], folder: Path) -> dict[str, Any] | None:
    manifest, touched = dataset.current_manifest(folder, files)
    if manifest is not None and touched:
        lock = wait_for_lock(folder, f"preparing {folder.name}", quiet=True)
        try:
            dataset.save_manifest(folder, manifest)
        finally:
            lock.release()
    return manifest


def prepare_corpus(sources: Sequence[Source], tokenizer: Tokenizer | None, cache: Path, *, val_split: float,
                   expect_sha256: str | None = None, allow_change: bool = False, progress: bool = True,
                   shard_tokens: int = SHARD_TOKENS, chunk_size: int = CHUNK_SIZE) -> Corpus:
    """Prepare every source that is not prepared yet (tokenizer None: char data), a source of one
    text file cut for val_split (see split.py).

    With expect_sha256 (a resume), content that differs from it stops with a MyPTError before
    anything is written, unless allow_change.
    """
    listed = [(s, source_files(s, cache)) for s in sources]
    found = []
    for s, files in listed:
        folder = dataset_folder(s, files, tokenizer, cache, val_split)
        found.append((s, files, folder, _current(s, files, folder)))
    if expect_sha256 is not None and not allow_change:
        hashes = [(s, m["content_sha256"] if m else _files_sha256(s, files)) for s, files, _, m in found]
        if corpus_sha256(sources[0], hashes) != expect_sha256:
            raise DataChanged()
    corpus = Corpus([])
    for s, files, folder, manifest in found:
        if manifest is not None:
            corpus.parts.append(Prepared(s, folder, manifest))
            continue
        try:
            corpus.parts.append(_prepare_one(s, files, tokenizer, folder, corpus, val_split, progress, shard_tokens,
                                             chunk_size))
        except WriteFailed:
            raise
        except MyPTError:
            corpus.discard_created()  # a bad input in a later source: the earlier ones go too
            raise
    return corpus


class DataChanged(MyPTError):
    """The training data differ from what a run was trained on (the caller words the message)."""


# ---------------------------------------------------------------------------------------------
# Opening for training


def char_table(manifest: dict[str, Any], tokenizer: Tokenizer, name: str) -> np.ndarray:
    """Stored id -> model id for a char dataset (0 is the end-of-text, then chars by first appearance)."""
    chars = manifest["tokenizer"]["chars"]
    known = set(getattr(tokenizer, "chars", ()))
    unknown = sorted(set(chars) - known)
    if unknown:
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        listed = ", ".join(repr(c) for c in unknown[:10]) + more
        raise MyPTError(f"the training data ({name}) contain characters not in this model's vocabulary: {listed} "
                        "(the char tokenizer only knows the characters of its training text)")
    table = np.empty(len(chars) + 1, dtype=np.int64)
    table[CHAR_EOT] = end_of_text(tokenizer)
    if chars:
        table[1:] = tokenizer.encode_array("".join(chars))
    return table


def end_of_text(tokenizer: Tokenizer) -> int:
    """The id that ends each document. A char model saved before end-of-text existed has none:
    its documents end with a newline (or its first character)."""
    eot = getattr(tokenizer, "eot_id", None)
    if eot is not None:
        return int(eot)
    return tokenizer.start_ids()[0]


def open_splits(corpus: Corpus, tokenizer: Tokenizer, val_split: float, block_size: int,
                smaller_block: str = "a smaller block_size") -> tuple[Mixture, Mixture, list[str]]:
    """(train, validation) mixtures and a line per source saying how it was split. `smaller_block`:
    how this run gets a smaller block_size, for the message of a source too short (None: it cannot)."""
    train, val, lines = [], [], []
    for p in corpus.parts:
        char = p.manifest["tokenizer"]["kind"] == "chars"
        table = char_table(p.manifest, tokenizer, _label(p)) if char else None
        t, v, s = dataset.streams(p.folder, p.manifest, val_split, table, tokenizer.n_vocab, p.source.name, _label(p))
        _check_long_enough(p, t, v, s, val_split, block_size, smaller_block)
        train.append(t)
        val.append(v)
        lines.append(describe(p, s, val_split))
    weights = [p.source.weight for p in corpus.parts]
    return Mixture(train, weights), Mixture(val, weights), lines


def _label(p: Prepared) -> str:
    return source_label(p.source, [f["path"] for f in p.manifest["files"]])


def _check_long_enough(p: Prepared, train: Any, val: Any, s: splits.Split, val_split: float,
                       block_size: int, smaller_block: str | None) -> None:
    need = block_size + 1
    n = p.manifest["n_tokens"]
    how = "whole documents" if p.manifest["cut"] is None else "the end of its text"
    for part, stream, other in (("training", train, "smaller"), ("validation", val, "larger")):
        if len(stream) < need:
            fixes = ["a longer input", *([smaller_block] if smaller_block else []), f"a {other} --val_split"]
            raise MyPTError(
                f"{_label(p)} is too short: it has {n} tokens, so the {part} part (--val_split {val_split}, "
                f"{how}) has {len(stream)}, but one block needs block_size + 1 = {need}; use "
                + ", ".join(fixes[:-1]) + f" or {fixes[-1]}")


def describe(p: Prepared, s: splits.Split, val_split: float) -> str:
    m = p.manifest
    head = f"{_label(p)}: {len(m['files'])} file(s), {m['n_documents']:,} document(s), {m['n_tokens']:,} tokens"
    if m["cut"] is not None:
        return (f"{head}; validation: its last {val_split:.0%} of the text, from byte {m['cut']['byte']:,} "
                f"({s.tokens(s.val):,} tokens)")
    share = s.tokens(s.val) / max(1, m["n_tokens"])
    return f"{head}; validation: {s.val_documents:,} whole documents ({share:.1%} of the tokens)"


# ---------------------------------------------------------------------------------------------
# What training_state.json records, and reading it back


def _is_glob(value: str) -> bool:
    return any(c in value for c in "*?[")


def describe_sources(sources: Sequence[Source] | None) -> str:
    """The inputs in a few words: a path, paths, or named sources."""
    if not sources:
        return "nothing recorded"
    if len(sources) == 1 and sources[0].name == "input":
        return ", ".join(sources[0].inputs)
    return "; ".join(f"{s.name} ({', '.join(s.inputs)}) x{s.weight:g}" for s in sources)


def sources_state(corpus: Corpus) -> dict[str, Any]:
    """The training_state.json fields for the data: absolute paths, so resuming works from any
    folder. input_file / input_sha256 keep their meaning for one text file."""
    sources = [p.source for p in corpus.parts]
    return {"input_file": describe_sources(sources), "input_sha256": corpus.content_sha256,
            "data": {"sources": [s.to_json() for s in sources], "content_sha256": corpus.content_sha256}}


def saved_sources(state: dict[str, Any], where: str = "training_state.json") -> tuple[list[Source] | None, str | None]:
    """(sources, content hash) that a checkpoint was trained on; older checkpoints recorded one
    input_file (a path relative to where training ran, or the built-in corpus) and its sha256."""
    saved = state.get("data")
    if saved is not None:
        try:
            return [Source.from_json(d) for d in saved["sources"]], str(saved["content_sha256"])
        except (KeyError, TypeError, AttributeError):
            raise MyPTError(f"{where}: the 'data' field is damaged; pass --input_file (and --allow_data_change) "
                            "to name the training data again") from None
    label = state.get("input_file")
    if not isinstance(label, str):
        return None, None
    return [Source("input", (_absolute(label),))], state.get("input_sha256")


def missing_inputs(sources: Sequence[Source]) -> str | None:
    """The first recorded input path that no longer exists (globs are not checked here)."""
    for s in sources:
        for value in s.inputs:
            if not builtin.is_builtin(value) and not _is_glob(value) and not os.path.lexists(value):
                return value
    return None


def input_status(state: dict[str, Any], verify: bool = False) -> str:
    """For `mypt inspect`: the recorded inputs and whether they are still here; with verify,
    whether their content is unchanged (each file is read and hashed)."""
    sources, sha = saved_sources(state)
    if sources is None:
        return "none recorded (pass --input_file to train it)"
    label = describe_sources(sources)
    if all(builtin.is_builtin(v) for s in sources for v in s.inputs):
        return f"{label} (built in)"
    if missing_inputs(sources):
        return f"{label} (MISSING here: resuming needs --input_file)"
    if not sha:
        return f"{label} (no sha256 recorded to compare with)"
    if not verify:
        return f"{label} (present; --verify compares its content with the sha256 recorded at training)"
    try:
        hashes = [(s, _files_sha256(s, list_files(s.inputs))) for s in sources]
    except MyPTError:
        return f"{label} (MISSING here: resuming needs --input_file)"
    if corpus_sha256(sources[0], hashes) == sha:
        return f"{label} (unchanged: matches the sha256 recorded at training)"
    return f"{label} (CHANGED since training: resuming needs --allow_data_change)"


def training_data(inputs: Sequence[str], tokenizer: Tokenizer | None, cache: Path, val_split: float,
                  block_size: int) -> tuple[Tokenizer, Mixture, Mixture]:
    """(tokenizer, train, val) for some inputs in one call (tokenizer None: a new char one), as
    train.py would prepare them; for benchmarks and scripts."""
    from mypt.tokenizers import CharTokenizer

    corpus = prepare_corpus([Source("input", tuple(_absolute(str(v)) for v in inputs))], tokenizer, cache,
                            val_split=val_split, progress=False)
    tok = tokenizer if tokenizer is not None else CharTokenizer(corpus.chars())
    train, val, _ = open_splits(corpus, tok, val_split, block_size)
    return tok, train, val
