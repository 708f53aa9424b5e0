"""Conversions between MyPT checkpoints and other formats.

Owns three things:

- Hugging Face transformers GPT-2 folders, both ways: config.json in transformers' GPT-2 schema,
  model.safetensors in GPT-2's layout (its Conv1D keeps linear weights as (in, out), the
  transpose of nn.Linear; biases MyPT leaves out are stored as zeros), and the tokenizer files
  (written and read by mypt.formats.hf_tokenizer).
- Weights-only MyPT folders (model.safetensors in place of model.pt, no pickle anywhere).

transformers itself is never imported: everything written is plain JSON and safetensors, and
import reads only safetensors (a folder with only pytorch_model.bin is refused, never unpickled).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mypt import __version__
from mypt.api import load_model
from mypt.checkpoint import save_checkpoint, write_weights_only
from mypt.config import ModelConfig, TrainConfig, read_json
from mypt.errors import MyPTError
from mypt.formats.hf_tokenizer import import_tokenizer, tokenizer_files
from mypt.model import GPT
from mypt.tokenizers import Tokenizer
from mypt.trainer import make_optimizer

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
HF_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
LAYER_NORM_EPS = 1e-5  # torch's LayerNorm default, which MyPT uses
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # transformers' names for MyPT's tanh GELU
# Linear layers that transformers' GPT-2 stores as Conv1D, i.e. with the weight transposed.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers older transformers versions saved with the weights: not parameters.
HF_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
TIED_HEAD = "lm_head.weight"
EMBEDDING = "transformer.wte.weight"


# ---------------------------------------------------------------------------------------------
# Weights and config in GPT-2's layout


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


# ---------------------------------------------------------------------------------------------
# Export


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


@contextmanager
def _new_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside out that becomes out once the body has filled it."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MyPTError(f"--out {out} already exists and is not an empty folder; "
                        "remove it or pick another --out")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        if out.is_dir():
            out.rmdir()  # the empty folder the check above allowed
        os.rename(tmp, out)
    except OSError as exc:
        raise MyPTError(f"could not write {out} ({exc.strerror or exc}); nothing was written there. "
                        "Check the folder is writable and the disk has space") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_hf(ckpt_dir: Path, out: Path) -> list[str]:
    """Write checkpoint ckpt_dir as a transformers GPT-2 folder; returns notes for the user."""
    lm = load_model(path=ckpt_dir, device="cpu")
    cfg, tok = lm.config, lm.tokenizer
    files, notes = tokenizer_files(tok, cfg.block_size)
    if cfg.vocab_size > tok.n_vocab:
        notes.append(f"vocab_size is {cfg.vocab_size}, the tokenizer has {tok.n_vocab} tokens: ids "
                     f"{tok.n_vocab}-{cfg.vocab_size - 1} are padding with no text (training never "
                     "targets them, so sampling them is rare)")
    files[HF_CONFIG] = _json(hf_config(cfg, tok))
    with _new_folder(out) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        weights = to_hf_state(lm.model.state_dict(), cfg)
        save_file(weights, str(tmp / HF_WEIGHTS), metadata={"format": "pt"})
        # safetensors creates its file private (0600): give it the mode the other files got
        os.chmod(tmp / HF_WEIGHTS, (tmp / HF_CONFIG).stat().st_mode & 0o777)
    return notes


def export_weights_only(ckpt_dir: Path, out: Path) -> list[str]:
    """Write ckpt_dir as a pickle-free MyPT folder (model.safetensors, JSON files)."""
    lm = load_model(path=ckpt_dir, device="cpu")
    kept = {k: v for k, v in lm.checkpoint.training_state.items() if k != "manifest"}
    state = {**kept, "exported_from": str(ckpt_dir), "exported_at": _now()}
    with _new_folder(out) as tmp:
        write_weights_only(tmp, model_state=lm.model.state_dict(), config=lm.config.to_dict(),
                           tokenizer=lm.tokenizer.to_json(), training_state=state)
    return [f"load it with mypt.api.load_model(path='{out}'), or put it in a checkpoints folder; "
            "it has no optimizer state, so training cannot resume from it"]


# ---------------------------------------------------------------------------------------------
# Import


def _hf_value(hf: dict[str, Any], key: str, default: Any) -> Any:
    return hf[key] if hf.get(key) is not None else default


def _architecture_problems(hf: dict[str, Any]) -> list[str]:
    """What keeps a transformers config from being MyPT's architecture (empty: nothing)."""
    problems = []
    if hf.get("model_type") != "gpt2":
        return [f"model_type is {hf.get('model_type')!r}; only GPT-2 folders (model_type 'gpt2') "
                "can be imported"]
    archs = hf.get("architectures") or ["GPT2LMHeadModel"]
    if not set(archs) & set(HF_ARCHITECTURES):
        problems.append(f"architectures {archs} has no GPT-2 language model "
                        f"({' or '.join(HF_ARCHITECTURES)})")
    act = _hf_value(hf, "activation_function", "gelu_new")
    if act not in TANH_GELUS:
        problems.append(f"activation_function is {act!r}; MyPT uses the tanh GELU ('gelu_new')")
    n_embd = _hf_value(hf, "n_embd", 768)
    n_inner = _hf_value(hf, "n_inner", 4 * n_embd)
    if n_inner != 4 * n_embd:
        problems.append(f"n_inner is {n_inner}; MyPT's MLP is 4 * n_embd = {4 * n_embd} wide")
    eps = _hf_value(hf, "layer_norm_epsilon", LAYER_NORM_EPS)
    if not isinstance(eps, (int, float)) or not math.isclose(eps, LAYER_NORM_EPS, rel_tol=1e-6):
        problems.append(f"layer_norm_epsilon is {eps}; MyPT's LayerNorm uses {LAYER_NORM_EPS}")
    checks = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
              "add_cross_attention": False, "tie_word_embeddings": True}
    for key, want in checks.items():
        if _hf_value(hf, key, want) != want:
            problems.append(f"{key} is {hf[key]}; MyPT needs {str(want).lower()}")
    return problems


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors (or its shards), named with the transformer. prefix."""
    index = hf_dir / HF_WEIGHTS_INDEX
    if (hf_dir / HF_WEIGHTS).is_file():
        files = [hf_dir / HF_WEIGHTS]
    elif index.is_file():
        weight_map = read_json(index, "weights index").get("weight_map", {})
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
    elif (hf_dir / "pytorch_model.bin").is_file():
        raise MyPTError(
            f"{hf_dir} has only pytorch_model.bin, a pickle, which MyPT does not load; convert it "
            "first: GPT2LMHeadModel.from_pretrained(DIR).save_pretrained(NEW_DIR) writes "
            "model.safetensors"
        )
    else:
        raise MyPTError(f"{hf_dir} has no {HF_WEIGHTS}; is it a transformers model folder?")
    tensors = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors.update((name, f.get_tensor(name)) for name in f.keys())
        except Exception as exc:  # noqa: BLE001 - safetensors reports damaged files as many types
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise MyPTError(f"{path} could not be read ({first}); download it again") from None
    prefix = "transformer."
    return {
        (k if k.startswith(prefix) or k == TIED_HEAD else prefix + k): v
        for k, v in tensors.items()
    }


def _weight_problems(hf: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    problems = []
    missing = [name for name in shapes if name not in hf]
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:5])}")
    known = set(shapes) | {TIED_HEAD}
    extra = sorted(k for k in hf if k not in known and not k.endswith(HF_MASK_BUFFERS))
    if extra:
        problems.append(f"tensors GPT-2 does not have: {', '.join(extra[:5])}")
    for name, shape in shapes.items():
        if name in hf and tuple(hf[name].shape) != shape:
            problems.append(f"{name} has shape {tuple(hf[name].shape)}, config.json implies {shape}")
    head = hf.get(TIED_HEAD)
    if head is not None and EMBEDDING in hf and not torch.equal(head, hf[EMBEDDING]):
        problems.append("lm_head.weight differs from the token embedding; MyPT ties the two")
    return problems


def _import_config(hf: dict[str, Any], hf_dir: Path) -> ModelConfig:
    """MyPT's config for the folder (bias is decided later, from the weights)."""
    dropout = _hf_value(hf, "resid_pdrop", 0.1)
    return ModelConfig.from_dict({
        "name": f"{hf_dir.name} (imported)",
        "description": f"imported from the transformers folder {hf_dir}",
        "n_layer": _hf_value(hf, "n_layer", 12), "n_head": _hf_value(hf, "n_head", 12),
        "n_embd": _hf_value(hf, "n_embd", 768), "block_size": _hf_value(hf, "n_positions", 1024),
        "vocab_size": _hf_value(hf, "vocab_size", 50257), "dropout": dropout, "bias": False,
        "batch_size": ModelConfig.batch_size,
    }, f"{hf_dir / HF_CONFIG}")


