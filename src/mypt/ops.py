"""Kernels the model calls: faster or leaner ways to compute what torch already defines.

Imports torch only. Each function computes a standard operation (RMSNorm, squared ReLU,
attention, cross-entropy of a linear layer) and differs from torch's own only in speed or memory,
mostly on a CPU (measured in BENCHMARKS.md); `mypt.model` says which operation the architecture
uses, this module how it runs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

LOSS_CHUNK_ROWS = 1024  # rows of the (B*T, vocab) logits, turned into their gradients, held at a time
IGNORE_INDEX = -1  # a target that is not trained on (fine-tuning masks all but the assistant's tokens)


# ---------------------------------------------------------------------------------------------
# RMSNorm and squared ReLU


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x's last dimension with a gain, in x's dtype (through _CPURMSNorm on a CPU)."""
    if x.device.type == "cpu":
        return _CPURMSNorm.apply(x, weight, eps)
    return F.rms_norm(x, tuple(weight.shape), weight.to(x.dtype), eps)


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


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 (without autograd's Function machinery where nothing needs a gradient: a
    decoding step calls this once a block)."""
    if x.requires_grad and torch.is_grad_enabled():
        return _SquaredReLU.apply(x)
    return torch.relu(x).square_()


# ---------------------------------------------------------------------------------------------
# Attention


def attends_in_fp32(x: torch.Tensor, cached: bool) -> bool:
    """Whether attention over x's queries runs in fp32, outside autocast: on a CPU without a KV
    cache (training, evaluation), where the flash-attention backward is slower in bf16 than in
    fp32 (BENCHMARKS.md). Decoding with a cache attends in the cache's dtype."""
    return not cached and x.device.type == "cpu"


