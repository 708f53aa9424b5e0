"""Llama and Qwen3 in transformers' layout: their name map, shape rule and config.json schema.

A MyPT model with rotary positions, RMSNorm and a SwiGLU MLP computes what transformers'
LlamaForCausalLM computes; with QK-norm, what Qwen3ForCausalLM computes. The name map splits
MyPT's fused matrices (c_attn into q, k, v; an swiglu c_fc into gate and up). The shape rule
of the rotation: MyPT rotates the pairs (2j, 2j + 1) of each head, transformers the pairs
(j, j + hs/2), so each head's query and key rows (and QK-norm gains) are permuted on the way
out and back on the way in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mypt.build import tensor_problems
from mypt.config import ROPE_SCALING_KEYS, ModelConfig
from mypt.formats.hf_config import hf_value, model_config
from mypt.tokenizers import Tokenizer

MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
EMBEDDING, HEAD = "model.embed_tokens.weight", "lm_head.weight"
# MyPT name (after transformer.h.{i}.) -> transformers name (after model.layers.{i}.)
LAYER_NAMES = {
    "ln_1.weight": "input_layernorm.weight", "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight", "attn.c_proj.bias": "self_attn.o_proj.bias",
    "attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight", "mlp.c_proj.bias": "mlp.down_proj.bias",
}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
PEFT_FAN_IN_FAN_OUT = False
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


def model_type(cfg: ModelConfig) -> str:
    return "qwen3" if cfg.qk_norm else "llama"


def export_problems(cfg: ModelConfig) -> list[str]:
    """What keeps the config from LlamaForCausalLM / Qwen3ForCausalLM, each naming its field."""
    problems = cfg.mismatches({"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"}, "Llama (and Qwen3)")
    if cfg.bias and cfg.qk_norm:
        problems.append("bias is true; Qwen3's MLP has no biases (Llama's has: leave out qk_norm, or set bias false)")
    return problems


def _rotary_order(head_dim: int) -> torch.Tensor:
    """transformers' row j of a head is MyPT's row order[j]: pairs (2j, 2j+1) -> (j, j + hs/2)."""
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))


def _per_head(t: torch.Tensor, head_dim: int, order: torch.Tensor) -> torch.Tensor:
    """Reorder the rows of each head of a (heads * head_dim, ...) tensor."""
    return t.unflatten(0, (-1, head_dim))[:, order].flatten(0, 1)


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the transformers model and its shape."""
    c, hs, hidden = cfg.n_embd, cfg.head_dim, cfg.hidden_size
    widths = {QKV[0]: cfg.n_head * hs, QKV[1]: cfg.kv_heads * hs, QKV[2]: cfg.kv_heads * hs,
              GATE_UP[0]: hidden, GATE_UP[1]: hidden}
    shapes: dict[str, tuple[int, ...]] = {EMBEDDING: (cfg.vocab_size, c)}
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (c,), p + "post_attention_layernorm.weight": (c,),
                   p + "self_attn.o_proj.weight": (c, widths[QKV[0]]),
                   p + "mlp.down_proj.weight": (c, hidden)}
        shapes |= {p + f"{name}.weight": (rows, c) for name, rows in widths.items()}
        if cfg.bias:
            shapes |= {p + f"{name}.bias": (rows,) for name, rows in widths.items()}
            shapes |= {p + "self_attn.o_proj.bias": (c,), p + "mlp.down_proj.bias": (c,)}
        if cfg.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (hs,), p + "self_attn.k_norm.weight": (hs,)}
    shapes["model.norm.weight"] = (c,)
    if not cfg.tie_embeddings:
        shapes[HEAD] = (cfg.vocab_size, c)
    return shapes


