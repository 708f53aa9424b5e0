"""What the user points at, turned into files and then documents.

An `--input_file` value is a file, a folder (searched recursively for the extensions in
FOLDER_SUFFIXES, hidden names skipped) or a glob (`**` allowed). Each file is read as one of
three kinds, chosen by its name once a `.gz` or `.zst` ending is set aside:

- text (any other name): the whole file is one document, cut into pieces at safe points
  (places where every tokenizer's split pattern splits anyway, see split_safely);
- JSON lines (`.jsonl`, `.json`): each non-blank line is a JSON object and its `text_field` is a
  document (a null or empty value is skipped);
- Parquet (`.parquet`): each row's `text_field` column is a document (null or empty skipped).

Readers stream: they yield `Item`s (a document, or a piece of a long text document) with the
place they start at, so a prepare that was killed can start again from that place. Every check
of the input happens here, as the bytes go by (UTF-8, NUL bytes, JSON, the field, truncated
compression), and each problem is one MyPTError naming the file, the line where there is one,
and what to do. The raw bytes of every file go through a hasher on their way in.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import importlib
import json
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from mypt.errors import MyPTError
from mypt.fsutil import check_regular_file, is_empty, parse_json, sha256_file
from mypt.tokenizers.base import NEWLINE_CUT, WHITESPACE_CUT

try:  # twice as fast as json on JSON lines; part of the "data" extra, and json does the same job without it
    from orjson import loads as _loads
except ImportError:
    _loads = json.loads

CHUNK_SIZE = 4 << 20  # bytes read (and roughly characters tokenized) per piece
MAX_CARRY_CHUNKS = 4  # how far a piece may grow while looking for a safe cut
TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
FOLDER_SUFFIXES = tuple(s + c for s in TEXT_SUFFIXES + JSONL_SUFFIXES for c in ("", *COMPRESSIONS)) + PARQUET_SUFFIXES
DATA_EXTRA = 'pip install "mypt[data]"'

_GLOB_MAGIC = re.compile(r"[*?[]")


@dataclass(frozen=True)
class InputFile:
    """One file of a source. `name` is its identity: the path below the folder or glob it was
    found by (a file given by itself: its name), so moving the data keeps its identity."""

    path: Path
    name: str
    kind: str  # "text", "jsonl" or "parquet"
    compression: str | None  # None, "gzip" or "zstd"

    @property
    def label(self) -> str:
        return shown(self.path)


def shown(path: str | Path) -> str:
    """A path for messages: relative to the working folder when inside it, else absolute."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


@dataclass(frozen=True)
class Item:
    """A document, or one piece of a long text document, and where in its file it starts.

    position: the byte offset of its text in the (decompressed) file, or its Parquet row;
    row: the document's number in the file (text: 0, JSON lines: the line index, Parquet: the
    row), which with the file's name identifies the document; doc_end: an end-of-text follows.
    """

    text: str
    doc_end: bool
    position: int
    row: int


# ---------------------------------------------------------------------------------------------
# Finding the files


def _kind_of(path: Path) -> tuple[str, str | None]:
    name = path.name.lower()
    compression = None
    for suffix, method in COMPRESSIONS.items():
        if name.endswith(suffix):
            name, compression = name[: -len(suffix)], method
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl", compression
    if name.endswith(PARQUET_SUFFIXES):
        if compression:
            raise MyPTError(f"input file {path}: Parquet files carry their own compression; decompress it "
                            f"(it ends in {path.suffix}) and pass the .parquet file")
        return "parquet", None
    return "text", compression


def _input_file(path: Path, name: str) -> InputFile:
    kind, compression = _kind_of(path)
    return InputFile(path.absolute(), name, kind, compression)


def _walk(folder: Path) -> list[Path]:
    """The files below folder with a known extension, sorted; linked folders are followed once."""
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files)
                  if not f.startswith(".") and f.lower().endswith(FOLDER_SUFFIXES)]
    return found


def _glob_root(pattern: str) -> Path:
    """The folder a glob pattern starts from: its parts before the first wildcard."""
    parts = Path(pattern).parts
    fixed = [p for p in parts[: next(i for i, p in enumerate(parts) if _GLOB_MAGIC.search(p))]]
    return Path(*fixed) if fixed else Path(".")


