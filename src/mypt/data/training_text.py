"""The text of a run's training split, read before any tokenizer exists (a bpe tokenizer trained
for a run learns from it, and never from validation text).

The split is dataset.split's, source by source:

- A source of several documents validates on whole documents chosen by key, and a key depends
  only on the document's file name and row (prepare.doc_keys), so each document is sorted as
  it is read. The one exception needs the whole source: if no key falls below the threshold,
  the lowest-keyed document validates (and if all do, the highest-keyed one trains). So the
  lowest-keyed training candidate so far (and the highest-keyed validation document) is put
  aside until the end; one it replaces is training text. JSON lines and Parquet records put
  aside are kept in memory; a text file put aside is read again (it may be large).
- A source of one document validates on its last val_split of *tokens*, and tokens exist only
  once a tokenizer does. Its text is read up to `heads[i]` bytes, first (1 - val_split) of
  it; once the source is prepared with the tokenizer, `too_far` says whether validation starts
  inside that text, and then moves the head back for the next try.

val_split 0 reads every document whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mypt.data import dataset
from mypt.data.corpus import Corpus, Prepared, Source, source_files, source_label
from mypt.data.prepare import doc_keys
from mypt.data.sources import InputFile, items, split_safely

_COUNT_STEP = 1 << 22  # tokens looked up at a time when counting the bytes before validation


class _NoHash:
    """items() feeds every byte read to a hasher; here nothing needs the hash."""

    def update(self, data: bytes) -> None:
        pass


@dataclass
class _Doc:
    """A document put aside: where it starts, its key, and its text when it is one record."""

    file: InputFile
    position: int
    row: int
    key: int
    texts: list[str] | None
    n_bytes: int = 0


@dataclass
class _Tally:
    """What one read of a source gave: documents seen, documents given as training text."""

    n_documents: int = 0
    n_training: int = 0
    n_validation: int = 0
    low: _Doc | None = None  # the training candidate with the lowest key
    high: _Doc | None = None  # the validation document with the highest key
    later: list[_Doc] = field(default_factory=list)  # put aside as `low`, then replaced: training


class TrainingText:
    """Iterable over the training split's text of `sources` (see the module docstring).

    Each iteration reads the sources again, so a tokenizer can be trained on it more than once.
    `cache` is the token cache (the built-in corpus is written there if a source is it).
    """

    def __init__(self, sources: Sequence[Source], cache: Path, val_split: float) -> None:
        self.sources, self.cache, self.val_split = list(sources), cache, val_split
        self.heads: dict[int, int] = {}  # one-document sources: bytes of their text read
        self.n_bytes = 0  # UTF-8 bytes given by the last iteration
        self._read: dict[int, tuple[str, _Tally]] = {}

    def __iter__(self) -> Iterator[str]:
        self.n_bytes = 0
        for i, source in enumerate(self.sources):
            for text in self._source_text(i, source):
                self.n_bytes += len(text.encode("utf-8", errors="surrogatepass"))
                yield text

    def label(self) -> str:
        """The sources in a few words, for messages: a file, a number of files, named sources."""
        return ", ".join(source_label(s, [f.path for f in source_files(s, self.cache)]) for s in self.sources)

    def describe(self) -> str:
        """What the last iteration read, source by source."""
        parts = []
        for i, (label, tally) in sorted(self._read.items()):
            if i in self.heads:
                parts.append(f"the first {self.heads[i]:,} bytes of {label}")
            elif self.val_split == 0:
                parts.append(f"all {tally.n_documents:,} documents of {label}")
            else:
                parts.append(f"{tally.n_training:,} of the {tally.n_documents:,} documents of {label} "
                             "(the others validate)")
        return "; ".join(parts)

    def too_far(self, corpus: Corpus, byte_lengths: np.ndarray) -> list[str]:
        """After `corpus` (these sources) is prepared with a tokenizer trained on this text: a line
        for each one-document source whose validation starts inside the text read, which then
        reads as far before that start as it read past it. `byte_lengths`: bytes of each id."""
        lines = []
        for i, head in self.heads.items():
            part = corpus.parts[i]
            start = _validation_start(part, self.val_split, byte_lengths)
            if start < head:
                self.heads[i] = max(0, start - (head - start))
                lines.append(f"validation starts at byte {start:,} of {self._read[i][0]}, before the end of the "
                             f"{head:,} bytes read")
        return lines

    # -- reading one source

    def _source_text(self, index: int, source: Source) -> Iterator[str]:
        files = source_files(source, self.cache)
        tally = _Tally()
        self._read[index] = (source_label(source, [f.path for f in files]), tally)
        threshold = dataset.val_threshold(self.val_split)
        for f in files:
            doc, mode = None, ""
            for item in items(f, _NoHash(), source.text_field):
                if doc is None:
                    doc = _Doc(f, item.position, item.row, int(doc_keys(f.name, np.array([item.row]))[0]),
                               None if f.kind == "text" else [])
                    mode = self._sort(doc, threshold, tally)
                if mode == "train":
                    yield item.text
                elif mode == "aside":
                    doc.n_bytes += len(item.text.encode("utf-8", errors="surrogatepass"))
                    if doc.texts is not None:
                        doc.texts.append(item.text)
                if item.doc_end:
                    doc = None
        if self.val_split > 0:
            yield from self._finish(index, source, tally)

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

    def _finish(self, index: int, source: Source, tally: _Tally) -> Iterator[str]:
        """The training text of the documents put aside, once the whole source is seen."""
        if tally.n_documents == 1:
            only = tally.low or tally.high
            assert only is not None
            head = self.heads.setdefault(index, int(only.n_bytes * (1 - self.val_split)))
            yield from _head(_texts(only, source), head)
            return
        training = list(tally.later)
        if 0 < tally.n_validation < tally.n_documents:
            training.append(tally.low)  # else no key is below the threshold: the lowest validates
        elif tally.n_validation == tally.n_documents > 1:
            training.append(tally.high)  # every key is below it: the highest trains
        for doc in training:
            assert doc is not None
            tally.n_training += 1
            yield from _texts(doc, source)


def _texts(doc: _Doc, source: Source) -> Iterable[str]:
    """A put-aside document's text: kept, or read again from its file."""
    if doc.texts is not None:
        return doc.texts
    return _read_again(doc, source)


def _read_again(doc: _Doc, source: Source) -> Iterator[str]:
    for item in items(doc.file, _NoHash(), source.text_field, doc.position, doc.row):
        yield item.text
        if item.doc_end:
            return


def _head(texts: Iterable[str], limit: int) -> Iterator[str]:
    """The texts up to `limit` UTF-8 bytes, the last one cut at a safe point (so a little less)."""
    done = 0
    for text in texts:
        data = text.encode("utf-8", errors="surrogatepass")
        if done + len(data) <= limit:
            done += len(data)
            yield text
            continue
        head, _ = split_safely(data[:limit - done].decode("utf-8", errors="ignore"), force=False)
        yield head
        return


def _validation_start(part: Prepared, val_split: float, byte_lengths: np.ndarray) -> int:
    """The byte of a one-document source's text at which its validation tokens start."""
    s = dataset.split(*dataset.documents(part.folder, part.manifest), val_split)
    assert s.n_documents == 1, "only a one-document source splits on tokens"
    store = dataset.shards(part.folder, part.manifest)
    start, end = (int(x) for x in s.train[0])
    total = 0
    for i in range(start, end, _COUNT_STEP):
        total += int(byte_lengths[store.take(np.arange(i, min(i + _COUNT_STEP, end)))].sum())
    return total
