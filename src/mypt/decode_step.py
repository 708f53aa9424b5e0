"""Decoding a few tokens as one call: new tokens of one or a few rows through every block in MyPT's kernel.

Eager PyTorch runs a decoding step as about 20 operator calls a block, whose fixed cost at batch 1
is as large as reading a small model's weights (BENCHMARKS.md, Issue 23). `GPT.new_cache` asks
`plan(model, cache)` for a `DecodeStep` when the model is laid out for decoding on a CPU
(mypt.ops.lay_out_for_decoding's DecodeLinear layers, or mypt.quant's Int8Linear) and the cache
is fp32; `GPT.next_hidden` then feeds up to MAX_TOKENS new tokens in all (one token of each of a
few rows, a token with its drafted successors from mypt.lookup, a short prompt) through
`DecodeStep.run`, a single call of csrc/decode.cpp's mypt_decode_step: the same arithmetic as
mypt.model, in fp32, writing the same cache, each weight row read once for all the tokens.
Anything else takes the eager path: more tokens (a prompt, a large batch), autocast, a layer of
another kind (LoRA), a model with forward hooks (which run only where its modules do).
`MYPT_DECODE_STEP=0` in the environment turns the fused step off (to compare against it, or to
rule it out).
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import torch
import torch.nn as nn

from mypt import kernels
from mypt.kvcache import KVCache
from mypt.quant import QBLOCK, Int8Linear

MLP_KINDS = {"gelu": 0, "relu2": 1, "swiglu": 2}
MAX_TOKENS = 2 * kernels.MAX_ROWS  # new tokens a call takes (more: torch's matrix products do better)


class _Linear(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("int8", ctypes.c_int32)]


class _Norm(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("b", ctypes.c_void_p), ("eps", ctypes.c_float), ("rms", ctypes.c_int32)]


class _Layer(ctypes.Structure):
    _fields_ = ([(name, _Norm) for name in ("ln_1", "q_norm", "k_norm", "ln_2")]
                + [(name, _Linear) for name in ("attn", "attn_proj", "fc", "mlp_proj")])


class _Model(ctypes.Structure):
    _fields_ = ([(name, ctypes.c_int64) for name in ("n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "hidden",
                                                     "capacity")]
                + [("mlp", ctypes.c_int32), ("wte", ctypes.c_void_p), ("wpe", ctypes.c_void_p),
                   ("layers", ctypes.POINTER(_Layer)), ("ln_f", _Norm), ("scratch", ctypes.c_void_p),
                   ("qscratch", ctypes.c_void_p)])


def _fp32(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())


def _linear(layer: nn.Module) -> _Linear | None:
    if type(layer) is kernels.DecodeLinear and _fp32(layer.weight) and _fp32(layer.bias):
        return _Linear(layer.weight.data_ptr(), None, _ptr(layer.bias), *layer.weight.shape, 0)
    if type(layer) is Int8Linear and layer.qweight.is_contiguous() and _fp32(layer.bias):
        return _Linear(layer.qweight.data_ptr(), layer.scale.data_ptr(), _ptr(layer.bias), *layer.qweight.shape, 1)
    return None


def _norm(norm: nn.Module | None) -> _Norm | None:
    if norm is None:
        return _Norm(None, None, 0.0, 0)
    if type(norm) is nn.LayerNorm and norm.weight is not None and _fp32(norm.weight) and _fp32(norm.bias):
        return _Norm(norm.weight.data_ptr(), _ptr(norm.bias), norm.eps, 0)
    if isinstance(norm, nn.RMSNorm) and norm.weight is not None and norm.eps is not None and _fp32(norm.weight):
        return _Norm(norm.weight.data_ptr(), None, norm.eps, 1)
    return None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class DecodeStep:
    """One model's fused decoding step for the caches of one shape (built by `plan`; the cache
    keeps it, and it does not keep the cache).

    The structs hold raw pointers into the model's tensors: each call first checks that the
    modules still hold those tensors (a parameter assigned anew, `load_state_dict(assign=True)`,
    turns the step off for good; the eager path then reads the new weights) and that no forward
    hook is registered (hooks run only where the modules do).
    """

    def __init__(self, model: Any, cache: KVCache, layers: list[_Layer], ln_f: _Norm, used: list[nn.Module]) -> None:
        cfg = model.config
        self.model = model
        self.rope = cfg.position == "rope"
        self.vocab, self.n_embd, self.shape = cfg.vocab_size, cfg.n_embd, cache.k.shape
        S, nh, hs = cache.capacity, cfg.n_head, cfg.head_dim
        fc_rows = model.transformer.h[0].mlp.c_fc.out_features
        qkv, T = (nh + 2 * cfg.kv_heads) * hs, MAX_TOKENS
        self.scratch = torch.empty(T * (2 * cfg.n_embd + qkv + nh * hs + fc_rows) + nh * S, dtype=torch.float32)
        widest = max(cfg.n_embd, nh * hs, cfg.hidden_size)
        self.qscratch = torch.empty(-(-T * widest // 16) * 16 + 4 * T * (-(-widest // QBLOCK)), dtype=torch.int8)
        self.layers = (_Layer * len(layers))(*layers)
        wpe = model.transformer.wpe.weight if cfg.position == "learned" else None
        self.struct = _Model(cfg.n_layer, cfg.n_embd, nh, cfg.kv_heads, hs, cfg.hidden_size, S, MLP_KINDS[cfg.mlp],
                             model.transformer.wte.weight.data_ptr(), _ptr(wpe), self.layers, ln_f,
                             self.scratch.data_ptr(), self.qscratch.data_ptr())
        self.row_stride, self.layer_stride = cache.k[0, 0].numel(), cache.k[0].numel()  # in values
        self.modules = list(model.modules())
        # where each tensor the structs point into is held (a module's dict, its name), and the pointers
        self.held = [(d, name) for m in used for d in (m._parameters, m._buffers) for name, t in d.items()
                     if t is not None]
        self.pointers = self.current_pointers()
        self.stale = False

    def current_pointers(self) -> list[int]:
        return [d[name].data_ptr() if d.get(name) is not None else 0 for d, name in self.held]

    def usable(self) -> bool:
        """Whether the modules still hold the tensors the structs point into (else never again),
        and no forward hook is registered (on the model's modules, or on every module)."""
        if not self.stale and self.current_pointers() != self.pointers:
            self.stale = True
        hooks = nn.modules.module
        return not (self.stale or hooks._global_forward_hooks or hooks._global_forward_pre_hooks
                    or any([m._forward_hooks or m._forward_pre_hooks for m in self.modules]))

    def run(self, idx: torch.Tensor, cache: KVCache, rows: torch.Tensor | None, last: int = 0) -> torch.Tensor | None:
        """GPT.next_hidden where it fits: feed idx (n, T) to the rows `rows` of cache (every row, in
        order, if None; a cache of the shape this step was planned for), n * T at most MAX_TOKENS
        (a decoding step of a few rows, a token with its drafts, a short prompt), and advance them;
        the final hidden states after each row's last token (n, n_embd), or after each of its last
        `last` tokens (n, last, n_embd). None where the eager path must run instead (it also says
        what is wrong with a bad argument)."""
        if cache.k.shape != self.shape or not cache.k.is_contiguous():
            raise ValueError("a DecodeStep runs on caches of the shape it was planned for")
        outside = cache.k.is_inference() and not torch.is_inference_mode_enabled()  # eager refuses to write it
        if (idx.dim() != 2 or idx.dtype != torch.long or not 0 < idx.numel() <= MAX_TOKENS
                or torch.is_autocast_enabled("cpu") or outside or not self.usable()):
            return None
        n, T = idx.shape
        if rows is None:
            if n != cache.batch:
                return None
            row_list = list(range(n))
        elif not isinstance(rows, torch.Tensor) or rows.dtype != torch.long or rows.shape != (n,):
            return None
        else:
            row_list = rows.tolist()
        # plain ints from here (a few values: tensor operations would cost more than the arithmetic)
        pos, tokens = cache.pos.tolist(), idx.tolist()
        if not all(0 <= r < cache.batch for r in row_list) or T > cache.capacity:
            return None
        if not cache.ring and max(pos[r] for r in row_list) + T > cache.capacity:
            return None
        if not all(0 <= t < self.vocab for row in tokens for t in row):
            return None
        positions = [pos[r] + t for r in row_list for t in range(T)]  # each row's tokens in order, row after row
        M = n * T
        ints = torch.tensor([t for row in tokens for t in row] + positions + [r for r in row_list for _ in range(T)])
        rot = self.model.rope(ints[M:2 * M], max(positions) + 1) if self.rope else None  # (M, 1, head_dim / 2)
        out = torch.empty(n, T, self.n_embd, dtype=torch.float32)
        at = ints.data_ptr()
        kernels.decode_step_function()(
            ctypes.addressof(self.struct), at, at + 8 * M, at + 16 * M, M, _ptr(rot), cache.k.data_ptr(),
            cache.v.data_ptr(), self.row_stride, self.layer_stride, out.data_ptr(), torch.get_num_threads())
        cache.pos[row_list] += T
        return out[:, -last:] if last else out[:, -1]


def plan(model: Any, cache: KVCache) -> DecodeStep | None:
    """A DecodeStep for model (a GPT) and cache, or None where the fused step does not apply."""
    cfg = model.config
    if (os.environ.get("MYPT_DECODE_STEP") == "0" or model.training or cache.k.dtype != torch.float32
            or cache.k.device.type != "cpu" or cfg.mlp not in MLP_KINDS or kernels.decode_step_function() is None):
        return None
    wte, wpe = model.transformer.wte, model.transformer.wpe if cfg.position == "learned" else None
    if any(e is not None and (type(e) is not nn.Embedding or not _fp32(e.weight)) for e in (wte, wpe)):
        return None
    layers, used = [], [wte] + ([wpe] if wpe is not None else [])
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        modules = [block.ln_1, attn.q_norm, attn.k_norm, block.ln_2, attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj]
        parts = [_norm(m) for m in modules[:4]] + [_linear(m) for m in modules[4:]]
        if any(part is None for part in parts):
            return None
        layers.append(_Layer(*parts))
        used += [m for m in modules if m is not None]
    ln_f = _norm(model.transformer.ln_f)
    if ln_f is None:
        return None
    return DecodeStep(model, cache, layers, ln_f, used + [model.transformer.ln_f])
