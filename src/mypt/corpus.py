"""The built-in corpus: English text that every CPython ships, so a fresh machine can train.

It is the text of Python's own documentation topics (`pydoc_data.topics`), about 0.5 MB,
written once to a cache file so the data pipeline treats it like any input file.
"""

from __future__ import annotations

from pathlib import Path

from mypt.errors import MyPTError
from mypt.fsutil import atomic_write_bytes, write_error

BUILTIN_CORPUS = "builtin:python-docs"


def builtin_corpus_text() -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise MyPTError("this Python has no pydoc_data module, so the built-in corpus is missing; "
                        "pass --input_file with a text of your own") from None
    return "\n\n".join(topics[key].strip() for key in sorted(topics)) + "\n"


def builtin_corpus_path(cache_dir: Path) -> Path:
    """The built-in corpus as a UTF-8 file in cache_dir (written on first use)."""
    data = builtin_corpus_text().encode("utf-8")
    path = cache_dir / "python-docs.txt"
    if not path.exists() or path.stat().st_size != len(data) or path.read_bytes() != data:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(f"the token cache folder {cache_dir}", exc) from None
        atomic_write_bytes(path, data, f"the built-in corpus {path}")
    return path
