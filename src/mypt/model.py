"""The GPT model: GPT-2 architecture, a KV cache for generation, and a fused loss head.

Imports torch only: no files, CLI, tokenizers or distributed code. The configuration is any
object with the attributes n_layer, n_head, n_embd, block_size, vocab_size, dropout and bias
(`mypt.config.ModelConfig`). Parameter names follow nanoGPT / GPT-2 (transformer.h.0.attn.c_attn ...).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSS_CHUNK_ROWS = 1024  # rows of the (B*T, vocab) logits, turned into their gradients, held at a time


class KVCache:
    """Keys and values of every layer for positions [0, pos), preallocated for block_size."""

    def __init__(self, n_layer: int, batch: int, n_head: int, block_size: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (n_layer, batch, n_head, block_size, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.head: torch.Tensor | None = None  # lm_head weight as (n_embd, vocab), see GPT.new_cache

    def reset(self) -> None:
        """Forget every position (the buffers are reused; stale entries are never read)."""
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) at the current position; return all keys and values so far."""
        start, end = self.pos, self.pos + k.size(2)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        mask, causal = None, True
        if cache is not None:
            past = cache.pos
            k, v = cache.update(layer, k, v)  # (B, nh, past + T, hs)
            if T == 1:
                causal = False  # one new query may see every cached position
            elif past > 0:
                # queries sit at positions past..past+T-1: each sees keys up to its own position
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
                causal = False
        # No dropout on the attention probabilities: it would force the memory-hungry math
        # kernel (B, nh, T, T) instead of the flash kernel. Dropout acts on the residual stream.
        if cache is None and x.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
            # A CPU's flash-attention backward is 2-4x slower in bf16 than in fp32 (BENCHMARKS.md):
            # attend in fp32, outside autocast, which would cast the inputs back down
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """Share one matrix between the token embedding and the output layer (counted once).

        The one place the head is tied: call it again after load_state_dict(assign=True), which
        replaces the two parameters separately.
        """
        self.lm_head.weight = self.transformer.wte.weight

    def init_weights(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def num_params(self) -> int:
        """Unique parameters (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final-LayerNorm output (B, T, n_embd) for tokens idx (B, T)."""
        T = idx.size(1)
        start = cache.pos if cache is not None else 0
        assert start + T <= self.config.block_size, "sequence longer than block_size"
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache, i)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits, loss). With targets the logits are never materialised: (None, mean loss)."""
        x = self.hidden_states(idx)
        if targets is None:
            return self.lm_head(x), None
        return None, linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten())

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        c = self.config
        cache = KVCache(c.n_layer, batch, c.n_head, c.block_size, c.n_embd // c.n_head, device, dtype)
        if device.type == "cpu":
            # On a CPU, one row of logits is 2-3x faster against a contiguous (n_embd, vocab) copy
            # of the head than through nn.Linear's (vocab, n_embd) (bench/bench_generate.py).
            cache.head = self.lm_head.weight.detach().t().contiguous()
        return cache

    @torch.no_grad()
    def next_logits(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, vocab) for the position after idx; with a cache idx holds only the new tokens."""
        x = self.hidden_states(idx, cache)[:, -1, :]
        if cache is not None and cache.head is not None:
            return (x @ cache.head).float()
        return self.lm_head(x).float()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


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
                max_logit = logits.amax(dim=1).to(acc)
                # in place (softmax reads each row before it writes it); it accumulates in fp32 even
                # for bf16 logits
                probs = torch.softmax(logits, dim=1, out=logits)
                # log-sum-exp from the largest probability, which never underflows (in bf16 it
                # carries bf16's 0.4% rounding, i.e. 0.002 nats per row, as the logits do)
                target_logp = target_logit - max_logit + probs.amax(dim=1).to(acc).log()
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