def _expand(value: str) -> list[InputFile]:
    path, value = Path(value), shown(value)
    if _GLOB_MAGIC.search(value) and not path.exists():
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        files = [p for p in matches if p.is_file()]
        if not files:
            raise MyPTError(f"--input_file {value}: the pattern matches no files; check it (and quote it, so "
                            "that the shell does not expand it first)")
        root = _glob_root(str(path))
        return [_input_file(p, p.relative_to(root).as_posix()) for p in files]
    if path.is_dir():
        files = _walk(path)
        if not files:
            raise MyPTError(f"input folder {value} has no files ending in {', '.join(FOLDER_SUFFIXES[:5])} "
                            f"(or .jsonl, .json, .parquet, and .gz or .zst of the text kinds); add some, or "
                            f"pass a glob such as '{Path(value) / '**' / '*.py'}' for other files")
        for p in files:  # a FIFO would hang the read, a broken link fail it: refused up front
            check_regular_file(p, f"input file {shown(str(p))} (in folder {value})")
        return [_input_file(p, (Path(path.absolute().name) / p.relative_to(path)).as_posix()) for p in files]
    if not os.path.lexists(path):
        raise MyPTError(f"input file {value} does not exist; check the path")
    check_regular_file(path, f"input file {value}")
    if is_empty(path, f"input file {value}"):
        raise MyPTError(f"input file {value} is empty; pass a file with some text in it")
    return [_input_file(path, path.name)]


def list_files(inputs: Sequence[str]) -> list[InputFile]:
    """The files the --input_file values name, in a stable order, each once."""
    seen: set[Path] = set()
    files = []
    for value in inputs:
        for f in _expand(value):
            if f.path not in seen:
                seen.add(f.path)
                files.append(f)
    return files


def require_extra(module: str, what: str) -> Any:
    """Import an optional dependency; a clear MyPTError naming the extra if it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MyPTError(f"{what} needs the '{module}' package, an optional extra: {DATA_EXTRA}") from None


def check_readable(files: Sequence[InputFile], text_field: str) -> None:
    """The checks that need no full read: extras installed, Parquet columns present."""
    for f in files:
        if f.compression == "zstd":
            _zstd_module(f)
        if f.kind == "parquet":
            _parquet_file(f, text_field)


# ---------------------------------------------------------------------------------------------
# Bytes: raw (hashed) and decompressed


class NoHash:
    """A hasher for reads whose bytes need no hash."""

    def update(self, data: bytes) -> None:
        pass


class _HashingReader:
    """A binary file whose bytes feed a hasher as they are read."""

    def __init__(self, raw: BinaryIO, hasher: Any) -> None:
        self.raw, self.hasher = raw, hasher

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.hasher.update(data)
        return data

    def readable(self) -> bool:
        return True


def _truncated(f: InputFile, exc: Exception) -> MyPTError:
    return MyPTError(f"input file {f.label} is truncated or is not valid {f.compression} data ({exc}); "
                     "download or compress it again, or remove it from the input")


def _zstd_module(f: InputFile) -> Any:
    """Python's own zstd (3.14 on), else its backport: reads stay bounded and a cut file raises."""
    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        zstd = require_extra("backports.zstd", f"reading {f.label}")
    return zstd


def _decompressed(f: InputFile, stream: Any, chunk_size: int, errors: tuple[type[Exception], ...]) -> Iterator[bytes]:
    try:
        while out := stream.read(chunk_size):
            yield out
    except (EOFError, *errors) as e:
        raise _truncated(f, e) from None