def _fresh_optimizer_state(model: GPT) -> dict[str, Any]:
    """AdamW state with no moments yet (default flags), in the name-keyed form resume loads."""
    optimizer = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    names = {id(p): name for name, p in model.named_parameters()}
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
        for g in optimizer.param_groups
    ]
    return {"state": {}, "param_groups": groups}


def import_hf(hf_dir: Path, ckpt_dir: Path) -> tuple[ModelConfig, list[str]]:
    """Turn the transformers GPT-2 folder hf_dir into the MyPT checkpoint ckpt_dir."""
    if not hf_dir.is_dir():
        raise MyPTError(f"--hf_dir {hf_dir}: no such folder")
    if ckpt_dir.exists() and (not ckpt_dir.is_dir() or any(ckpt_dir.iterdir())):
        raise MyPTError(f"{ckpt_dir} already exists; pick another --model_name or remove that folder")
    hf = read_json(hf_dir / HF_CONFIG, "transformers config")
    if not isinstance(hf, dict):
        raise MyPTError(f"{hf_dir / HF_CONFIG}: expected a JSON object")
    problems = _architecture_problems(hf)
    if problems:
        raise MyPTError(_problems(hf_dir, problems))
    cfg = _import_config(hf, hf_dir)
    shapes = hf_shapes(cfg)
    weights = _read_hf_weights(hf_dir)
    problems = _weight_problems(weights, shapes)
    tok, tokenizer_problem = import_tokenizer(hf_dir)
    if tokenizer_problem:
        problems.append(tokenizer_problem)
    elif cfg.vocab_size < tok.n_vocab:
        problems.append(f"vocab_size is {cfg.vocab_size}, fewer than the {tok.kind} tokenizer's "
                        f"{tok.n_vocab} tokens")
    if problems:
        raise MyPTError(_problems(hf_dir, problems))
    bias = any(bool(weights[name].any()) for name in shapes if name.endswith(".bias"))
    cfg = dataclasses.replace(cfg, bias=bias)
    state = from_hf_state(weights, shapes, bias)
    with torch.device("meta"):
        model = GPT(cfg)
    model.load_state_dict(state, assign=True)
    model.lm_head.weight = model.transformer.wte.weight
    save_checkpoint(ckpt_dir, model_state=state, config=cfg.to_dict(), tokenizer=tok.to_json(),
                    training_state=_import_state(ckpt_dir, hf_dir, tok.kind),
                    optimizer_state={"optimizer": _fresh_optimizer_state(model), "scaler": None})
    notes = [] if bias else ["every bias is zero: imported with bias false (no bias parameters)"]
    attn_pdrop = float(_hf_value(hf, "attn_pdrop", 0.0))
    if attn_pdrop:
        notes.append(f"attn_pdrop {attn_pdrop} dropped: MyPT has no attention dropout "
                     f"(dropout {cfg.dropout} applies to the residual stream)")
    return cfg, notes


def _import_state(ckpt_dir: Path, hf_dir: Path, tokenizer: str) -> dict[str, Any]:
    return {
        "iteration": 0, "best_val_loss": None, "last_val_loss": None, "last_train_loss": None,
        "tokens_seen": 0, "train_seconds": 0.0,
        "model_name": ckpt_dir.name,
        "input_file": None, "input_sha256": None,
        "tokenizer": tokenizer,
        "imported_from": str(hf_dir.resolve()),
        "note": "imported from a transformers GPT-2 folder; not trained by MyPT yet",
        "versions": {
            "mypt": __version__, "torch": torch.__version__, "python": platform.python_version(),
        },
        "saved_at": _now(),
    }


def _problems(hf_dir: Path, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{hf_dir} cannot be imported: {problems[0]}"
    listed = "\n".join(f"  - {p}" for p in problems)
    return f"{hf_dir} cannot be imported ({len(problems)} problems):\n{listed}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
