"""Parameters, training memory and FLOPs for a model config.

Parameter counts come from the model itself, built on the meta device (no memory, no time), so
they always equal what training builds (tests/test_model.py checks them against built models).
Memory and FLOPs are analytic estimates whose terms follow what autograd keeps for MyPT's model
(see `activation_bytes`); bench/memory.py measures them against real training steps.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from mypt.errors import MyPTError
from mypt.model import GPT
from mypt.ops import LOSS_CHUNK_ROWS
from mypt.optim import is_hidden_matrix


def _meta_model(cfg: Any, n_layer: int) -> GPT:
    """cfg's model with n_layer of its (identical) layers, on the meta device: no memory."""
    with torch.device("meta"):
        return GPT(dataclasses.replace(cfg, n_layer=n_layer))


def param_breakdown(cfg: Any) -> dict[str, int]:
    """Unique parameters by part: embeddings, one layer (and its attention and MLP), all layers,
    final norm, an untied output layer, total; and hidden_matrices, what Muon would update.

    Counted on a model of at most one layer: the layers are identical and share nothing, so the
    rest follows exactly, and a config of 10,000 layers counts as fast as one of 2.
    """
    built = min(cfg.n_layer, 1)
    model = _meta_model(cfg, built)
    t = model.transformer
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    first = t.h[0] if built else None
    per_layer = count(first) if first is not None else 0
    return {
        "token_embedding": count(t.wte),
        "position_embedding": count(t.wpe) if "wpe" in t else 0,
        "per_layer": per_layer,
        "attention": count(first.attn) if first is not None else 0,
        "mlp": count(first.mlp) if first is not None else 0,
        "layers": cfg.n_layer * per_layer,
        "final_norm": count(t.ln_f),
        "lm_head": 0 if cfg.tie_embeddings else count(model.lm_head),
        "total": model.num_params() + (cfg.n_layer - built) * per_layer,
        "hidden_matrices": cfg.n_layer * sum(p.numel() for n, p in t.h.named_parameters(prefix="transformer.h")
                                             if is_hidden_matrix(n, p)),
    }


def count_params(cfg: Any) -> int:
    return param_breakdown(cfg)["total"]


def flops_per_token(cfg: Any, n_params: int | None = None) -> int:
    """Training FLOPs per token (forward + backward): 6 per weight of a matrix product (the
    blocks' matrices and the output layer) + 12 L C T for attention (C: the heads' total width,
    n_head * head_dim, which is n_embd unless head_size is set).

    Embedding tables are lookups, not products: the position table, and the token table when
    the output layer is a matrix of its own (a tied one is counted once, as the output layer).
    """
    n = count_params(cfg) if n_params is None else n_params
    lookups = (cfg.block_size if cfg.position == "learned" else 0) * cfg.n_embd
    if not cfg.tie_embeddings:
        lookups += cfg.vocab_size * cfg.n_embd
    return 6 * (n - lookups) + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.block_size


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    total: int