def byte_chunks(f: InputFile, hasher: Any, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The file's (decompressed) bytes in chunks; every raw byte read goes to hasher."""
    try:
        with open(f.path, "rb") as raw:
            reader = _HashingReader(raw, hasher)
            if f.compression == "zstd":
                zstd = _zstd_module(f)
                yield from _decompressed(f, zstd.ZstdFile(reader), chunk_size, (zstd.ZstdError,))
            elif f.compression == "gzip":
                yield from _decompressed(f, gzip.GzipFile(fileobj=reader, mode="rb"), chunk_size,
                                         (gzip.BadGzipFile, zlib.error))
            else:
                while chunk := reader.read(chunk_size):
                    yield chunk
    except OSError as e:
        raise MyPTError(f"cannot read input file {f.label} ({e.strerror or e}); check its permissions") from None


def _skip(chunks: Iterator[bytes], start: int) -> Iterator[bytes]:
    """The chunks from byte `start` on: to resume inside a file."""
    done = 0
    for chunk in chunks:
        if done + len(chunk) > start:
            yield chunk[start - done:]
            yield from chunks
            return
        done += len(chunk)


def _break_at(chunks: Iterator[bytes], start: int, at: int) -> Iterator[bytes]:
    """The chunks (which begin at byte `start`), one of them split so that a chunk ends at byte `at`."""
    done = start
    for chunk in chunks:
        if done < at < done + len(chunk):
            yield chunk[:at - done]
            chunk = chunk[at - done:]
        done += len(chunk)
        yield chunk


def text_size(f: InputFile) -> int:
    """The bytes of a text file's text: its size, or for a compressed file the bytes it decompresses to
    (read through once to count them)."""
    if f.compression is None:
        return f.path.stat().st_size
    return sum(len(chunk) for chunk in byte_chunks(f, NoHash()))


def text_bytes(f: InputFile, start: int, end: int) -> bytes:
    """Bytes [start, end) of a text file's text (a compressed file is decompressed up to `end`)."""
    if f.compression is None:
        try:
            with open(f.path, "rb") as raw:
                raw.seek(start)
                return raw.read(end - start)
        except OSError as e:
            raise MyPTError(f"cannot read input file {f.label} ({e.strerror or e}); check its permissions") from None
    out, done = [], 0
    for chunk in byte_chunks(f, NoHash()):
        out.append(chunk[max(0, start - done): end - done])
        done += len(chunk)
        if done >= end:
            break
    return b"".join(out)


def hash_file(f: InputFile) -> str:
    """sha256 of a file's raw bytes (what a prepared dataset records for it)."""
    try:
        return sha256_file(f.path)
    except OSError as e:
        raise MyPTError(f"cannot read input file {f.label} ({e.strerror or e}); check its permissions") from None


# ---------------------------------------------------------------------------------------------
# Text files


def _binary(f: InputFile, offset: int) -> MyPTError:
    return MyPTError(f"input file {f.label} looks binary (it contains NUL bytes, the first at byte offset {offset}); "
                     "pass UTF-8 text files only (remove it from the folder, or narrow the input with a glob)")


def _bad_utf8(f: InputFile, offset: int, line: int) -> MyPTError:
    return MyPTError(f"input file {f.label} is not valid UTF-8 (first bad byte at byte offset {offset}, line {line}); "
                     "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) and try again")


def _line_of(f: InputFile, offset: int) -> int:
    """The line number of a byte offset (for an error message: the file is read again up to it)."""
    newlines, done = 0, 0
    for chunk in byte_chunks(f, hashlib.sha256()):
        if done + len(chunk) >= offset:
            return newlines + chunk.count(b"\n", 0, offset - done) + 1
        newlines += chunk.count(b"\n")
        done += len(chunk)
    return newlines + 1


def _decoded(f: InputFile, chunks: Iterator[bytes], offset: int) -> Iterator[tuple[str, int]]:
    """(text, the byte offset it ends at) of the chunks, which start at byte `offset`; MyPTError
    on NUL bytes or bad UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    for chunk in chunks:
        nul = chunk.find(b"\0")
        if nul >= 0:
            raise _binary(f, offset + nul)
        pending = len(decoder.getstate()[0])
        try:
            text = decoder.decode(chunk)
        except UnicodeDecodeError as e:
            bad = offset - pending + e.start
            raise _bad_utf8(f, bad, _line_of(f, bad)) from None
        offset += len(chunk)
        yield text, offset - len(decoder.getstate()[0])
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        bad = offset - len(decoder.getstate()[0]) + e.start
        raise _bad_utf8(f, bad, _line_of(f, bad)) from None


def _last_newline_cut(text: str) -> int | None:
    """Index of the newline in the last match of NEWLINE_CUT (a safe cut for every tokenizer)."""
    i = text.rfind("\n")
    while i > 0:
        if NEWLINE_CUT.match(text, i - 1):
            return i
        i = text.rfind("\n", 0, i)
    return None


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


def split_safely(text: str, force: bool) -> tuple[str, str]:
    """(head, rest): head tokenizes exactly as it would inside the whole text, with any tokenizer
    (the cut rules are tokenizers.base.NEWLINE_CUT, then WHITESPACE_CUT)."""
    cut = _last_newline_cut(text)
    if cut is None:
        cut = _last_cut(text, WHITESPACE_CUT)
    if cut is None:
        return (text, "") if force else ("", text)
    return text[:cut], text[cut:]


def text_items(f: InputFile, hasher: Any, start: int = 0, chunk_size: int = CHUNK_SIZE,
               cut: int | None = None) -> Iterator[Item]:
    """The file as one document, in pieces cut at safe points; from byte `start` on when resuming.

    `cut` (a character boundary): a piece also ends there, wherever it is, so the text before
    it is tokenized apart from the text after it (where a single file's validation starts).
    """
    chunks = byte_chunks(f, hasher, chunk_size)
    if start:
        chunks = _skip(chunks, start)
    if cut is not None and cut > start:
        chunks = _break_at(chunks, start, cut)
    position, carry, seen = start, "", start > 0
    for text, end in _decoded(f, chunks, start):
        if end == cut:
            head, carry = carry + text, ""
        else:
            head, carry = split_safely(carry + text, force=len(carry) >= MAX_CARRY_CHUNKS * chunk_size)
        if head:
            yield Item(head, False, position, 0)
            position = end - len(carry.encode("utf-8"))
            seen = True
    if carry or seen:
        yield Item(carry, True, position, 0)


# ---------------------------------------------------------------------------------------------
# JSON lines


def _json_type(value: object) -> str:
    names = {bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


_BLANK = object()  # a blank line's record


def _parsed(f: InputFile, line: bytes, number: int) -> Any:
    """The JSON value of one line, read by the one JSON reader (_BLANK: the line is blank)."""
    if not line.strip():
        return _BLANK
    return _strict(f, line, number)


def _document(f: InputFile, line: bytes, number: int, field: str) -> str | None:
    """The text of one JSON line (None: blank, or the field is null or empty)."""
    try:
        record = _loads(line)
    except (ValueError, RecursionError):  # invalid or too deep; or what only json accepts (a BOM, NaN)
        if not line.strip():
            return None
        record = _strict(f, line, number)
    else:
        if line.count(b'"%s"' % field.encode()) > 1:  # maybe a repeated key, which orjson lets pass
            record = _strict(f, line, number)
    value = record.get(field) if isinstance(record, dict) else None
    if type(value) is not str:  # noqa: E721 (the common case first, fast)
        if value is None and isinstance(record, dict) and field in record:
            return None
        _bad_record(f, record, number, field)
    if not value:
        return None
    if "\0" in value:
        raise MyPTError(f"input file {f.label} line {number}: the text contains NUL characters, so it looks binary; "
                        "pass text only")
    return value


def _strict(f: InputFile, line: bytes, number: int) -> Any:
    """The line parsed by the one JSON reader (fsutil.parse_json), or one MyPTError naming the
    line and what is wrong."""
    try:
        text = line.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MyPTError(f"input file {f.label} line {number} is not valid UTF-8 ({e.reason} at byte {e.start} of "
                        "the line); convert the file to UTF-8") from None
    return parse_json(text, f"input file {f.label}", line=number)


def _bad_record(f: InputFile, record: object, number: int, field: str) -> None:
    where = f"input file {f.label} line {number}"
    if not isinstance(record, dict):
        raise MyPTError(f"{where} is {_json_type(record)}, not a JSON object with a '{field}' field; each "
                        "line must be one object")
    if field not in record:
        fields = ", ".join(repr(k) for k in list(record)[:8]) or "none"
        raise MyPTError(f"{where} has no field '{field}' (its fields: {fields}); pass --text_field NAME "
                        "to read another field")
    raise MyPTError(f"{where}: the field '{field}' is {_json_type(record[field])}, not text; pass --text_field "
                    "with a field that holds text")


def _json_lines(f: InputFile, hasher: Any, start: int = 0, start_row: int = 0,
                chunk_size: int = CHUNK_SIZE) -> Iterator[tuple[int, int, bytes]]:
    """(byte position, line index, bytes) of every line from byte `start` (line `start_row`) on;
    a NUL byte is refused."""
    chunks = byte_chunks(f, hasher, chunk_size)
    if start:
        chunks = _skip(chunks, start)
    position, row, carry = start, start_row, b""
    for chunk in chunks:
        nul = chunk.find(b"\0")
        if nul >= 0:
            raise _binary(f, position + len(carry) + nul)
        lines = (carry + chunk).split(b"\n")
        carry = lines.pop()
        for line in lines:
            yield position, row, line
            position += len(line) + 1
            row += 1
    yield position, row, carry


def jsonl_items(f: InputFile, hasher: Any, field: str, start: int = 0, start_row: int = 0,
                chunk_size: int = CHUNK_SIZE) -> Iterator[Item]:
    """One Item per non-blank line; resumes at byte `start`, which is line index `start_row`."""
    for position, row, line in _json_lines(f, hasher, start, start_row, chunk_size):
        text = _document(f, line, row + 1, field)
        if text is not None:
            yield Item(text, True, position, row)


def json_records(f: InputFile, hasher: Any) -> Iterator[tuple[int, Any]]:
    """(line index, JSON value) of every non-blank line, checked as jsonl_items checks them: for
    readers of whole records (mypt.finetune's conversations)."""
    for _, row, line in _json_lines(f, hasher):
        record = _parsed(f, line, row + 1)
        if record is not _BLANK:
            yield row, record


# ---------------------------------------------------------------------------------------------
# Parquet


def _parquet_file(f: InputFile, field: str | None) -> Any:
    """The open Parquet file; with `field`, checked to have that column of strings."""
    require_extra("pyarrow", f"reading the Parquet file {f.label}")
    import pyarrow
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f.path)
    except (pyarrow.ArrowException, OSError) as e:
        raise MyPTError(f"input file {f.label} is not a readable Parquet file ({e}); it may be truncated: "
                        "write or download it again") from None
    if field is None:
        return pf
    schema = pf.schema_arrow
    if field not in schema.names:
        columns = ", ".join(repr(n) for n in schema.names[:12])
        raise MyPTError(f"input file {f.label} has no column '{field}' (its columns: {columns}); pass "
                        "--text_field NAME to read another column")
    kind = schema.field(field).type
    if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
        raise MyPTError(f"input file {f.label}: the column '{field}' holds {kind}, not text; pass --text_field "
                        "with a column of strings")
    return pf


def parquet_items(f: InputFile, hasher: Any, field: str, start_row: int = 0,
                  batch_rows: int = 8192) -> Iterator[Item]:
    """One Item per row with text; the file's bytes are hashed first (pyarrow reads out of order)."""
    import pyarrow

    for chunk in byte_chunks(f, hasher, 1 << 20):
        del chunk
    pf = _parquet_file(f, field)
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[field]):
            texts = batch.column(0).to_pylist()
            if row + len(texts) <= start_row:
                row += len(texts)
                continue
            for text in texts:
                if row >= start_row and text:
                    _check_text(f, text, row)
                    yield Item(text, True, row, row)
                row += 1
    except (pyarrow.ArrowException, OSError) as e:
        raise MyPTError(f"input file {f.label} could not be read at row {row} ({e}); it may be truncated: "
                        "write or download it again") from None


def parquet_records(f: InputFile, hasher: Any, batch_rows: int = 8192) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row, {column: value}) of every row, the file's bytes hashed first: for readers of whole
    records (mypt.finetune's conversations)."""
    import pyarrow

    for chunk in byte_chunks(f, hasher, 1 << 20):
        del chunk
    pf = _parquet_file(f, None)
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows):
            for record in batch.to_pylist():
                yield row, record
                row += 1
    except (pyarrow.ArrowException, OSError) as e:
        raise MyPTError(f"input file {f.label} could not be read at row {row} ({e}); it may be truncated: "
                        "write or download it again") from None


def _check_text(f: InputFile, text: str, row: int) -> None:
    if "\0" in text:
        raise MyPTError(f"input file {f.label} row {row}: the text contains NUL characters, so it looks binary; "
                        "pass text only")


def items(f: InputFile, hasher: Any, text_field: str, position: int = 0, row: int = 0,
          chunk_size: int = CHUNK_SIZE, cut: int | None = None) -> Iterator[Item]:
    """The Items of any kind of file, from (position, row) on; `cut`: see text_items."""
    if f.kind == "jsonl":
        return jsonl_items(f, hasher, text_field, position, row, chunk_size)
    if f.kind == "parquet":
        return parquet_items(f, hasher, text_field, row)
    return text_items(f, hasher, position, chunk_size, cut)


