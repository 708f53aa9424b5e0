"""Weight-only int8 quantisation of a loaded model, applied from outside it (model.py knows nothing of it).

`quantize(model, "int8")` replaces every nn.Linear of the blocks, and the output layer, with an
Int8Linear: int8 weights with one fp32 scale per output row (symmetric, the row's largest
magnitude maps to 127). The token and position embeddings stay fp32: decoding reads one row of
them per token. A tied output layer gets an int8 copy of its own (the embedding keeps the fp32
matrix), since the output layer is read whole for every token: with GPT-2's 50k vocabulary it is a
quarter of a 150M model's bytes.

The matrix-vector products of batch-1 decoding run in MyPT's own kernel (mypt.kernels,
csrc/decode.cpp: AVX2 + FMA, OpenMP over output rows): each row of activations is quantised to
int8 in blocks of 32 (as llama.cpp's q8_0) and multiplied by int8 dot products. Many rows at
once (a prompt's prefill, evaluation) and a CPU or platform where the kernel cannot be built
take the plain path instead: the weights
are dequantised to the activations' dtype per call and multiplied by torch, which is slower than
fp32 (said once on stderr). Only CPUs are supported: the point is memory bandwidth on a CPU.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from mypt import kernels
from mypt.errors import MyPTError

KINDS = ("int8",)
QBLOCK = 32  # activations are quantised in blocks of this many values (as in csrc/decode.cpp)


def check_kind(kind: str | None, device: torch.device, what: str = "--quantize") -> None:
    """Refuse a quantisation MyPT does not have, or a device it does not run on (one MyPTError)."""
    if kind is None:
        return
    if kind not in KINDS:
        raise MyPTError(f"{what} {kind!r} is not one of {', '.join(KINDS)}; leave it out for fp32 weights")
    if device.type != "cpu":
        raise MyPTError(f"{what} {kind} runs on CPUs only (a CPU kernel for memory-bound decoding), not on "
                        f"{device}; pass --device cpu, or leave {what} out")


class Int8Linear(nn.Module):
    """A linear layer y = x W^T + b with W stored as int8 rows times fp32 scales (weight-only)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,) fp32
        self.register_buffer("bias", bias)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,): each row's largest magnitude -> 127
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        return cls(q, scale.contiguous(), None if bias is None else bias.detach().float().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (out, in) fp32, built per access: for code that needs the matrix
        (the loss over a whole output layer), never on the decoding path."""
        return self.qweight.float() * self.scale[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        kernel = kernels.int8_function() if x.device.type == "cpu" and rows <= kernels.MAX_ROWS else None
        if kernel is None:
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        # as few tensor calls as may be: at batch 1 a call's overhead is a share of its time
        K, N = self.in_features, self.out_features
        xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
        out = torch.empty(*x.shape[:-1], N)
        at = -(-rows * K // 16) * 16  # the activations' int8 copy, then their fp32 block scales, aligned
        scratch = torch.empty(at + 4 * rows * -(-K // QBLOCK), dtype=torch.int8)
        kernel(xf.data_ptr(), self.qweight.data_ptr(), self.scale.data_ptr(), out.data_ptr(), scratch.data_ptr(),
               scratch.data_ptr() + at, rows, N, K, torch.get_num_threads())
        if self.bias is not None:
            out += self.bias
        return out if x.dtype == torch.float32 else out.to(x.dtype)


def quantize(model: nn.Module, kind: str = "int8") -> nn.Module:
    """Replace model's blocks' nn.Linear layers and its output layer (model.lm_head) by Int8Linear, in place.

    The model must be on a CPU (check_kind). Returns model.
    """
    check_kind(kind, next(model.parameters()).device, "quantize")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear.from_weight(child.weight, child.bias))
    if not kernels.available():
        _note_fallback()
    return model


@functools.cache
def _note_fallback() -> None:
    print(f"note: MyPT's int8 kernel is not available here ({kernels.problem()}); int8 layers dequantise their "
          "weights per call, which is slower than fp32", file=sys.stderr, flush=True)
