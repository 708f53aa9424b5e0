"""The GPT model: one transformer whose components the config chooses, the architecture only.

Imports torch only (and mypt.ops, the kernels it runs on, and mypt.kvcache, the cache it decodes
with, which import torch only): no files, CLI, tokenizers or distributed code. The configuration is a
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
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mypt import decode_step
from mypt.kernels import MAX_ROWS, DecodeLinear
from mypt.kvcache import CacheStep, KVCache
from mypt.ops import attends_in_fp32, attention, linear_cross_entropy, rms_norm, squared_relu

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
    """Llama 3's rotary scaling of the frequencies inv_freq: a frequency of which fewer than
    low_freq_factor wavelengths fit in the original context is divided by factor, one of which
    more than high_freq_factor fit is kept, and those between are blended linearly."""
    fits = s["original_max_position_embeddings"] * inv_freq / (2 * math.pi)  # wavelengths per context
    keep = ((fits - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])).clamp(0, 1)
    return (1 - keep) * inv_freq / s["factor"] + keep * inv_freq


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
# Layers


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm computed in the input's dtype (bf16 activations under autocast stay bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


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
        fp32 = attends_in_fp32(x, cached=cache is not None)  # a CPU trains faster in fp32 (mypt.ops)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)  # fp32
            if not fp32:
                q, k = q.to(v.dtype), k.to(v.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs)
        # No dropout on the attention probabilities: it would force the memory-hungry math
        # kernel (B, nh, T, T) instead of the flash kernel. Dropout acts on the residual stream.
        if cache is not None:
            y = cache.attend(layer, q, k.to(v.dtype), v)
        else:
            y = attention(q, k, v, mask, mask is None, fp32)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


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
            h = squared_relu(h)
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
        """GPT-2 initialisation (see weight_inits), in place."""
        for param, init in self.weight_inits():
            init(param)

    def weight_inits(self) -> Iterator[tuple[nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]]:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer);
        with zero_init the residual projections and an untied head start at zero instead.

        As (parameter, in-place init) in the order they draw from torch's generator (a tied
        matrix twice, the second wins), so an init applied to any tensor of its parameter's shape
        gives the same values: mypt.dist fills a sharded model one parameter at a time this way.
        """
        cfg = self.config
        normal = partial(nn.init.normal_, mean=0.0, std=0.02)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                yield module.weight, normal
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                yield module.bias, nn.init.zeros_
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                yield module.weight, nn.init.ones_
        residual = nn.init.zeros_ if cfg.zero_init else partial(normal, std=0.02 / math.sqrt(2 * cfg.n_layer))
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                yield p, residual
        if cfg.zero_init and not cfg.tie_embeddings:
            yield self.lm_head.weight, nn.init.zeros_

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
        """(logits, loss). With targets the logits are never materialised: (None, mean loss over
        the targets that are not ops.IGNORE_INDEX)."""
        x = self.hidden_states(idx)
        if targets is None:
            return self.lm_head(x), None
        head_loss = getattr(self.lm_head, "cross_entropy", None)  # a head replaced from outside (LoRA's rows)
        if head_loss is not None:
            return None, head_loss(x.flatten(0, 1), targets.flatten())
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
        head = type(self.lm_head)
        if device.type == "cpu" and (head is nn.Linear or (head is DecodeLinear and batch > MAX_ROWS)):
            # On a CPU, rows of logits are faster against a contiguous (n_embd, vocab) copy of
            # the head than through torch's nn.Linear (vocab, n_embd) (BENCHMARKS.md, Generation);
            # a few rows of a DecodeLinear head are faster still (head_logits), so a cache of a
            # few rows needs no copy (which costs as long as a dozen tokens). A head replaced
            # from outside (mypt.quant's int8 layer) runs itself.
            cache.head = self.lm_head.weight.detach().t().contiguous()
        cache.decode_step = decode_step.plan(self, cache)  # a few new tokens as one call, where it applies
        return cache

    @torch.no_grad()
    def next_logits(self, idx: torch.Tensor, cache: KVCache | None = None, rows: torch.Tensor | None = None,
                    start: int = 0, last: int = 0) -> torch.Tensor:
        """Logits (n, vocab) for the position after each row of idx (n, T): head_logits of
        next_hidden (see there)."""
        return self.head_logits(self.next_hidden(idx, cache, rows, start, last), cache)

    @torch.no_grad()
    def next_hidden(self, idx: torch.Tensor, cache: KVCache | None = None, rows: torch.Tensor | None = None,
                    start: int = 0, last: int = 0) -> torch.Tensor:
        """Final hidden states (n, n_embd) for the position after each row of idx (n, T).

        With a cache, idx holds each row's new tokens only: row i of idx continues cache row
        rows[i] (rows: a LongTensor of n distinct row indices; None = every row, in order); the
        other rows keep their content. Without one, idx is a whole window whose first token
        sits at position `start` (it matters only to a rotary model past block_size).
        last > 0: those after each of the last `last` tokens instead, (n, last, n_embd)
        (mypt.lookup verifies drafted tokens with their logits). A decoder that feeds rows in
        several passes makes the logits of all of them in one head_logits: the head's weights,
        the largest matrix of a small model, are then read once a step.
        """
        if cache is not None and cache.decode_step is not None:
            x = cache.decode_step.run(idx, cache, rows, last)
            if x is not None:
                return x
        step = None if cache is None else cache.step(rows, idx.size(1))
        x = self.hidden_states(idx, step, start)
        x = x[:, -last:, :] if last else x[:, -1, :]
        if step is not None:
            step.commit()
        return x

    def head_logits(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """fp32 logits (..., vocab) of final hidden states x (..., n_embd): through the cache's
        copy of the head where it has one (see new_cache), except for a few rows of a head laid
        out for decoding (mypt.ops.lay_out_for_decoding: MyPT's kernel reads it faster)."""
        few = x.numel() // x.size(-1) <= MAX_ROWS and type(self.lm_head) is DecodeLinear
        if cache is not None and cache.head is not None and not few:
            return (x @ cache.head).float()
        return self.lm_head(x).float()


def sliding_window_mask(T: int, window: int, device: torch.device) -> torch.Tensor:
    """(T, T) bool: query i sees keys i - window + 1 .. i."""
    i = torch.arange(T, device=device)
    offset = i[:, None] - i[None, :]
    return (offset >= 0) & (offset < window)
