"""Batches from prepared data: token streams over memory-mapped shards, mixtures, batch_at.

A `TokenStream` is one split of one source: runs of the dataset's token stream (whole
documents, or a single document's head or tail), read as one sequence. Reading a window maps
its positions to shards and pulls only those pages from disk, so each process (or machine)
reads just the windows it trains on, and opening a stream costs the same for any corpus size.
Every id read is checked against the vocabulary: a damaged shard is one message naming it.

`batch_at` is a pure function of (seed, index): resuming needs no sampler state, and the
trainer gives each rank its own global micro-batch index, so ranks draw different windows. A
`Mixture` first draws the source of each row by weight, then a window in that source.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mypt.errors import MyPTError

if TYPE_CHECKING:
    import torch


def damaged(folder: Path, what: str) -> MyPTError:
    """The one message for a prepared dataset that does not read back as it was written."""
    return MyPTError(f"the token cache {folder} is damaged: {what}; delete that folder (or all of "
                     f"{folder.parent}), and the next run or mypt prepare prepares it again")


class Shards:
    """The token files of a prepared dataset, memory-mapped, as one global token stream."""

    def __init__(self, arrays: Sequence[np.ndarray], paths: Sequence[Path] = ()) -> None:
        self.arrays, self.paths = list(arrays), list(paths)
        self.starts = np.concatenate([[0], np.cumsum([len(a) for a in self.arrays])]).astype(np.int64)

    @classmethod
    def open(cls, paths: Sequence[Path], dtypes: Sequence[str], counts: Sequence[int]) -> Shards:
        return cls([np.memmap(p, dtype=np.dtype(d), mode="r", shape=(n,))
                    for p, d, n in zip(paths, dtypes, counts, strict=True)], paths)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def take(self, index: np.ndarray) -> np.ndarray:
        """Tokens at global positions `index` (any shape), as int64."""
        if len(self.arrays) == 1:
            return self.arrays[0][index].astype(np.int64)
        shard = np.searchsorted(self.starts, index, side="right") - 1
        out = np.empty(index.shape, dtype=np.int64)
        for k in np.unique(shard).tolist():
            mine = shard == k
            out[mine] = self.arrays[k][index[mine] - self.starts[k]]
        return out


class TokenStream:
    """Runs [start, end) of a Shards stream read as one sequence; `table` maps stored ids to the
    model's (char datasets store ids by first appearance). Stored ids must be below `n_ids`."""

    def __init__(self, shards: Shards, runs: np.ndarray, table: np.ndarray | None = None, name: str = "",
                 n_ids: int | None = None) -> None:
        self.shards, self.table, self.name = shards, table, name
        self.n_ids = len(table) if table is not None else n_ids
        runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
        self.run_starts = runs[:, 0]
        self.offsets = np.concatenate([[0], np.cumsum(runs[:, 1] - runs[:, 0])]).astype(np.int64)

    @classmethod
    def from_array(cls, tokens: np.ndarray) -> TokenStream:
        return cls(Shards([tokens]), np.array([[0, len(tokens)]]))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """Tokens at positions of this stream (any shape), as int64 ids of the model."""
        if len(self.run_starts) == 1:
            index = positions + self.run_starts[0]
        else:
            run = np.searchsorted(self.offsets, positions, side="right") - 1
            index = positions - self.offsets[run] + self.run_starts[run]
        ids = self.shards.take(index)
        if self.n_ids is not None and ids.size and int(ids.max()) >= self.n_ids:
            self._out_of_range(index, ids)
        return self.table[ids] if self.table is not None else ids

    def _out_of_range(self, index: np.ndarray, ids: np.ndarray) -> None:
        at = np.unravel_index(int(np.argmax(ids)), ids.shape)
        shard = int(np.searchsorted(self.shards.starts, index[at], side="right") - 1)
        path = self.shards.paths[shard]
        raise damaged(path.parent, f"{path.name} holds the id {int(ids[at])} at position "
                                   f"{int(index[at] - self.shards.starts[shard]):,}, beyond the "
                                   f"{self.n_ids:,} ids of its tokenizer")


class Mixture:
    """Several streams drawn from by weight (each row of a batch picks its stream)."""

    def __init__(self, streams: Sequence[TokenStream], weights: Sequence[float]) -> None:
        assert streams and len(streams) == len(weights), "one weight per stream"
        self.streams = list(streams)
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.lengths = np.array([len(s) for s in self.streams], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.lengths.sum())


Batches = np.ndarray | TokenStream | Mixture  # what batch_at draws from


def _streams(data: Batches) -> Mixture:
    if isinstance(data, Mixture):
        return data
    stream = data if isinstance(data, TokenStream) else TokenStream.from_array(data)
    return Mixture([stream], [1.0])


def _tensors(windows: np.ndarray, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """x = windows[:, :-1], y = windows[:, 1:] on device."""
    import torch  # here, so that preparing data never loads torch

    device = torch.device(device)
    x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return x.to(device), y.to(device)


def batch_at(
    data: Batches,
    block_size: int,
    batch_size: int,
    seed: int,
    index: int,
    device: str | torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch number `index` of the stream for `seed`: a pure function of (seed, index).

    One stream: batch_size windows at uniform random starts. A mixture: each row first draws
    its stream by weight, then a start in it. Stateless, so resuming a run needs no sampler
    state: the trainer passes a global micro-batch index.
    """
    mix = _streams(data)
    assert (mix.lengths >= block_size + 1).all(), "open_splits guarantees one block fits"
    rng = np.random.default_rng((seed, index))
    span = np.arange(block_size + 1)
    if len(mix.streams) == 1:
        starts = rng.integers(0, mix.lengths[0] - block_size, size=batch_size)
        return _tensors(mix.streams[0].gather(starts[:, None] + span), device)
    which = rng.choice(len(mix.streams), size=batch_size, p=mix.weights)
    starts = rng.integers(0, mix.lengths[which] - block_size)
    windows = np.empty((batch_size, block_size + 1), dtype=np.int64)
    for k in np.unique(which).tolist():
        rows = which == k
        windows[rows] = mix.streams[k].gather(starts[rows, None] + span)
    return _tensors(windows, device)
