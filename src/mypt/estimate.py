"""Parameters, training memory and FLOPs for a model config.

Parameter counts come from the model itself, built on the meta device (no memory, no time), so
they always equal what training builds. Memory and FLOPs are analytic estimates whose terms
follow what autograd keeps for MyPT's model (see `activation_bytes`); bench/memory.py measures
them against real training steps.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from mypt.errors import MyPTError
from mypt.model import GPT, LOSS_CHUNK_ROWS


def build_meta_model(cfg: Any) -> GPT:
    with torch.device("meta"):
        return GPT(cfg)


def param_breakdown(cfg: Any) -> dict[str, int]:
    """Unique parameters by part: embeddings, one layer, all layers, final norm, total."""
    model = build_meta_model(cfg)
    t = model.transformer
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {
        "token_embedding": count(t.wte),
        "position_embedding": count(t.wpe),
        "per_layer": count(t.h[0]) if len(t.h) else 0,
        "layers": count(t.h),
        "final_norm": count(t.ln_f),
        "lm_head": 0,  # tied to the token embedding
        "total": model.num_params(),
    }


def count_params(cfg: Any) -> int:
    return build_meta_model(cfg).num_params()


def flops_per_token(cfg: Any, n_params: int | None = None) -> int:
    """Training FLOPs per token (forward + backward): 6 N for the matmuls + 12 L C T for attention."""
    n = count_params(cfg) if n_params is None else n_params
    matmul_params = n - cfg.block_size * cfg.n_embd  # position embeddings are a lookup, not a matmul
    return 6 * matmul_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    total: int


def activation_bytes(cfg: Any, batch_size: int, precision: str, checkpointing: bool = False) -> int:
    """Bytes autograd keeps for backward in one training step at batch_size x block_size.

    Per block, in units of u = B*T*C elements: the two LayerNorm inputs (2u), the inputs of the
    four linear layers (1u + 1u + 1u + 4u: attention in, attention out, MLP in, GELU out), q, k, v
    (3u) and the GELU input (4u). fp32 keeps all of them in 4 bytes; bf16 autocast keeps the
    LayerNorm inputs in fp32 and the rest in 2 bytes. Each dropout adds a 1-byte mask.
    With checkpointing a block keeps only its input, and one block is recomputed at a time.
    The fused loss head keeps the gradient of its input (u, fp32) and one chunk of logits.
    """
    u = batch_size * cfg.block_size * cfg.n_embd
    low = 4 if precision == "fp32" else 2
    mask = u if cfg.dropout > 0 else 0
    block = 2 * u * 4 + 14 * u * low + 2 * mask  # + attention-residual and MLP dropout masks
    layers = cfg.n_layer * 4 * u + block if checkpointing else cfg.n_layer * block
    head = 4 * u + 3 * 4 * min(LOSS_CHUNK_ROWS, batch_size * cfg.block_size) * cfg.vocab_size
    return mask + layers + head  # + the embedding dropout mask


def estimate_memory(cfg: Any, batch_size: int, precision: str = "fp32",
                    checkpointing: bool = False, n_params: int | None = None) -> MemoryEstimate:
    """Peak bytes of a training step with AdamW: fp32 master weights, grads and two moments."""
    n = count_params(cfg) if n_params is None else n_params
    weights = 4 * n + (2 * n if precision != "fp32" else 0)  # + autocast's bf16 weight copies
    gradients = 4 * n + 4 * cfg.vocab_size * cfg.n_embd  # + the loss head's fp32 weight gradient
    optimizer = 8 * n
    acts = activation_bytes(cfg, batch_size, precision, checkpointing)
    return MemoryEstimate(weights, gradients, optimizer, acts, weights + gradients + optimizer + acts)


def max_batch_size(cfg: Any, memory: int, precision: str, checkpointing: bool = False) -> int:
    """The largest batch size whose estimate fits in `memory` bytes (0 if none does)."""
    n = count_params(cfg)
    fits = lambda b: estimate_memory(cfg, b, precision, checkpointing, n).total <= memory  # noqa: E731
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30,
          "T": 2**40, "TB": 2**40, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory(text: str) -> int:
    """'8GB', '16 GiB', '512MB' -> bytes (binary units: what tools report for RAM and VRAM)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise MyPTError(f"--memory {text!r}: expected a size such as 8GB, 16GiB or 512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def detect_memory() -> tuple[int, str]:
    """The memory training would use: the first GPU's, else this machine's RAM."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, f"GPU {props.name}"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "system RAM"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
