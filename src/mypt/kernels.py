"""MyPT's own CPU kernels for batch-1 decoding: built, loaded and called here.

Decoding one sequence multiplies one row by every matrix, and torch's fp32 matrix-vector product
reads small matrices at about half the memory bandwidth (BENCHMARKS.md, Issue 23). csrc/decode.cpp
holds the products MyPT runs instead (AVX2 + FMA, OpenMP over output rows): fp32 (`fp32_linear`,
used by `DecodeLinear` and GPT.head_logits) and weight-only int8 (`int8_function`, used by
mypt.quant); and on top of them a whole decoding step of a few tokens through every block
(`decode_step_function`, used by mypt.decode_step). The file is compiled with the system's C++
compiler (g++ or $CXX) on first use into a cache folder (~/.cache/mypt/kernels, or
$MYPT_KERNEL_DIR), named by a hash of the source, compiler and flags, and called through ctypes.
Where it cannot be built (another CPU, no compiler), or for more than MAX_ROWS rows (a prompt, a
batch), torch does the product: `problem()` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_ROWS = 8  # more rows per call (prefill, batches): torch's GEMM does better
MIN_WEIGHTS = 1 << 17  # a smaller fp32 matrix: torch's call costs less than this one's (BENCHMARKS.md)
_SOURCE = Path(__file__).parent / "csrc" / "decode.cpp"
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def available() -> bool:
    """Whether the kernels run here (built now if they are not yet)."""
    return _loaded()[0] is not None


def problem() -> str | None:
    """Why the kernels are not available here (None: they are)."""
    return _loaded()[1]


def int8_function():  # -> the ctypes function mypt_int8_linear, or None
    lib = _loaded()[0]
    return None if lib is None else lib.mypt_int8_linear


def decode_step_function():  # -> the ctypes function mypt_decode_step (mypt.decode_step), or None
    lib = _loaded()[0]
    return None if lib is None else lib.mypt_decode_step


def greedy_rows(logits: torch.Tensor) -> tuple[list[int], list[bool]] | None:
    """(the first index of each row's largest value, whether the row is all finite) for fp32
    logits (n, vocab) on a CPU whose rows are contiguous (a slice of columns is fine), in one
    pass of MyPT's kernel; None where it does not run (the caller uses torch)."""
    lib = _loaded()[0]
    if lib is None or logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.stride(-1) != 1:
        return None
    n = logits.size(0)
    index, finite = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.uint8)
    lib.mypt_greedy_rows(logits.data_ptr(), n, logits.size(1), logits.stride(0), index.data_ptr(), finite.data_ptr())
    return index.tolist(), [bool(ok) for ok in finite.tolist()]


def attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: list[int],
                lengths: list[int]) -> torch.Tensor | None:
    """One query per row (a decoding step of several rows): q (n, n_head, 1, head_dim) fp32
    attending, row by row, to the first lengths[i] slots of row rows[i] of one layer's keys and
    values k, v (batch, n_kv_head, capacity, head_dim), contiguous fp32 on a CPU. Returns
    (n, n_head, 1, head_dim), or None where the kernels do not run (the caller attends itself)."""
    lib = _loaded()[0]
    if lib is None or torch.is_autocast_enabled("cpu") or q.dtype != torch.float32 or k.dtype != torch.float32:
        return None
    n, nh, _, hs = q.shape
    q = q.contiguous()
    out = torch.empty(q.shape, dtype=torch.float32)
    ints = torch.tensor(rows + lengths, dtype=torch.long)
    lib.mypt_attend_rows(q.data_ptr(), k.data_ptr(), v.data_ptr(), ints.data_ptr(), ints.data_ptr() + 8 * n,
                         out.data_ptr(), n, nh, k.size(1), k.size(2), hs, k[0].numel(), torch.get_num_threads())
    return out


def fp32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x @ weight.T by MyPT's kernel where it applies: a CPU, fp32 x (..., K) of at most MAX_ROWS
    rows outside autocast, a contiguous fp32 weight (N, K) of at least MIN_WEIGHTS values, the
    kernels available. Else None (the caller does the product)."""
    rows = x.numel() // x.size(-1) if x.dim() else 0
    if (not 0 < rows <= MAX_ROWS or weight.numel() < MIN_WEIGHTS or x.dtype != torch.float32
            or weight.dtype != torch.float32
            or x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or not weight.is_contiguous()):
        return None
    lib = _loaded()[0]
    if lib is None:
        return None
    xf = x if x.is_contiguous() else x.contiguous()
    out = torch.empty(*x.shape[:-1], weight.size(0))
    lib.mypt_fp32_linear(xf.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, weight.size(0), weight.size(1),
                         torch.get_num_threads())
    return out


class DecodeLinear(nn.Linear):
    """nn.Linear whose products of a few rows (decoding) run in MyPT's fp32 kernel; the same
    parameters, and torch's product for anything else (a prompt, autocast, training)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or (torch.is_grad_enabled() and self.weight.requires_grad):  # autograd: torch's
            return F.linear(x, self.weight, self.bias)
        y = fp32_linear(x, self.weight)
        if y is None:
            return F.linear(x, self.weight, self.bias)
        return y if self.bias is None else y.add_(self.bias)


def _platform_problem() -> str | None:
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"they need an x86-64 CPU with AVX2, this is {platform.machine()}"
    if capability not in ("AVX2", "AVX512"):
        return f"they need AVX2, this CPU offers {capability}"
    if shutil.which(_compiler()) is None:
        return f"no C++ compiler: {_compiler()} was not found (install g++ or set $CXX)"
    return None


@functools.cache
def _loaded() -> tuple[ctypes.CDLL | None, str | None]:
    """(the library with its functions typed, None), or (None, why it is not available)."""
    problem = _platform_problem()
    if problem is not None:
        return None, problem
    try:
        lib = ctypes.CDLL(str(_build()))
    except subprocess.CalledProcessError as e:
        lines = (e.stderr or "").strip().splitlines()
        return None, f"compiling {_SOURCE.name} failed: {lines[-1][:200] if lines else e}"
    except OSError as e:
        return None, f"{_SOURCE.name} could not be built or loaded: {e}"
    lib.mypt_int8_linear.restype = None
    lib.mypt_int8_linear.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.mypt_fp32_linear.restype = None
    lib.mypt_fp32_linear.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.mypt_greedy_rows.restype = None
    lib.mypt_greedy_rows.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2
    lib.mypt_attend_rows.restype = None
    lib.mypt_attend_rows.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [ctypes.c_int]
    lib.mypt_decode_step.restype = None
    lib.mypt_decode_step.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_int64] + [ctypes.c_void_p] * 3
                                     + [ctypes.c_int64] * 2 + [ctypes.c_void_p, ctypes.c_int])
    return lib, None


def _compiler() -> str:
    return os.environ.get("CXX") or "g++"


def kernel_dir() -> Path:
    if os.environ.get("MYPT_KERNEL_DIR"):
        return Path(os.environ["MYPT_KERNEL_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mypt" / "kernels"


def _build() -> Path:
    """The compiled kernels, built once per source, compiler and flags (named by their hash)."""
    cxx = _compiler()
    source = _SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join([cxx, *_FLAGS]).encode()).hexdigest()[:16]
    out = kernel_dir() / f"decode-{tag}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # built aside, renamed into place whole
        built = Path(tmp) / out.name
        subprocess.run([cxx, *_FLAGS, str(_SOURCE), "-o", str(built)], check=True, capture_output=True, text=True)
        os.replace(built, out)
    return out