# SDPA's backends for a KV cache's steps, whose key length changes with every step: not cuDNN's,
# which builds a plan for each new shape (under bf16 on an H200, 2.9 ms of CPU per call against
# the whole 16-layer step's 9 ms of GPU work: decoding ran 9x slower than fp32; BENCHMARKS.md).
SHAPES_VARY_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
              fp32: bool, shapes_vary: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention of q (B, nh, T, hs) over k, v (B, nkv, S, hs), nkv dividing nh;
    with fp32, in fp32 outside autocast (which would cast the inputs back down). shapes_vary: the
    call is one of many of changing shapes (decoding), for which CUDA uses SHAPES_VARY_BACKENDS."""
    gqa = k.size(1) != q.size(1)
    if fp32:
        with torch.autocast(q.device.type, enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                  is_causal=causal, enable_gqa=gqa)
    if shapes_vary and q.is_cuda:
        with sdpa_kernel(SHAPES_VARY_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


# ---------------------------------------------------------------------------------------------
# The loss head: cross-entropy of a linear layer without its logits


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def row_max(t: torch.Tensor) -> torch.Tensor:
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
    backward only scales them, in place. A weight that needs no gradient (a frozen output layer,
    as under LoRA) gets none: its (vocab, n_embd) product, as costly as the logits, is skipped.
    Memory: one (chunk, vocab) block, allocated once, in which each chunk of rows turns from
    logits into probabilities into gradients in place.
    The loss comes from a softmax (one exp per logit, not log_softmax and exp, two).

    rows, delta: an update to some of the weight's rows (LoRA's trained chat rows): the loss is
    that of weight with delta (k, C) added at the row ids `rows` (k,), and delta's gradient is
    made from those k columns only, so a frozen weight still costs no (vocab, n_embd) product.

    Targets below 0 (IGNORE_INDEX) are ignored: the mean is over the others, and an ignored
    row adds nothing to either gradient (its input row is zeroed before the weight gradient,
    its gradient row after: O(n_embd) per row, not O(vocab), and no device sync).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype,
                rows: torch.Tensor | None, delta: torch.Tensor | None) -> torch.Tensor:
        n, vocab = x.size(0), weight.size(0)
        w = _with_rows(weight.to(dtype), rows, delta)
        grad_x = torch.empty_like(x)
        acc = torch.promote_types(dtype, torch.float32)  # softmax and sums: fp32 at least
        grad_w = None
        grad_delta = None if delta is None else torch.zeros(delta.shape, dtype=acc, device=x.device)
        total = torch.zeros((), dtype=acc, device=x.device)
        grad = torch.empty(min(n, LOSS_CHUNK_ROWS), vocab, dtype=dtype, device=x.device)
        kept = targets >= 0
        with torch.autocast(x.device.type, enabled=False):
            for start in range(0, n, LOSS_CHUNK_ROWS):
                keep = kept[start:start + LOSS_CHUNK_ROWS, None]
                xc = x[start:start + LOSS_CHUNK_ROWS].to(dtype) * keep  # an ignored row: no weight gradient
                tc = targets[start:start + LOSS_CHUNK_ROWS].clamp(min=0)
                logits = torch.mm(xc, w.T, out=grad[:xc.size(0)])  # (chunk, vocab)
                target_logit = logits.gather(1, tc[:, None]).squeeze(1).to(acc)
                max_logit = row_max(logits).to(acc)
                # in place (softmax reads each row before it writes it); it accumulates in fp32 even
                # for bf16 logits
                probs = torch.softmax(logits, dim=1, out=logits)
                # log-sum-exp from the largest probability, which never underflows (in bf16 it
                # carries bf16's 0.4% rounding, i.e. 0.002 nats per row, as the logits do)
                target_logp = target_logit - max_logit + row_max(probs).to(acc).log()
                total -= (target_logp * keep[:, 0]).sum()
                # d(loss_sum)/d(logits) = softmax - one_hot(target); at the target expm1(logp) is
                # p - 1 without cancellation
                probs[torch.arange(tc.numel(), device=x.device), tc] = torch.expm1(target_logp).to(dtype)
                grad_x[start:start + LOSS_CHUNK_ROWS] = probs @ w
                grad_x[start:start + LOSS_CHUNK_ROWS] *= keep  # an ignored row: no input gradient
                if grad_delta is not None:
                    grad_delta.addmm_(probs[:, rows].T.to(acc), xc.to(acc))
                if not ctx.needs_input_grad[1]:  # a frozen output layer (LoRA): no weight gradient to make
                    continue
                if grad_w is None:
                    grad_w = (probs.T @ xc).to(acc)
                elif dtype == acc:
                    grad_w.addmm_(probs.T, xc)
                else:  # in row blocks: adding bf16 to fp32 makes an fp32 copy of what is added
                    for total_rows, part in zip(grad_w.split(4096), (probs.T @ xc).split(4096), strict=True):
                        total_rows += part
        count = kept.sum().clamp(min=1)  # a tensor: no device sync
        ctx.save_for_backward(grad_x, grad_w if grad_w is not None else count, count,
                              grad_delta if grad_delta is not None else count)
        ctx.weight_dtype = weight.dtype
        ctx.delta_dtype = None if delta is None else delta.dtype
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x, grad_w, count, grad_delta = ctx.saved_tensors
        scale = grad_out / count
        # in place: no second (vocab, n_embd) buffer while every activation is still alive; a
        # second backward through the same graph fails with autograd's in-place error
        grad_w = grad_w.mul_(scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        grad_delta = grad_delta.mul_(scale).to(ctx.delta_dtype) if ctx.needs_input_grad[5] else None
        return grad_x.mul_(scale), grad_w, None, None, None, grad_delta


def _with_rows(weight: torch.Tensor, rows: torch.Tensor | None, delta: torch.Tensor | None) -> torch.Tensor:
    """weight with delta added at the row ids `rows` (a new tensor), or weight itself without them."""
    if delta is None:
        return weight
    return weight.index_add(0, rows, delta.detach().to(weight.dtype))


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         rows: torch.Tensor | None = None, delta: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits x @ weight.T (x: (N, C), weight: (V, C), targets: (N,)),
    over the targets that are not IGNORE_INDEX (any negative target is ignored); with rows and
    delta, of weight with delta (k, C) added at the row ids rows (k,)."""
    dtype = _compute_dtype(x)
    trained = x.requires_grad or weight.requires_grad or (delta is not None and delta.requires_grad)
    if torch.is_grad_enabled() and trained:
        return _FusedLinearCrossEntropy.apply(x, weight, targets, dtype, rows, delta)
    acc = torch.promote_types(dtype, torch.float32)
    total = torch.zeros((), dtype=acc, device=x.device)
    w = _with_rows(weight.to(dtype), rows, delta)
    targets = targets.where(targets >= 0, IGNORE_INDEX)
    for start in range(0, x.size(0), LOSS_CHUNK_ROWS):
        logits = (x[start:start + LOSS_CHUNK_ROWS].to(dtype) @ w.T).to(acc)
        total += F.cross_entropy(logits, targets[start:start + LOSS_CHUNK_ROWS], reduction="sum",
                                 ignore_index=IGNORE_INDEX)
    return total / (targets >= 0).sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------
# Inference layout


def lay_out_for_decoding(model: torch.nn.Module) -> torch.nn.Module:
    """Ready every plain linear layer of the blocks for decoding on a CPU, in place; returns model.

    Decoding multiplies one row by each matrix, and torch's fp32 matrix-vector product reads a
    row-major weight at about half the memory bandwidth (BENCHMARKS.md, Issue 23). Where MyPT's
    kernels run (mypt.kernels), each such layer becomes a DecodeLinear: the same parameters,
    row-major, whose products of a few rows run in MyPT's kernel (near the whole bandwidth).
    Elsewhere the weight is stored column-major (its transpose contiguous, the same matrix),
    which BLAS multiplies by one row without transposing, faster than row-major. A prompt's many
    rows run as fast as before either way. For inference only: a model that trains keeps its
    plain layers (the optimizer's state has their layout). The embedding stays as it is (read by
    rows); the output layer becomes a DecodeLinear too where the kernels run, else stays
    row-major (decoding then reads it through its own transposed copy, GPT.new_cache).
    """
    from mypt.kernels import DecodeLinear, available

    fast = available()
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear or module.weight.device.type != "cpu":
            continue
        block = ".h." in f".{name}"
        if fast and (block or name == "lm_head"):
            module.__class__ = DecodeLinear
        elif block:
            module.weight.data = module.weight.data.t().contiguous().t()
    return model
