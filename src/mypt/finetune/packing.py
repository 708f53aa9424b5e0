"""Conversations -> packed rows of block_size + 1 tokens with their targets -> batches.

Packing: conversations are laid end to end in rows of block_size + 1 tokens, in order, never
across two rows: one that does not fit in what is left of a row starts the next row, and the
rest of the row is padding (end-of-text ids, never a target). A conversation longer than a row
is cut at a message boundary: its first messages that fit are kept (`cut` counts them); one
whose first assistant message does not fit at all is left out (`dropped`).

Targets: a row's labels are its tokens where the template trains on them (the assistant's
messages and their end-of-turn) and IGNORE_INDEX (-1) elsewhere; a batch's inputs are rows[:, :-1]
and its targets labels[:, 1:], as in pretraining.

Batches are a pure function of (seed, batch number), so a resumed run continues exactly: with
one source, batch b takes rows b * batch_size ... of epoch e's permutation (a fresh permutation
of the rows for each epoch, seeded by (seed, e)), so every row is seen once per epoch; with a
mixture, each row of a batch draws its source by weight, then a row of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mypt.finetune.template import Turn, trained_mask
from mypt.ops import IGNORE_INDEX

if TYPE_CHECKING:
    import torch


@dataclass
class Packed:
    """Rows of block_size + 1 tokens (int32) and their labels (the token, or IGNORE_INDEX)."""

    tokens: np.ndarray
    labels: np.ndarray
    conversations: int  # packed (cut ones included)
    cut: int  # longer than a row: cut at a message boundary
    dropped: int  # no assistant message fits in a row: left out

    @property
    def rows(self) -> int:
        return len(self.tokens)

    def trained_fraction(self) -> float:
        """The share of the targets (labels[:, 1:]) that the loss counts."""
        targets = self.labels[:, 1:]
        return float((targets >= 0).mean()) if targets.size else 0.0


def fit(parts: Sequence[Turn], row: int) -> tuple[list[Turn], bool] | None:
    """The longest run of whole first messages within `row` tokens, and whether any was cut;
    None when it would train on nothing."""
    kept, total = [], 0
    for t in parts:
        if total + len(t.ids) > row:
            break
        kept.append(t)
        total += len(t.ids)
    if not any(t.trained for t in kept):
        return None
    return kept, len(kept) < len(parts)


def pack(conversations: Iterable[Sequence[Turn]], block_size: int, pad_id: int) -> Packed:
    """Pack conversations (each its messages as Turns) into rows (see the module docstring)."""
    row = block_size + 1
    placed: list[tuple[int, int, list[int], np.ndarray]] = []  # (row, offset, ids, labels)
    n_rows, used, count, cut, dropped = 0, row, 0, 0, 0
    for parts in conversations:
        fitted = fit(parts, row)
        if fitted is None:
            dropped += 1
            continue
        kept, was_cut = fitted
        cut += was_cut
        count += 1
        ids = [i for t in kept for i in t.ids]
        if used + len(ids) > row:  # does not fit in what is left: the next row
            n_rows, used = n_rows + 1, 0
        labels = np.where(trained_mask(kept), np.asarray(ids), IGNORE_INDEX)
        placed.append((n_rows - 1, used, ids, labels))
        used += len(ids)
    tokens = np.full((n_rows, row), pad_id, dtype=np.int32)
    targets = np.full((n_rows, row), IGNORE_INDEX, dtype=np.int32)
    for r, at, ids, labels in placed:
        tokens[r, at:at + len(ids)] = ids
        targets[r, at:at + len(ids)] = labels
    return Packed(tokens, targets, count, cut, dropped)


class ChatBatches:
    """Batches of packed rows from one or more sources (weights: a mixture's)."""

    def __init__(self, parts: Sequence[Packed], weights: Sequence[float]) -> None:
        self.parts = list(parts)
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self._perm: tuple[tuple[int, int], np.ndarray] | None = None  # ((seed, epoch), permutation)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    def _epoch_rows(self, seed: int, positions: np.ndarray) -> np.ndarray:
        """Rows at global positions of the one source's sequence of epoch permutations."""
        n = self.parts[0].rows
        out = np.empty(len(positions), dtype=np.int64)
        for epoch in np.unique(positions // n).tolist():
            if self._perm is None or self._perm[0] != (seed, epoch):
                self._perm = ((seed, epoch), np.random.default_rng((seed, epoch)).permutation(n))
            mine = positions // n == epoch
            out[mine] = self._perm[1][positions[mine] % n]
        return out

    def windows(self, batch_size: int, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, labels) of batch `index`, each (batch_size, block_size + 1)."""
        if len(self.parts) == 1:
            rows = self._epoch_rows(seed, index * batch_size + np.arange(batch_size))
            return self.parts[0].tokens[rows], self.parts[0].labels[rows]
        rng = np.random.default_rng((seed, index))
        which = rng.choice(len(self.parts), size=batch_size, p=self.weights)
        picks = rng.integers(0, np.array([p.rows for p in self.parts])[which])
        tokens = np.stack([self.parts[k].tokens[r] for k, r in zip(which.tolist(), picks.tolist(), strict=True)])
        labels = np.stack([self.parts[k].labels[r] for k, r in zip(which.tolist(), picks.tolist(), strict=True)])
        return tokens, labels


def to_device(tokens: np.ndarray, labels: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs tokens[:, :-1] and targets labels[:, 1:] as int64 tensors on device."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(tokens[:, :-1], dtype=np.int64))
    y = torch.from_numpy(np.ascontiguousarray(labels[:, 1:], dtype=np.int64))
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)