def activation_bytes(cfg: Any, batch_size: int, precision: str, checkpointing: bool = False) -> int:
    """Bytes a training step needs at its peak beyond weights, gradients and optimizer state.

    The peak is the end of the forward pass, inside the fused loss head (bench/memory.py measures
    it). Per block, in units of u = B*T*C values, with h = the MLP's hidden width / C and g =
    key/value heads / heads, autograd keeps the two norm inputs (2u, fp32), the inputs of the
    four linear layers (3u + hu), the MLP's inner activations (GELU's or ReLU's input: hu;
    SwiGLU's fused gate-and-up output and the SiLU output: 3hu), q, k, v and the attention
    output ((2 + 2g) u), the query and key norms' inputs with qk_norm ((1 + g) u), and a 1-byte
    mask per dropout. bf16 autocast keeps the linear, MLP and query/key norm inputs in 2 bytes;
    attention is counted in fp32, as a CPU runs it (on a GPU it stays bf16). With checkpointing
    a block keeps only its input (4u) and one block is recomputed at a time, in backward, when
    the head's workspace is gone. Outside the blocks: the embedding dropout mask, the final
    norm's input and output and the head's input gradient (3 x 4u), and the head's workspace:
    one (LOSS_CHUNK_ROWS, vocab) block of logit gradients in the compute dtype and, in bf16, one
    bf16 (vocab, n_embd) product. Gradients are counted in full besides (estimate_memory): a
    margin, as at this peak only the head's exists (bench/memory.py measures it against real
    steps: BENCHMARKS.md).
    """
    u = batch_size * cfg.block_size * cfg.n_embd
    h = cfg.hidden_size / cfg.n_embd
    g = cfg.kv_heads / cfg.n_head
    rows = min(LOSS_CHUNK_ROWS, batch_size * cfg.block_size)
    mask = u if cfg.dropout > 0 else 0
    narrow = (3 + h + (3 * h if cfg.mlp == "swiglu" else h) + ((1 + g) if cfg.qk_norm else 0)) * u
    attention = (2 + 2 * g) * u
    if precision == "fp32":
        block = (2 * u + narrow + attention) * 4 + 2 * mask
        head = rows * cfg.vocab_size * 4
    else:
        block = 2 * u * 4 + narrow * 2 + attention * 4 + 2 * mask
        head = rows * cfg.vocab_size * 2 + 2 * cfg.vocab_size * cfg.n_embd
    block = int(block)
    outside = mask + 3 * 4 * u
    if checkpointing:  # the recomputed block lives in backward, after the head's workspace is gone
        return cfg.n_layer * 4 * u + outside + max(block, head)
    return cfg.n_layer * block + outside + head


def estimate_memory(cfg: Any, batch_size: int, precision: str = "fp32", checkpointing: bool = False,
                    n_params: int | None = None, optimizer: str | None = None) -> MemoryEstimate:
    """Peak bytes of a training step: fp32 master weights and gradients, and the optimizer's
    state: AdamW's two moments, or with Muon one momentum for the blocks' matrices.

    optimizer: adamw or muon; default: the preset's "training" choice, else adamw.
    """
    n = count_params(cfg) if n_params is None else n_params
    optimizer = optimizer or getattr(cfg, "training", {}).get("optimizer", "adamw")
    weights = 4 * n + (2 * n if precision != "fp32" else 0)  # + the bf16 copies autocast and the head make
    gradients = 4 * n  # fp32; at the peak only the head's (the tied embedding's) exists: a margin
    muon = param_breakdown(cfg)["hidden_matrices"] if optimizer == "muon" else 0
    state = 8 * (n - muon) + 4 * muon
    acts = activation_bytes(cfg, batch_size, precision, checkpointing)
    return MemoryEstimate(weights, gradients, state, acts, weights + gradients + state + acts)


def max_batch_size(cfg: Any, memory: int, precision: str, checkpointing: bool = False,
                   optimizer: str | None = None) -> int:
    """The largest batch size whose estimate fits in `memory` bytes (0 if none does)."""
    n = count_params(cfg)
    fits = lambda b: estimate_memory(cfg, b, precision, checkpointing, n, optimizer).total <= memory  # noqa: E731
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


MAX_MEMORY = 1 << 60  # 1 EiB: more than any machine, and a size every estimate compares with exactly


def parse_memory(text: str) -> int:
    """'8GB', '16 GiB', '512MB' -> bytes (binary units: what tools report for RAM and VRAM)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    size = float(m.group(1)) * _UNITS.get(m.group(2).upper(), 0) if m else 0.0  # a 400-digit number: inf
    if not 1 <= size <= MAX_MEMORY:
        raise MyPTError(f"--memory {text[:40]!r}: expected a size such as 8GB, 16GiB or 512MB (at most 1 EiB)")
    return int(size)


def detect_memory(device: torch.device | None = None) -> tuple[int, str]:
    """The memory training would use and what it is: the GPU's (device's, else the first one's),
    else this machine's RAM, or the container's memory limit (cgroup) where that is lower."""
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device if device is not None else 0)
        return props.total_memory, f"GPU {props.name}"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = int(open("/sys/fs/cgroup/memory.max").read())
    except (OSError, ValueError):  # no cgroup v2 limit ("max") or not Linux
        return ram, "system RAM"
    return (limit, "the container's memory limit") if limit < ram else (ram, "system RAM")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
