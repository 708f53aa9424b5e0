"""GPT-2 in transformers' layout: its name map, shape rule and config.json schema, both ways.

transformers' GPT-2 keeps its linear weights as Conv1D, (in, out), the transpose of
nn.Linear; biases MyPT leaves out are stored as zeros.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from mypt.build import tensor_problems
from mypt.config import ModelConfig, shown
from mypt.formats.hf_config import hf_value, model_config
from mypt.tokenizers import Tokenizer

HF_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
LAYER_NORM_EPS = 1e-5  # torch's LayerNorm default, which MyPT uses
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # transformers' names for MyPT's tanh GELU
# Linear layers that transformers' GPT-2 stores as Conv1D, i.e. with the weight transposed.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers older transformers versions saved with the weights: not parameters.
HF_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
TIED_HEAD = "lm_head.weight"
EMBEDDING = "transformer.wte.weight"


def export_problems(cfg: ModelConfig) -> list[str]:
    """What keeps the config from GPT2LMHeadModel, each naming its field (empty: nothing)."""
    return cfg.mismatches({"position": "learned", "norm": "layernorm", "mlp": "gelu", "qk_norm": False,
                           "tie_embeddings": True, "norm_eps": LAYER_NORM_EPS, "hidden_size": 4 * cfg.n_embd,
                           "kv_heads": cfg.n_head, "head_dim": cfg.n_embd // cfg.n_head}, "GPT-2")


def hub_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors named as GPT2LMHeadModel names them (the original upload leaves out 'transformer.')."""
    prefix = "transformer."
    return {(k if k.startswith(prefix) or k == TIED_HEAD else prefix + k): v for k, v in tensors.items()}


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of transformers' GPT2LMHeadModel (the tied lm_head aside) and its shape."""
    c = cfg.n_embd
    shapes: dict[str, tuple[int, ...]] = {
        EMBEDDING: (cfg.vocab_size, c),
        "transformer.wpe.weight": (cfg.block_size, c),
    }
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        shapes |= {
            p + "ln_1.weight": (c,), p + "ln_1.bias": (c,),
            p + "attn.c_attn.weight": (c, 3 * c), p + "attn.c_attn.bias": (3 * c,),
            p + "attn.c_proj.weight": (c, c), p + "attn.c_proj.bias": (c,),
            p + "ln_2.weight": (c,), p + "ln_2.bias": (c,),
            p + "mlp.c_fc.weight": (c, 4 * c), p + "mlp.c_fc.bias": (4 * c,),
            p + "mlp.c_proj.weight": (4 * c, c), p + "mlp.c_proj.bias": (c,),
        }
    shapes |= {"transformer.ln_f.weight": (c,), "transformer.ln_f.bias": (c,)}
    return shapes


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """MyPT's state dict in GPT-2's layout: Conv1D weights transposed, absent biases as zeros."""
    dtype = state[EMBEDDING].dtype
    out = {}
    for name, shape in hf_shapes(cfg).items():
        tensor = state.get(name)
        if tensor is None:
            assert name.endswith(".bias") and not cfg.bias, f"{name} missing from the model"
            tensor = torch.zeros(shape, dtype=dtype)
        elif name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def from_hf_state(hf: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                  bias: bool) -> dict[str, torch.Tensor]:
    """GPT-2 tensors (checked against shapes) as MyPT's fp32 state dict, the head tied."""
    state = {}
    for name in shapes:
        if name.endswith(".bias") and not bias:
            continue
        tensor = hf[name].to(torch.float32)
        state[name] = (tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor).contiguous()
    state[TIED_HEAD] = state[EMBEDDING]
    return state


def hf_config(cfg: ModelConfig, tok: Tokenizer) -> dict[str, Any]:
    """config.json in transformers' GPT-2 schema for a MyPT model."""
    special = tok.eot_id
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,  # older transformers' name, which llama.cpp's convert_hf_to_gguf.py reads
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": special,
        "eos_token_id": special,
    }


