"""The GPT model: one transformer whose components the config chooses, a batched KV cache for
generation, and a fused loss head.

Imports torch only: no files, CLI, tokenizers or distributed code. The configuration is a
`mypt.config.ModelConfig` (or any object with its attributes). The components, each a config
field whose default is GPT-2's:

* position: "learned" (a table of block_size position vectors, added to the token embedding)
  or "rope" (rotary: each head's queries and keys are rotated by their position, base
  rope_theta, pairs of adjacent channels). A rotary model also runs past block_size: each
  token then attends to the block_size tokens ending at itself (sliding-window attention).
* norm: "layernorm" or "rmsnorm" (both with a gain; eps norm_eps), before attention, before the
  MLP and before the output layer.
* mlp: "gelu" (tanh GELU), "swiglu" (silu(gate) * up, gate and up one fused projection) or
  "relu2" (squared ReLU); the hidden width is intermediate_size (default 4 * n_embd).
* qk_norm: the config's norm (with a gain over the head size, no bias) of each head's queries
  and keys, before the rotation (with rmsnorm, as Qwen3).
* n_kv_head: grouped-query attention; n_head query heads share n_kv_head key/value heads.
* tie_embeddings: the output layer is the token embedding (counted once), or its own matrix.
* zero_init: the attention and MLP output projections (and an untied output layer) start at
  zero, so every block starts as the identity.

Parameter names follow nanoGPT / GPT-2 (transformer.h.0.attn.c_attn ...): c_attn holds the
query, key and value projections as one matrix (rows: n_head, then n_kv_head, then n_kv_head
heads), an swiglu c_fc holds gate then up.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSS_CHUNK_ROWS = 1024  # rows of the (B*T, vocab) logits, turned into their gradients, held at a time


# ---------------------------------------------------------------------------------------------
# Rotary positions


def rope_table(head_dim: int, theta: float, length: int, device: torch.device,
               scaling: dict | None = None) -> torch.Tensor:
    """exp(i * position * theta^(-2j / head_dim)) as complex64 (length, head_dim / 2).

    Computed in float64 and rounded once, so angles stay exact at positions far past block_size.
    scaling: Llama 3's frequency scaling (config.rope_scaling), as transformers computes it.
    """
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    if scaling:
        inv_freq = llama3_frequencies(inv_freq, scaling)
    angles = torch.arange(length, dtype=torch.float64, device=device)[:, None] * inv_freq
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def llama3_frequencies(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3's scaling: long wavelengths slowed by factor, short ones kept, the band between
    interpolated (transformers' _compute_llama3_parameters)."""
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    slow = torch.where(wavelen > old / s["low_freq_factor"], inv_freq / s["factor"], inv_freq)
    smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * slow / s["factor"] + smooth * slow
    medium = (wavelen >= old / s["high_freq_factor"]) & (wavelen <= old / s["low_freq_factor"])
    return torch.where(medium, smoothed, slow)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[2j], x[2j+1]) of x (B, T, nh, hs) by its position's angle j, as one
    complex product (a CPU runs it several times faster than the halves form's six products).

    rotations: (T, 1, hs/2) or (B, T, 1, hs/2) complex. Returns fp32 (B, T, nh, hs). Llama's
    transformers layout pairs x[j] with x[j + hs/2] instead; mypt.formats permutes the query
    and key rows on export and import.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotations).flatten(-2)