def _renamed(src: dict[str, torch.Tensor], cfg: ModelConfig, order: torch.Tensor,
             to_hf: bool) -> dict[str, torch.Tensor]:
    """The tensors that map one to one (norm gains, output projections), renamed either way;
    the QK-norm gains reordered by `order`."""
    out = {}
    for i in range(cfg.n_layer):
        for ours, theirs in LAYER_NAMES.items():
            a, b = f"transformer.h.{i}.{ours}", f"model.layers.{i}.{theirs}"
            source, target = (a, b) if to_hf else (b, a)
            if source in src:
                rotated = ours.endswith(("q_norm.weight", "k_norm.weight"))
                out[target] = src[source][order] if rotated else src[source]
    return out


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """MyPT's state dict in transformers' names and rotary layout."""
    order = _rotary_order(cfg.head_dim)
    qkv = (cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim)
    out = {EMBEDDING: state["transformer.wte.weight"], "model.norm.weight": state["transformer.ln_f.weight"]}
    if not cfg.tie_embeddings:
        out[HEAD] = state[HEAD]
    out |= _renamed(state, cfg, order, to_hf=True)
    for i in range(cfg.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            if ours + f"attn.c_attn.{kind}" in state:
                q, k, v = state[ours + f"attn.c_attn.{kind}"].split(qkv)
                q, k = _per_head(q, cfg.head_dim, order), _per_head(k, cfg.head_dim, order)
                out |= {theirs + f"{name}.{kind}": t for name, t in zip(QKV, (q, k, v), strict=True)}
            if ours + f"mlp.c_fc.{kind}" in state:
                gate, up = state[ours + f"mlp.c_fc.{kind}"].chunk(2)
                out |= {theirs + f"{GATE_UP[0]}.{kind}": gate, theirs + f"{GATE_UP[1]}.{kind}": up}
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def from_hf_state(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' tensors (checked against hf_shapes) as MyPT's fp32 state dict."""
    back = torch.argsort(_rotary_order(cfg.head_dim))
    hf = {k: v.to(torch.float32) for k, v in hf.items()}
    state = {"transformer.wte.weight": hf[EMBEDDING], "transformer.ln_f.weight": hf["model.norm.weight"]}
    state[HEAD] = hf[EMBEDDING] if cfg.tie_embeddings else hf[HEAD]
    state |= _renamed(hf, cfg, back, to_hf=False)
    for i in range(cfg.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            if theirs + f"{QKV[0]}.{kind}" in hf:
                q, k, v = (hf[theirs + f"{name}.{kind}"] for name in QKV)
                q, k = _per_head(q, cfg.head_dim, back), _per_head(k, cfg.head_dim, back)
                state[ours + f"attn.c_attn.{kind}"] = torch.cat((q, k, v))
                state[ours + f"mlp.c_fc.{kind}"] = torch.cat([hf[theirs + f"{n}.{kind}"] for n in GATE_UP])
    return {k: v.contiguous() for k, v in state.items()}


def hf_config(cfg: ModelConfig, tok: Tokenizer) -> dict[str, Any]:
    """config.json in transformers' Llama or Qwen3 schema for a MyPT model."""
    special = tok.eot_id
    kind = model_type(cfg)
    config = {
        "architectures": [MODEL_TYPES[kind]],
        "model_type": kind,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.hidden_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4's keys (rope_scaling below); 5 reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})},
        "attention_bias": cfg.bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": tok.start_ids()[0],  # an imported tokenizer's begin-of-text, else end-of-text
        "eos_token_id": special,
    }
    if cfg.rope_scaling:
        config["rope_scaling"] = dict(cfg.rope_scaling)
    if kind == "llama":
        config["mlp_bias"] = cfg.bias
    else:  # each token attends to the block_size tokens ending at itself, as in MyPT
        config |= {"use_sliding_window": True, "sliding_window": cfg.block_size, "max_window_layers": 0,
                   "layer_types": ["sliding_attention"] * cfg.n_layer}
    return config


def export_notes(cfg: ModelConfig) -> list[str]:
    if model_type(cfg) == "llama":
        return [f"past {cfg.block_size} tokens (block_size) transformers' Llama attends to the whole context while "
                "MyPT slides a window of block_size tokens: the two agree up to block_size tokens"]
    return []


def rope_theta(hf: dict[str, Any]) -> Any:
    params = hf.get("rope_parameters")
    return params.get("rope_theta", hf_value(hf, "rope_theta", 10000.0)) if isinstance(params, dict) else \
        hf_value(hf, "rope_theta", 10000.0)


def _rope_params(hf: dict[str, Any]) -> Any:
    """rope_parameters (transformers 5) or rope_scaling (4); {} when neither is set."""
    return hf.get("rope_parameters") or hf.get("rope_scaling") or {}


def rope_scaling(hf: dict[str, Any]) -> dict[str, Any] | None:
    """MyPT's rope_scaling for a llama3-scaled config.json (None: plain rotary positions); its
    values are checked where ModelConfig validates them, naming rope_scaling."""
    params = _rope_params(hf)
    if params.get("rope_type", params.get("type")) != "llama3":
        return None
    return {key: params.get(key) for key in ROPE_SCALING_KEYS}


def architecture_problems(hf: dict[str, Any]) -> list[str]:
    """What keeps a Llama or Qwen3 config.json from MyPT's architecture (empty: nothing)."""
    problems = []
    act = hf_value(hf, "hidden_act", "silu")
    if act != "silu":
        problems.append(f"hidden_act is {act!r}; MyPT's gated MLP uses silu")
    params = _rope_params(hf)
    if not isinstance(params, dict):
        problems.append(f"rope_parameters is {params!r}; expected an object such as "
                        '{"rope_type": "default", "rope_theta": 10000.0}')
        params = {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        problems.append(f"rope type is {rope_type!r}; MyPT has plain rotary positions or Llama 3's scaling "
                        "(rope_type llama3)")
    if hf.get("model_type") == "llama" and bool(hf.get("attention_bias")) != bool(hf.get("mlp_bias")):
        problems.append("attention_bias and mlp_bias differ; MyPT's bias field covers both")
    if hf.get("model_type") == "qwen3" and hf.get("use_sliding_window") and \
            hf.get("sliding_window") != hf_value(hf, "max_position_embeddings", 2048):
        problems.append("sliding_window differs from max_position_embeddings; MyPT's window is its block_size")
    return problems


CONFIG_KEYS = {"n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_embd": "hidden_size",
               "block_size": "max_position_embeddings", "vocab_size": "vocab_size", "bias": "attention_bias",
               "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps", "intermediate_size": "intermediate_size",
               "n_kv_head": "num_key_value_heads", "tie_embeddings": "tie_word_embeddings", "head_size": "head_dim"}


def _head_size(hf: dict[str, Any], n_embd: int, n_head: Any) -> Any:
    """config.json's head_dim where it differs from hidden_size / num_attention_heads (None: it does not)."""
    head_dim = hf.get("head_dim")
    return None if isinstance(n_head, int) and n_head > 0 and head_dim == n_embd // n_head else head_dim


def import_config(hf: dict[str, Any], hf_dir: Path, source: str) -> ModelConfig:
    n_embd, n_head = hf_value(hf, "hidden_size", 4096), hf_value(hf, "num_attention_heads", 32)
    width = n_embd if isinstance(n_embd, int) else 0
    return model_config({
        "name": f"{hf_dir.name} (imported)",
        "description": f"imported from the transformers folder {hf_dir}",
        "n_layer": hf_value(hf, "num_hidden_layers", 32), "n_head": n_head, "n_embd": n_embd,
        "block_size": hf_value(hf, "max_position_embeddings", 2048), "vocab_size": hf_value(hf, "vocab_size", 32000),
        "dropout": 0.0, "bias": hf_value(hf, "attention_bias", False), "batch_size": ModelConfig.batch_size,
        "position": "rope", "rope_theta": rope_theta(hf), "norm": "rmsnorm",
        "norm_eps": hf_value(hf, "rms_norm_eps", 1e-6), "mlp": "swiglu",
        "intermediate_size": hf_value(hf, "intermediate_size", 4 * width), "qk_norm": hf.get("model_type") == "qwen3",
        "n_kv_head": hf_value(hf, "num_key_value_heads", n_head),
        "tie_embeddings": hf_value(hf, "tie_word_embeddings", False),
        "head_size": _head_size(hf, width, n_head), "rope_scaling": rope_scaling(hf),
    }, CONFIG_KEYS, source)


def weight_problems(hf: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    problems = tensor_problems(hf, shapes, lambda name: name.endswith("rotary_emb.inv_freq") or name == HEAD)
    if HEAD not in shapes and HEAD in hf and EMBEDDING in hf and not torch.equal(hf[HEAD], hf[EMBEDDING]):
        problems.append("lm_head.weight differs from the token embedding, but tie_word_embeddings is true")
    return problems


def lora_to_hf(layer: str, a: torch.Tensor, b: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor,
                                                                                              torch.Tensor]]:
    """One adapted layer's LoRA matrices (A: rank x in, B: out x rank) as transformers' modules.

    A fused matrix's B is split as its weight is (rotary rows permuted the same way), the parts
    sharing A: each part's update B_part A is exactly that part's rows of the fused update.
    """
    _, _, i, local = layer.split(".", 3)  # transformer.h.{i}.{local}
    prefix = f"model.layers.{i}."
    if local == "attn.c_attn":
        order = _rotary_order(cfg.head_dim)
        q, k, v = b.split((cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim))
        parts = (_per_head(q, cfg.head_dim, order), _per_head(k, cfg.head_dim, order), v)
        return [(prefix + name, a, part) for name, part in zip(QKV, parts, strict=True)]
    if local == "mlp.c_fc":
        return [(prefix + name, a, part) for name, part in zip(GATE_UP, b.chunk(2), strict=True)]
    return [(prefix + LAYER_NAMES[f"{local}.weight"].removesuffix(".weight"), a, b)]
