"""The built-in corpora: texts every machine has, named `builtin:NAME` wherever an input file is.

- `builtin:python-docs`, the default when a new run names no input: the text of Python's own
  documentation topics (`pydoc_data.topics`, about 0.5 MB), which every CPython ships.
- `builtin:tinyshakespeare`: the "tiny Shakespeare" corpus (1,115,394 bytes of public-domain
  text), shipped gzip-compressed in mypt/assets and checked against its sha256.

Each is written once to a UTF-8 file in the token cache, so the data pipeline reads it like any
input file.
"""

from __future__ import annotations

import gzip
from pathlib import Path

from mypt.errors import MyPTError
from mypt.fsutil import atomic_write_bytes, read_shipped, write_error

PREFIX = "builtin:"
DEFAULT = "builtin:python-docs"
TINYSHAKESPEARE = "builtin:tinyshakespeare"
TINYSHAKESPEARE_GZ_SHA256 = "bf237b9f5a05abe79d7a0caa809b6513fbcbc323e9521a77086d556e4c9bbed8"


def _python_docs() -> bytes:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise MyPTError(f"this Python has no pydoc_data module, so {DEFAULT} is missing; pass --input_file "
                        f"with a text of your own, or {TINYSHAKESPEARE}") from None
    return ("\n\n".join(topics[key].strip() for key in sorted(topics)) + "\n").encode("utf-8")


def _tinyshakespeare() -> bytes:
    return gzip.decompress(read_shipped("tinyshakespeare.txt.gz", TINYSHAKESPEARE_GZ_SHA256))


_CORPORA = {DEFAULT: _python_docs, TINYSHAKESPEARE: _tinyshakespeare}


def is_builtin(value: str) -> bool:
    return value.startswith(PREFIX)


def check_name(value: str) -> str:
    """A `builtin:NAME` value as given, if NAME is a built-in corpus."""
    if value not in _CORPORA:
        raise MyPTError(f"--input_file {value}: no such built-in corpus; the built-in corpora are "
                        + ", ".join(_CORPORA))
    return value


def builtin_bytes(value: str) -> bytes:
    """The UTF-8 bytes of a built-in corpus."""
    return _CORPORA[check_name(value)]()


def builtin_text(value: str) -> str:
    return builtin_bytes(value).decode("utf-8")


def file_name(value: str) -> str:
    """The name the corpus's file has in the cache (and its identity as an input file)."""
    return check_name(value)[len(PREFIX):] + ".txt"


def builtin_path(value: str, cache_dir: Path) -> Path:
    """A built-in corpus as a UTF-8 file in cache_dir (written on first use, and again if changed)."""
    data = builtin_bytes(value)
    path = cache_dir / file_name(value)
    if not path.exists() or path.stat().st_size != len(data) or path.read_bytes() != data:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(f"the token cache folder {cache_dir}", exc) from None
        atomic_write_bytes(path, data, f"the built-in corpus {path}")
    return path