# ---------------------------------------------------------------------------------------------
# KV cache


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
        self.mask = self._mask(starts, device)
        self.is_causal = self.mask is None and T > 1  # every row starts at 0 and fits: plain causal

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

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new k, v (n, nkv, T, hs); return the keys and values to attend to."""
        ck, cv = self.cache.k[layer], self.cache.v[layer]  # (B, nkv, S, hs)
        if self.side_by_side:
            old_k, old_v = (ck, cv) if self.rows is None else (ck[self.rows], cv[self.rows])
            keys, values = torch.cat((old_k, k), dim=2), torch.cat((old_v, v), dim=2)
            self._write(ck, cv, k, v)
            return keys, values
        self._write(ck, cv, k, v)
        if self.rows is None:
            return ck[:, :, :self.length], cv[:, :, :self.length]
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


# ---------------------------------------------------------------------------------------------
# Layers


class _CPURMSNorm(torch.autograd.Function):
    """RMSNorm in a few passes over memory, for CPUs (where torch's rms_norm is a chain of
    elementwise ops, several times LayerNorm's; BENCHMARKS.md): the sum of squares in one pass, and backward through
    LayerNorm's fused kernel (with the mean set to 0 it is RMSNorm's backward but for one
    term, rstd * mean(g * w), added here)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        n = x.size(-1)
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
        rstd = rstd.square_().div_(n).add_(eps).rsqrt_()  # (..., 1)
        ctx.save_for_backward(x, rstd, weight)
        return (x * rstd.to(x.dtype)).mul_(weight.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, rstd, weight = ctx.saved_tensors
        n, w, r = x.size(-1), weight.to(x.dtype), rstd.to(x.dtype)
        grad = grad.contiguous()
        gx, gw, _ = torch.ops.aten.native_layer_norm_backward(grad, x, [n], torch.zeros_like(r), r, w, None,
                                                              [True, True, False])
        gx.addcmul_(r, (grad @ w).unsqueeze(-1), value=1.0 / n)
        return gx, gw.to(weight.dtype), None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm computed in the input's dtype (bf16 activations under autocast stay bf16),
    through _CPURMSNorm on a CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return _CPURMSNorm.apply(x, self.weight, self.eps)
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


def make_norm(cfg: Any, dim: int, bias: bool | None = None) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias if bias is None else bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        if cfg.qk_norm:  # the config's norm over each head (a gain, no bias)
            self.q_norm = make_norm(cfg, cfg.head_dim, bias=False)
            self.k_norm = make_norm(cfg, cfg.head_dim, bias=False)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None, mask: torch.Tensor | None = None,
                cache: CacheStep | None = None, layer: int = 0) -> torch.Tensor:
        """mask: None for plain causal attention, else (T, T) bool (sliding window past block_size)."""
        B, T, C = x.shape
        hs, nkv = self.head_dim, self.n_kv_head
        q, k, v = self.c_attn(x).split((self.n_head * hs, nkv * hs, nkv * hs), dim=2)
        q, k, v = q.view(B, T, self.n_head, hs), k.view(B, T, nkv, hs), v.view(B, T, nkv, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # A CPU's flash-attention backward is slower in bf16 than in fp32 (BENCHMARKS.md): in
        # training it attends in fp32, outside autocast, which would cast the inputs back down
        fp32 = cache is None and x.device.type == "cpu"
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)  # fp32
            if not fp32:
                q, k = q.to(v.dtype), k.to(v.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs)
        gqa = nkv != self.n_head
        causal = mask is None
        if cache is not None:
            k, v = cache.update(layer, k.to(v.dtype), v)  # (B, nkv, keys, hs)
            mask, causal = cache.mask, cache.is_causal
        # No dropout on the attention probabilities: it would force the memory-hungry math
        # kernel (B, nh, T, T) instead of the flash kernel. Dropout acts on the residual stream.
        if fp32:
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                   is_causal=causal, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


