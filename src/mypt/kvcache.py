"""The KV cache of generation: keys and values of every layer for a batch of independent rows.

Imports torch (and mypt.kernels, for attention row by row). `GPT.new_cache` makes a `KVCache`;
each forward pass of new tokens plans its positions, writes and attention mask once
(`CacheStep`) and every layer stores its keys and values through it. `PrefixCache` keeps the
keys and values of prompt starts seen before (a system prompt, a few-shot block) so a row can
begin from a copy of them. `mypt.sampling` decides what to feed; this module only stores and
masks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from mypt import kernels
from mypt.ops import attention


class KVCache:
    """Keys and values of every layer for `batch` independent rows (slots) of a decoding batch.

    Made by `GPT.new_cache`, fed by `GPT.next_logits(idx, cache, rows)`. Each row has its own
    length (`pos[r]`: the tokens it holds so far, i.e. the position of its next token), so rows
    can hold requests at different lengths; `reset(rows)` empties rows for new requests while
    the others keep their content. A row stores up to `capacity` positions (block_size, or
    fewer for requests known to stay shorter). Keys are stored already rotated at their absolute
    position, so in a rotary model a full row of block_size is a ring buffer: position p lives
    in slot p % block_size, each new token overwrites the row's oldest entry and attends to the
    block_size positions ending at itself, with no re-prefill. A learned-position row, or a row
    of a smaller capacity, cannot grow past its capacity (the sampler refills a shorter window
    instead).
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, capacity: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype, ring: bool) -> None:
        shape = (n_layer, batch, n_kv_head, capacity, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = torch.zeros(batch, dtype=torch.long)  # on the host: no device sync to plan a step
        self.ring = ring  # rows wrap around (rotary positions, capacity == block_size)
        self.head: torch.Tensor | None = None  # lm_head weight as (n_embd, vocab), see GPT.new_cache
        self.decode_step = None  # a mypt.decode_step.DecodeStep feeding this cache, see GPT.new_cache

    @property
    def batch(self) -> int:
        return self.k.size(1)

    @property
    def capacity(self) -> int:
        return self.k.size(3)

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Empty the given rows (all if None); their stale entries are never read."""
        self.pos[slice(None) if rows is None else rows.cpu()] = 0

    def step(self, rows: torch.Tensor | None, T: int) -> CacheStep:
        """Plan feeding T new tokens to each of `rows` (all rows if None)."""
        return CacheStep(self, rows, T)


class CacheStep:
    """One forward pass of T new tokens for some rows of a KVCache: positions, writes, the mask.

    Built once per forward and shared by the layers: `positions` are the new tokens' absolute
    positions ((T,) when every row is at the same length, else (n, T)); each layer's `update`
    stores its keys and values and returns those its queries attend to; `commit` advances the
    rows' lengths. The attention mask lets the query
    at position p see the keys at positions p - block_size + 1 .. p of its own row.

    Two ways to store: normally the new keys are written first and the queries attend to the
    row's slots. When T > 1 new tokens would overwrite (in a full rotary row) entries that the
    earlier of them still see, the queries attend to the old slots and the new keys side by
    side, and the new keys are written afterwards.

    Three ways to read, in `attend`. One new token a row on a CPU (a decoding step): each row's
    query attends to its own filled slots in MyPT's kernel (mypt.kernels.attend_rows), nothing
    padded or masked. Otherwise the cache rows between the lowest and highest of `rows` (a
    `span`) are read in place, the queries placed among them (the rows in between attend too,
    and their output is dropped); or, where that span is over twice as many rows as are fed,
    the rows' keys and values are gathered (copied) first. Copying a batch's keys and values
    every layer cost more than the rest of a step (BENCHMARKS.md, the serving engine).
    """

    def __init__(self, cache: KVCache, rows: torch.Tensor | None, T: int) -> None:
        self.cache, self.T = cache, T
        S, device = cache.capacity, cache.k.device
        self.host_rows = slice(None) if rows is None else rows.cpu()
        self.rows = None if rows is None else rows.to(device)
        starts = cache.pos[self.host_rows].tolist()  # plain ints: planning costs microseconds
        first, last = starts[0], max(starts)
        if not cache.ring and last + T > S:
            raise ValueError(f"this cache's rows hold at most {S} tokens (a learned-position model's: block_size); "
                             "reset the row and feed a shorter window, or make a cache of a larger capacity")
        self.first, self.end = first, last + T  # end: one past the highest new position
        self.uniform = all(p == first for p in starts)
        self.side_by_side = T > 1 and last + T > S
        self.length = S if self.side_by_side else min(S, last + T)  # slots read
        if self.uniform:  # (T,): the same positions for every row
            self.positions = torch.arange(first, first + T, device=device)
        else:  # (n, T)
            self.positions = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)
        # one new token a row on a CPU: each row attends to its own slots in MyPT's kernel (by_row)
        self.by_row = (T == 1 and device.type == "cpu" and cache.k.dtype == torch.float32 and cache.k.is_contiguous()
                       and not torch.is_autocast_enabled("cpu") and kernels.available())
        if self.by_row:
            self.row_list = list(range(cache.batch)) if rows is None else self.host_rows.tolist()
            self.lengths = [min(S, p + 1) for p in starts]
        self.mask = None if self.by_row else self._mask(starts, device)
        self.is_causal = self.mask is None and T > 1  # every row starts at 0 and fits: plain causal
        self.span: slice | None = None  # the cache rows read in place (see attend), if any
        if rows is not None and not self.side_by_side and not self.by_row:
            fed = self.host_rows.tolist()
            lo, hi = min(fed), max(fed) + 1
            if hi - lo <= 2 * len(starts):
                self.span, self.offsets = slice(lo, hi), (self.rows - lo)
                if self.mask is not None and self.mask.dim() == 4:  # per row: those between see every key read
                    mask = torch.ones((hi - lo, *self.mask.shape[1:]), dtype=torch.bool, device=device)
                    mask[self.offsets] = self.mask
                    self.mask = mask

    def _slot_positions(self, length_after: torch.Tensor) -> torch.Tensor:
        """(n, L) position held by each of the first L slots of each row once it holds
        `length_after` tokens (negative: the slot is empty)."""
        S = self.cache.capacity
        slots = torch.arange(self.length, device=length_after.device)
        last = length_after[:, None] - 1
        return last - torch.remainder(last - slots, S)

    def _mask(self, starts: list[int], device: torch.device) -> torch.Tensor | None:
        """(n, 1, T, keys) bool, or None where every query sees every key read (or plain causal)."""
        S, T = self.cache.capacity, self.T
        if self.uniform and not self.side_by_side:
            if T == 1 or self.first == 0:
                return None  # one query sees every slot read; or a fresh prefill: is_causal
            if self.first + T <= S:  # no wrap: the slots are positions 0 .. first + T - 1
                return torch.ones(T, self.first + T, dtype=torch.bool, device=device).tril(diagonal=self.first)
        start = torch.tensor(starts, device=device)  # (n,): only here, so a plain decode step copies nothing
        positions = self.positions.expand(start.size(0), T)  # (n, T)
        if self.side_by_side:
            keys = torch.cat((self._slot_positions(start), positions), dim=1)
        else:
            keys = self._slot_positions(start + T)
        query = positions[:, :, None]  # (n, T, 1)
        keys = keys[:, None, :]  # (n, 1, keys)
        visible = (keys >= 0) & (keys <= query) & (keys > query - S)
        return visible[:, None]  # (n, 1, T, keys): the same for every head

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this layer's new k, v (n, nkv, T, hs) and attend with q (n, nh, T, hs) over each
        row's keys: (n, nh, T, hs)."""
        if self.by_row:
            ck, cv = self.cache.k[layer], self.cache.v[layer]
            self._write(ck, cv, k, v)
            y = kernels.attend_rows(q, ck, cv, self.row_list, self.lengths)
            if y is not None:
                return y
        keys, values = self.update(layer, k, v)
        if self.span is None:
            return attention(q, keys, values, self.mask, self.is_causal, fp32=False, shapes_vary=True)
        placed = q.new_zeros((keys.size(0), *q.shape[1:]))
        placed[self.offsets] = q
        return attention(placed, keys, values, self.mask, self.is_causal, fp32=False, shapes_vary=True)[self.offsets]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new k, v (n, nkv, T, hs); return the keys and values to attend to:
        of the rows fed, or of every row of the span."""
        ck, cv = self.cache.k[layer], self.cache.v[layer]  # (B, nkv, S, hs)
        if self.side_by_side:
            old_k, old_v = (ck, cv) if self.rows is None else (ck[self.rows], cv[self.rows])
            keys, values = torch.cat((old_k, k), dim=2), torch.cat((old_v, v), dim=2)
            self._write(ck, cv, k, v)
            return keys, values
        self._write(ck, cv, k, v)
        if self.rows is None:
            return ck[:, :, :self.length], cv[:, :, :self.length]
        if self.span is not None:
            return ck[self.span, :, :self.length], cv[self.span, :, :self.length]
        return ck[self.rows, :, :self.length], cv[self.rows, :, :self.length]

    def _write(self, ck: torch.Tensor, cv: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        S, T = self.cache.capacity, self.T
        if T > S:  # only the last block_size positions are kept
            k, v = k[:, :, T - S:], v[:, :, T - S:]
        slot = (self.first + T - k.size(2)) % S
        if self.rows is None and self.uniform and slot + k.size(2) <= S:  # one contiguous slice
            ck[:, :, slot:slot + k.size(2)] = k
            cv[:, :, slot:slot + k.size(2)] = v
            return
        n = ck.size(0) if self.rows is None else self.rows.size(0)
        slots = torch.remainder(self.positions.expand(n, T)[:, T - k.size(2):], S)  # (n, t)
        rows = torch.arange(ck.size(0), device=ck.device) if self.rows is None else self.rows
        ck[rows[:, None], :, slots] = k.transpose(1, 2)  # indexed as (n, t, nkv, hs)
        cv[rows[:, None], :, slots] = v.transpose(1, 2)

    def commit(self) -> None:
        self.cache.pos[self.host_rows] += self.T


class PrefixCache:
    """Keys and values of prompt starts, in blocks of `block` tokens, least recently used first out.

    A prompt's first n * block tokens are found block by block: an entry is keyed by its parent
    entry (the tokens before it, which its keys and values depend on) and its own tokens, so a
    hit is exact, never a hash collision. `load` copies the longest stored start of a prompt into
    a fresh cache row (always leaving its last token to be computed, for its logits); `store`
    keeps the blocks of a prefilled row that are not stored yet. At most `max_tokens` tokens are
    kept (the memory of max_tokens / block_size rows of the decoding cache).
    Rows must start at position 0 and not wrap around (sampling stores only such rows).
    """

    def __init__(self, block: int, max_tokens: int) -> None:
        self.block, self.max_tokens = block, max_tokens
        self._entries: OrderedDict[tuple[int, tuple[int, ...]], tuple[int, torch.Tensor, torch.Tensor]] = OrderedDict()
        self._next_id = 1  # 0: the empty start, every first block's parent
        self.hits = 0  # loads that reused at least one block

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def _chain(self, tokens: Sequence[int], n_blocks: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """The stored entries of tokens' first blocks, in order, up to the first one missing."""
        found, parent, B = [], 0, self.block
        for j in range(n_blocks):
            key = (parent, tuple(tokens[j * B:(j + 1) * B]))
            entry = self._entries.get(key)
            if entry is None:
                break
            self._entries.move_to_end(key)
            found.append(entry)
            parent = entry[0]
        return found

    def load(self, tokens: Sequence[int], cache: KVCache, row: int) -> int:
        """Copy the longest stored start of tokens (but not their last token) into the empty
        cache row `row`; returns how many tokens it holds now (0 when none was stored)."""
        found = self._chain(tokens, (len(tokens) - 1) // self.block)
        if not found:
            return 0
        n = len(found) * self.block
        cache.k[:, row, :, :n] = torch.cat([k for _, k, _ in found], dim=2)
        cache.v[:, row, :, :n] = torch.cat([v for _, _, v in found], dim=2)
        cache.pos[row] = n
        self.hits += 1
        return n

    def store(self, tokens: Sequence[int], cache: KVCache, row: int) -> None:
        """Keep the full blocks of `tokens`, which cache row `row` holds at positions 0 .. len - 1."""
        if len(tokens) > cache.capacity or self.max_tokens < self.block:
            return
        B, n_blocks = self.block, len(tokens) // self.block
        found = self._chain(tokens, n_blocks)
        parent = found[-1][0] if found else 0
        for j in range(len(found), n_blocks):
            key = (parent, tuple(tokens[j * B:(j + 1) * B]))
            parent, self._next_id = self._next_id, self._next_id + 1
            k = cache.k[:, row, :, j * B:(j + 1) * B].clone()  # (n_layer, nkv, block, hs)
            self._entries[key] = (parent, k, cache.v[:, row, :, j * B:(j + 1) * B].clone())
        while len(self._entries) * B > self.max_tokens:
            self._entries.popitem(last=False)
