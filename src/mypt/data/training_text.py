"""A run's text before any tokenizer exists: the training split's text (a bpe tokenizer trained
for a run learns from it, and never from validation text), and the characters of the whole
text (a char tokenizer's vocabulary).

The split is split.py's, source by source:

- A source of one text file gives its text up to its cut (split.cut_of), read once.
- A source of several documents validates on whole documents chosen by key, and a key depends
  only on the document's file name and row (prepare.doc_keys), so each document is sorted as
  it is read. The one exception needs the whole source: if no key falls below the threshold,
  the lowest-keyed document validates (and if all do, the highest-keyed one trains). So the
  lowest-keyed training candidate so far (and the highest-keyed validation document) is put
  aside until the end; one it replaces is training text. JSON lines and Parquet records put
  aside are kept in memory; a text file put aside is read again (it may be large).

val_split 0 reads every document whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mypt.data import split as splits
from mypt.data.corpus import Source, source_files, source_label
from mypt.data.prepare import doc_keys
from mypt.data.sources import InputFile, NoHash, items

_N_POINTS = 0x110000  # code points


@dataclass
class _Doc:
    """A document put aside: where it starts, its key, and its text when it is one record."""

    file: InputFile
    position: int
    row: int
    key: int
    texts: list[str] | None


@dataclass
class _Tally:
    """What one read of a source gave: documents seen, documents given as training text."""

    n_documents: int = 0
    n_training: int = 0
    n_validation: int = 0
    cut: int | None = None  # a source of one text file: the bytes of text given
    low: _Doc | None = None  # the training candidate with the lowest key
    high: _Doc | None = None  # the validation document with the highest key
    later: list[_Doc] = field(default_factory=list)  # put aside as `low`, then replaced: training


class TrainingText:
    """Iterable over the training split's text of `sources` (see the module docstring).

    Each iteration reads the sources again. `cache` is the token cache (the built-in corpus is
    written there if a source is it).
    """

    def __init__(self, sources: Sequence[Source], cache: Path, val_split: float) -> None:
        self.sources, self.cache, self.val_split = list(sources), cache, val_split
        self.n_bytes = 0  # UTF-8 bytes given by the last iteration
        self._read: dict[int, tuple[str, _Tally]] = {}

    def __iter__(self) -> Iterator[str]:
        self.n_bytes = 0
        for i, source in enumerate(self.sources):
            for text in self._source_text(i, source):
                self.n_bytes += len(text.encode("utf-8", errors="surrogatepass"))
                yield text

    def characters(self) -> list[str]:
        """The sorted characters of the whole text, validation included (what a char tokenizer knows)."""
        seen = np.zeros(_N_POINTS, dtype=bool)
        for source in self.sources:
            for f in source_files(source, self.cache):
                for item in items(f, NoHash(), source.text_field):
                    seen[np.frombuffer(item.text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)] = True
        return [chr(c) for c in np.flatnonzero(seen).tolist()]

    def label(self) -> str:
        """The sources in a few words, for messages: a file, a number of files, named sources."""
        return ", ".join(source_label(s, [f.path for f in source_files(s, self.cache)]) for s in self.sources)

    def describe(self) -> str:
        """What the last iteration read, source by source."""
        parts = []
        for _, (label, tally) in sorted(self._read.items()):
            if tally.cut is not None:
                parts.append(f"the first {tally.cut:,} bytes of {label}")
            elif self.val_split == 0:
                parts.append(f"all {tally.n_documents:,} documents of {label}")
            else:
                parts.append(f"{tally.n_training:,} of the {tally.n_documents:,} documents of {label} "
                             "(the others validate)")
        return "; ".join(parts)

    # -- reading one source

    def _source_text(self, index: int, source: Source) -> Iterator[str]:
        files = source_files(source, self.cache)
        tally = _Tally()
        label = source_label(source, [f.path for f in files])
        self._read[index] = (label, tally)
        tally.cut = splits.cut_of(files, self.val_split)
        if tally.cut is not None:
            yield from _head(files[0], tally.cut)
            return
        threshold = splits.val_threshold(self.val_split)
        for f in files:
            doc, mode = None, ""
            for item in items(f, NoHash(), source.text_field):
                if doc is None:
                    doc = _Doc(f, item.position, item.row, int(doc_keys(f.name, np.array([item.row]))[0]),
                               None if f.kind == "text" else [])
                    mode = self._sort(doc, threshold, tally)
                if mode == "train":
                    yield item.text
                elif mode == "aside" and doc.texts is not None:
                    doc.texts.append(item.text)
                if item.doc_end:
                    doc = None
        if self.val_split > 0:
            yield from self._finish(label, source, tally)

    def _sort(self, doc: _Doc, threshold: int, tally: _Tally) -> str:
        """'train', 'aside' (decided at the end of the source) or 'skip' (validation)."""
        tally.n_documents += 1
        if self.val_split == 0:
            tally.n_training += 1
            return "train"
        if doc.key < threshold:
            tally.n_validation += 1
            if tally.high is None or doc.key > tally.high.key:  # the first of equal keys, as np.argmax
                tally.high = doc
                return "aside"
            return "skip"
        if tally.low is None or doc.key < tally.low.key:  # the first of equal keys, as np.argmin
            if tally.low is not None:
                tally.later.append(tally.low)
            tally.low = doc
            return "aside"
        tally.n_training += 1
        return "train"

    def _finish(self, label: str, source: Source, tally: _Tally) -> Iterator[str]:
        """The training text of the documents put aside, once the whole source is seen."""
        if tally.n_documents == 1:
            raise splits.one_record_error(label)
        training = list(tally.later)
        if 0 < tally.n_validation < tally.n_documents:
            training.append(tally.low)  # else no key is below the threshold: the lowest validates
        elif tally.n_validation == tally.n_documents > 1:
            training.append(tally.high)  # every key is below it: the highest trains
        for doc in training:
            assert doc is not None
            tally.n_training += 1
            yield from _texts(doc, source)


def _head(f: InputFile, cut: int) -> Iterator[str]:
    """A text file's text before byte `cut` (where a piece ends, see sources.text_items)."""
    for item in items(f, NoHash(), "", cut=cut):
        if item.position >= cut:
            return
        yield item.text


def _texts(doc: _Doc, source: Source) -> Iterable[str]:
    """A put-aside document's text: kept, or read again from its file."""
    if doc.texts is not None:
        return doc.texts
    return _read_again(doc, source)


def _read_again(doc: _Doc, source: Source) -> Iterator[str]:
    for item in items(doc.file, NoHash(), source.text_field, doc.position, doc.row):
        yield item.text
        if item.doc_end:
            return