class _SquaredReLU(torch.autograd.Function):
    """relu(x)^2 with a backward of two passes, 2 relu(x) * grad (autograd's, through relu and
    pow, takes about twice as long on a CPU)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r.square()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (r,) = ctx.saved_tensors
        return torch.mul(r, grad).mul_(2)


class MLP(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.kind = cfg.mlp
        hidden = cfg.hidden_size
        self.c_fc = nn.Linear(cfg.n_embd, 2 * hidden if self.kind == "swiglu" else hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.kind == "gelu":
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "relu2":
            h = _SquaredReLU.apply(h)
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.ln_1 = make_norm(cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None, mask: torch.Tensor | None = None,
                cache: CacheStep | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


# ---------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False
        parts = dict(wte=nn.Embedding(cfg.vocab_size, cfg.n_embd))
        if cfg.position == "learned":
            parts["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **parts,
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=make_norm(cfg, cfg.n_embd),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self._rope: torch.Tensor | None = None  # a cache, not state: rebuilt on first use on each device
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """Share one matrix between the token embedding and the output layer (counted once),
        when the config ties them; nothing otherwise.

        The one place the head is tied: call it again after load_state_dict(assign=True), which
        replaces the two parameters separately.
        """
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def init_weights(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer);
        with zero_init the residual projections and an untied head start at zero instead."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(module.weight)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if self.config.zero_init:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
        if self.config.zero_init and not self.config.tie_embeddings:
            nn.init.zeros_(self.lm_head.weight)

    def num_params(self) -> int:
        """Unique parameters (a tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def rope(self, positions: torch.Tensor, end: int) -> torch.Tensor:
        """Rotations for the absolute positions (T,) or (n, T), all below `end`, shaped to
        broadcast over heads: (T, 1, hs/2) or (n, T, 1, hs/2)."""
        cfg = self.config
        if self._rope is None or self._rope.size(0) < end or self._rope.device != positions.device:
            length = max(end, cfg.block_size, 2 * (self._rope.size(0) if self._rope is not None else 0))
            self._rope = rope_table(cfg.head_dim, cfg.rope_theta, length, positions.device, cfg.rope_scaling)
        return self._rope[positions].unsqueeze(-2)

    def hidden_states(self, idx: torch.Tensor, cache: CacheStep | None = None, start: int = 0) -> torch.Tensor:
        """Final-norm output (B, T, n_embd) for tokens idx (B, T).

        Without a cache the tokens sit at positions start .. start + T - 1; with one, at each
        row's next positions.
        """
        cfg = self.config
        T = idx.size(1)
        if cache is not None:
            positions, end = cache.positions, cache.end
        else:
            positions, end = torch.arange(start, start + T, device=idx.device), start + T
            if cfg.position == "learned":
                assert start + T <= cfg.block_size, "sequence longer than block_size"
        x = self.transformer.wte(idx)
        rope = None
        if cfg.position == "learned":
            x = x + self.transformer.wpe(positions)
        else:
            rope = self.rope(positions, end)
        x = self.transformer.drop(x)
        mask = None if cache is not None or T <= cfg.block_size else sliding_window_mask(T, cfg.block_size, idx.device)
        for i, block in enumerate(self.transformer.h):
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, rope, mask, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache, i)
        return self.transformer.ln_f(x)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits, loss). With targets the logits are never materialised: (None, mean loss)."""
        x = self.hidden_states(idx)
        if targets is None:
            return self.lm_head(x), None
        return None, linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten())

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype,
                  capacity: int | None = None) -> KVCache:
        """An empty KV cache of `batch` rows (see KVCache); feed it with next_logits.

        capacity: tokens a row can hold, at most block_size (the default); a smaller one saves
        memory for requests known to stay shorter.
        """
        c = self.config
        capacity = c.block_size if capacity is None else min(capacity, c.block_size)
        cache = KVCache(c.n_layer, batch, c.kv_heads, capacity, c.head_dim, device, dtype,
                        ring=c.position == "rope" and capacity == c.block_size)
        if device.type == "cpu":
            # On a CPU, one row of logits is faster against a contiguous (n_embd, vocab) copy of
            # the head than through nn.Linear's (vocab, n_embd) (BENCHMARKS.md, Generation).
            cache.head = self.lm_head.weight.detach().t().contiguous()
        return cache

    @torch.no_grad()
    def next_logits(self, idx: torch.Tensor, cache: KVCache | None = None, rows: torch.Tensor | None = None,
                    start: int = 0) -> torch.Tensor:
        """Logits (n, vocab) for the position after each row of idx (n, T).

        With a cache, idx holds each row's new tokens only: row i of idx continues cache row
        rows[i] (rows: a LongTensor of n distinct row indices; None = every row, in order); the
        other rows keep their content. Without one, idx is a whole window whose first token
        sits at position `start` (it matters only to a rotary model past block_size).
        """
        step = None if cache is None else cache.step(rows, idx.size(1))
        x = self.hidden_states(idx, step, start)[:, -1, :]
        if step is not None:
            step.commit()
            if cache.head is not None:
                return (x @ cache.head).float()
        return self.lm_head(x).float()


def sliding_window_mask(T: int, window: int, device: torch.device) -> torch.Tensor:
    """(T, T) bool: query i sees keys i - window + 1 .. i."""
    i = torch.arange(T, device=device)
    offset = i[:, None] - i[None, :]
    return (offset >= 0) & (offset < window)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _row_max(t: torch.Tensor) -> torch.Tensor:
    """t.amax(dim=1) of a contiguous (rows, vocab) block. A CPU reduces bf16 along a row one value
    at a time, at less than fp32's speed; taking the max of 128-wide column groups first lets it
    compare 128 lanes at once (exact, and faster: BENCHMARKS.md)."""
    if t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.size(1) % 128 == 0:
        return t.view(t.size(0), -1, 128).amax(dim=1).amax(dim=1)
    return t.amax(dim=1)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (x @ weight.T) without keeping the (N, vocab) logits.

    The logits are made chunk by chunk in the autocast dtype (bf16 where enabled), the softmax
    and loss in fp32, and the gradients for x and weight are computed in the same pass, so
    backward only scales them, in place. Memory: one (chunk, vocab) block, allocated once, in
    which each chunk of rows turns from logits into probabilities into gradients in place.
    The loss comes from a softmax (one exp per logit, not log_softmax and exp, two).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        n, vocab = x.size(0), weight.size(0)
        w = weight.to(dtype)
        grad_x = torch.empty_like(x)
        acc = torch.promote_types(dtype, torch.float32)  # softmax and sums: fp32 at least
        grad_w = None
        total = torch.zeros((), dtype=acc, device=x.device)
        grad = torch.empty(min(n, LOSS_CHUNK_ROWS), vocab, dtype=dtype, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            for start in range(0, n, LOSS_CHUNK_ROWS):
                xc = x[start:start + LOSS_CHUNK_ROWS].to(dtype)
                tc = targets[start:start + LOSS_CHUNK_ROWS]
                logits = torch.mm(xc, w.T, out=grad[:xc.size(0)])  # (chunk, vocab)
                target_logit = logits.gather(1, tc[:, None]).squeeze(1).to(acc)
                max_logit = _row_max(logits).to(acc)
                # in place (softmax reads each row before it writes it); it accumulates in fp32 even
                # for bf16 logits
                probs = torch.softmax(logits, dim=1, out=logits)
                # log-sum-exp from the largest probability, which never underflows (in bf16 it
                # carries bf16's 0.4% rounding, i.e. 0.002 nats per row, as the logits do)
                target_logp = target_logit - max_logit + _row_max(probs).to(acc).log()
                total -= target_logp.sum()
                # d(loss_sum)/d(logits) = softmax - one_hot(target); at the target expm1(logp) is
                # p - 1 without cancellation
                probs[torch.arange(tc.numel(), device=x.device), tc] = torch.expm1(target_logp).to(dtype)
                grad_x[start:start + LOSS_CHUNK_ROWS] = probs @ w
                if grad_w is None:
                    grad_w = (probs.T @ xc).to(acc)
                elif dtype == acc:
                    grad_w.addmm_(probs.T, xc)
                else:  # in row blocks: adding bf16 to fp32 makes an fp32 copy of what is added
                    for total_rows, part in zip(grad_w.split(4096), (probs.T @ xc).split(4096), strict=True):
                        total_rows += part
        ctx.save_for_backward(grad_x, grad_w)
        ctx.n = n
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        grad_x, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.n
        # in place: no second (vocab, n_embd) buffer while every activation is still alive; a
        # second backward through the same graph fails with autograd's in-place error
        return grad_x.mul_(scale), grad_w.mul_(scale).to(ctx.weight_dtype), None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits x @ weight.T (x: (N, C), weight: (V, C), targets: (N,))."""
    dtype = _compute_dtype(x)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(x, weight, targets, dtype)
    acc = torch.promote_types(dtype, torch.float32)
    total = torch.zeros((), dtype=acc, device=x.device)
    w = weight.to(dtype)
    for start in range(0, x.size(0), LOSS_CHUNK_ROWS):
        logits = (x[start:start + LOSS_CHUNK_ROWS].to(dtype) @ w.T).to(acc)
        total += F.cross_entropy(logits, targets[start:start + LOSS_CHUNK_ROWS], reduction="sum")
    return total / x.size(0)