def architecture_problems(hf: dict[str, Any]) -> list[str]:
    """What keeps a transformers config from being MyPT's architecture (empty: nothing)."""
    problems = []
    archs = hf.get("architectures") or ["GPT2LMHeadModel"]
    if not isinstance(archs, list) or not set(a for a in archs if isinstance(a, str)) & set(HF_ARCHITECTURES):
        problems.append(f"architectures {shown(archs)} has no GPT-2 language model "
                        f"({' or '.join(HF_ARCHITECTURES)})")
    act = hf_value(hf, "activation_function", "gelu_new")
    if act not in TANH_GELUS:
        problems.append(f"activation_function is {act!r}; MyPT uses the tanh GELU ('gelu_new')")
    n_embd = hf_value(hf, "n_embd", 768)
    n_inner = hf_value(hf, "n_inner", 4 * n_embd) if isinstance(n_embd, int) else None
    if n_inner is not None and n_inner != 4 * n_embd:  # (a bad n_embd is named by import_config)
        problems.append(f"n_inner is {n_inner}; MyPT's MLP is 4 * n_embd = {4 * n_embd} wide")
    eps = hf_value(hf, "layer_norm_epsilon", LAYER_NORM_EPS)
    if not _number_in(eps, 0, 1) or not math.isclose(eps, LAYER_NORM_EPS, rel_tol=1e-6):
        problems.append(f"layer_norm_epsilon is {shown(eps)}; MyPT's LayerNorm uses {LAYER_NORM_EPS}")
    for key in ("resid_pdrop", "attn_pdrop"):
        value = hf_value(hf, key, 0.0)
        if not _number_in(value, 0, 1):
            problems.append(f"{key} is {shown(value)}; expected a probability from 0 to 1")
    checks = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
              "add_cross_attention": False, "tie_word_embeddings": True}
    for key, want in checks.items():
        if hf_value(hf, key, want) != want:
            problems.append(f"{key} is {hf[key]}; MyPT needs {str(want).lower()}")
    return problems


def _number_in(value: Any, low: float, high: float) -> bool:
    """A JSON number from low to high (not true/false, NaN, inf or a 400-digit integer)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def weight_problems(hf: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    problems = tensor_problems(hf, shapes, lambda name: name == TIED_HEAD or name.endswith(HF_MASK_BUFFERS))
    head = hf.get(TIED_HEAD)
    if head is not None and EMBEDDING in hf and not torch.equal(head, hf[EMBEDDING]):
        problems.append("lm_head.weight differs from the token embedding; MyPT ties the two")
    return problems


CONFIG_KEYS = {"block_size": "n_positions", "dropout": "resid_pdrop"}  # the rest have MyPT's names


def import_config(hf: dict[str, Any], hf_dir: Path, source: str) -> ModelConfig:
    """MyPT's config for the folder (bias is decided later, from the weights)."""
    dropout = hf_value(hf, "resid_pdrop", 0.1)
    return model_config({
        "name": f"{hf_dir.name} (imported)",
        "description": f"imported from the transformers folder {hf_dir}",
        "n_layer": hf_value(hf, "n_layer", 12), "n_head": hf_value(hf, "n_head", 12),
        "n_embd": hf_value(hf, "n_embd", 768), "block_size": hf_value(hf, "n_positions", 1024),
        "vocab_size": hf_value(hf, "vocab_size", 50257), "dropout": dropout, "bias": False,
        "batch_size": ModelConfig.batch_size,
    }, CONFIG_KEYS, source)


PEFT_FAN_IN_FAN_OUT = True  # GPT-2's layers are Conv1D: weights stored (in, out)


def lora_to_hf(layer: str, a: torch.Tensor, b: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor,
                                                                                              torch.Tensor]]:
    """One adapted layer's LoRA matrices as GPT2LMHeadModel's: the same names and shapes (PEFT keeps
    A as (rank, in) and B as (out, rank) for a Conv1D layer too)."""
    return [(layer, a, b)]
