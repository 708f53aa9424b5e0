"""Hugging Face transformers folders, both ways: the folder-level work of export and import.

Export writes config.json, model.safetensors and the tokenizer files; import reads a local
folder's config.json and safetensors weights (never pickle: a folder with only
pytorch_model.bin is refused) into a MyPT checkpoint. The architecture-specific parts (name
map, shape rule, config schema) live in hf_gpt2 (GPT2LMHeadModel) and hf_llama
(LlamaForCausalLM, Qwen3ForCausalLM): export picks the family that computes the model's
function, import the one the folder's model_type names. The tokenizer files live in
hf_tokenizer. transformers itself is never imported.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mypt import fsutil, weights_only
from mypt.build import Built, check_weights_fit
from mypt.checkpoint import now, recover, save_checkpoint, training_lock, versions, write_folder
from mypt.config import ModelConfig
from mypt.errors import MyPTError
from mypt.formats import hf_gpt2, hf_llama
from mypt.formats.hf_config import hf_value
from mypt.formats.hf_tokenizer import import_tokenizer, tokenizer_files
from mypt.model import GPT
from mypt.tokenizers import END_OF_TURN, Tokenizer

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
HF_GENERATION_CONFIG = "generation_config.json"


# ---------------------------------------------------------------------------------------------
# Export


def export_hf(built: Built, out: Path) -> list[str]:
    """Write a built model as a transformers folder at out; returns notes for the user."""
    cfg, tok = built.config, built.tokenizer
    files, notes = tokenizer_files(tok, cfg.block_size)
    if cfg.vocab_size > tok.n_vocab:
        notes.append(f"vocab_size is {cfg.vocab_size}, the tokenizer has {tok.n_vocab} tokens: ids "
                     f"{tok.n_vocab}-{cfg.vocab_size - 1} are padding with no text (training never "
                     "targets them, so sampling them is rare)")
    family = export_family(cfg)
    files[HF_CONFIG] = fsutil.json_bytes(family.hf_config(cfg, tok))
    if tok.chat_format is not None:  # a chat model: generate() stops at the end of its turn
        stops = [tok.eot_id, tok.chat_ids[END_OF_TURN]]
        files[HF_GENERATION_CONFIG] = fsutil.json_bytes({"bos_token_id": tok.eot_id, "eos_token_id": stops})
    if family is hf_llama:
        notes += hf_llama.export_notes(cfg)
    write_with_weights(out, files, HF_WEIGHTS, family.to_hf_state(built.model.state_dict(), cfg))
    return notes


def write_with_weights(out: Path, files: dict[str, bytes], weights_name: str, tensors: dict[str, torch.Tensor]) -> None:
    """A new folder `out` with files (name -> bytes) and the tensors as a safetensors file."""
    with fsutil.new_folder(out) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        save_file(tensors, str(tmp / weights_name), metadata={"format": "pt"})
        # safetensors creates its file private (0600): give it the mode the other files got
        os.chmod(tmp / weights_name, (tmp / next(iter(files))).stat().st_mode & 0o777)


def export_family(cfg: ModelConfig) -> ModuleType:
    """The transformers family that computes the config's model: hf_gpt2 or hf_llama (Llama,
    Qwen3); a MyPTError naming the fields when none does."""
    gpt2, llama = hf_gpt2.export_problems(cfg), hf_llama.export_problems(cfg)
    if not gpt2:
        return hf_gpt2
    if not llama:
        return hf_llama
    problems, target = (gpt2, "GPT2LMHeadModel") if len(gpt2) < len(llama) else \
        (llama, "LlamaForCausalLM or Qwen3ForCausalLM")
    raise MyPTError(f"--format hf: no transformers class computes this model (config.json): "
                    f"{'; '.join(problems)}. The closest is {target}; --format safetensors exports it for MyPT")


def export_weights_only(built: Built, training_state: dict[str, Any], source: Path, out: Path) -> list[str]:
    """Write a built model as MyPT's pickle-free folder (model.safetensors and the JSON files)."""
    kept = {k: v for k, v in training_state.items() if k not in ("manifest", "format_version")}
    state = {**kept, "exported_from": str(source), "exported_at": now()}
    files = {weights_only.WEIGHTS_FILE: weights_only.state_to_bytes(built.model.state_dict()),
             "config.json": fsutil.json_bytes(built.config.to_dict()),
             "tokenizer.json": fsutil.json_bytes(built.tokenizer.to_json())}
    with fsutil.new_folder(out) as tmp:
        write_folder(tmp, files, state)
    return [f"load it with mypt.api.load_model(path='{out}'), or put it in a checkpoints folder; it has no "
            "optimizer state, so training from it starts a fresh optimizer"]


# ---------------------------------------------------------------------------------------------
# Import


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors (or its shards), as the folder names them."""
    index = hf_dir / HF_WEIGHTS_INDEX
    if (hf_dir / HF_WEIGHTS).is_file():
        files = [hf_dir / HF_WEIGHTS]
    elif index.is_file():
        files = [hf_dir / name for name in _shard_names(index)]
    elif (hf_dir / "pytorch_model.bin").is_file():
        raise MyPTError(
            f"{hf_dir} has only pytorch_model.bin, a pickle, which MyPT does not load; convert it first: "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR) writes model.safetensors")
    else:
        raise MyPTError(f"{hf_dir} has no {HF_WEIGHTS}; is it a transformers model folder?")
    tensors = {}
    for path in files:
        fsutil.check_regular_file(path, str(path))
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors.update((name, f.get_tensor(name)) for name in f.keys())
        except Exception as exc:  # noqa: BLE001 - safetensors reports damaged files as many types
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise MyPTError(f"{path} could not be read ({first}); download it again") from None
    return tensors


def _shard_names(index: Path) -> list[str]:
    """The safetensors files model.safetensors.index.json names (files in its own folder)."""
    doc = fsutil.read_json(index, "weights index")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    names = set(weight_map.values()) if isinstance(weight_map, dict) else set()
    if not names or not all(isinstance(n, str) and n and "/" not in n and n not in (".", "..") for n in names):
        raise MyPTError(f"{index}: expected {{\"weight_map\": {{tensor name: file name in this folder}}}}; "
                        "download the folder again")
    return sorted(names)


FAMILIES = {"gpt2": "GPT-2", "llama": "Llama", "qwen3": "Qwen3"}


def import_hf(hf_dir: Path, ckpt_dir: Path) -> tuple[Any, list[str]]:
    """Turn the transformers GPT-2, Llama or Qwen3 folder hf_dir into the MyPT checkpoint ckpt_dir."""
    if not hf_dir.is_dir():
        raise MyPTError(f"--hf_dir {hf_dir}: no such folder")
    if ckpt_dir.exists() and (not ckpt_dir.is_dir() or any(ckpt_dir.iterdir())):
        raise MyPTError(f"{ckpt_dir} already exists; pick another --model_name or remove that folder")
    cfg, state, tok, notes, family = read_hf(hf_dir)
    with training_lock(ckpt_dir):
        recover(ckpt_dir)
        save_checkpoint(ckpt_dir, model_state=state, config=cfg.to_dict(), tokenizer=tok.to_json(),
                        training_state=_import_state(ckpt_dir, hf_dir, family, tok.kind),
                        optimizer_state=None)
    return cfg, notes


def read_hf(hf_dir: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, list[str], str]:
    """The transformers GPT-2, Llama or Qwen3 folder hf_dir as MyPT's config, weights and tokenizer
    (with notes for the user and the family's name), checked to fit the model MyPT builds."""
    hf = fsutil.read_json(hf_dir / HF_CONFIG, "transformers config")
    if not isinstance(hf, dict):
        raise MyPTError(f"{hf_dir / HF_CONFIG}: expected a JSON object")
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise MyPTError(_problems(hf_dir, [f"model_type is {kind!r}; only GPT-2, Llama and Qwen3 folders "
                                           "(model_type 'gpt2', 'llama' or 'qwen3') can be imported"]))
    cfg, state, tok, notes = (_from_gpt2 if kind == "gpt2" else _from_llama)(hf, hf_dir)
    with torch.device("meta"):
        GPT(cfg).load_state_dict(state, assign=True)  # names and shapes fit the model MyPT builds
    return cfg, state, tok, notes, FAMILIES[kind]


def _from_gpt2(hf: dict[str, Any], hf_dir: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, list[str]]:
    problems = hf_gpt2.architecture_problems(hf)
    if problems:
        raise MyPTError(_problems(hf_dir, problems))
    cfg = hf_gpt2.import_config(hf, hf_dir, str(hf_dir / HF_CONFIG))
    _check_fits(cfg, hf_dir)
    shapes = hf_gpt2.hf_shapes(cfg)
    weights = hf_gpt2.hub_names(_read_hf_weights(hf_dir))
    tok, problems = _tokenizer(hf_dir, hf, cfg)
    problems = hf_gpt2.weight_problems(weights, shapes) + problems
    if problems:
        raise MyPTError(_problems(hf_dir, problems))
    bias = any(bool(weights[name].any()) for name in shapes if name.endswith(".bias"))
    cfg = dataclasses.replace(cfg, bias=bias)
    notes = [] if bias else ["every bias is zero: imported with bias false (no bias parameters)"]
    attn_pdrop = float(hf_value(hf, "attn_pdrop", 0.0))
    if attn_pdrop:
        notes.append(f"attn_pdrop {attn_pdrop} dropped: MyPT has no attention dropout "
                     f"(dropout {cfg.dropout} applies to the residual stream)")
    return cfg, hf_gpt2.from_hf_state(weights, shapes, bias), tok, notes


def _from_llama(hf: dict[str, Any], hf_dir: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, list[str]]:
    problems = hf_llama.architecture_problems(hf)
    if problems:
        raise MyPTError(_problems(hf_dir, problems))
    cfg = hf_llama.import_config(hf, hf_dir, str(hf_dir / HF_CONFIG))
    _check_fits(cfg, hf_dir)
    weights = _read_hf_weights(hf_dir)
    tok, problems = _tokenizer(hf_dir, hf, cfg)
    problems = hf_llama.weight_problems(weights, hf_llama.hf_shapes(cfg)) + problems
    if problems:
        raise MyPTError(_problems(hf_dir, problems))
    notes = [f"block_size {cfg.block_size} (max_position_embeddings): each token attends to at most that many, "
             "as a sliding window past it"]
    return cfg, hf_llama.from_hf_state(weights, cfg), tok, notes


def _check_fits(cfg: ModelConfig, hf_dir: Path) -> None:
    """Refuse, before any weight is read, a config.json whose model's fp32 weights exceed this machine's memory."""
    try:
        check_weights_fit(cfg, "cpu")
    except MyPTError as e:
        raise MyPTError(_problems(hf_dir, [f"its config.json describes {e}"])) from None


def _tokenizer(hf_dir: Path, hf: dict[str, Any], cfg: ModelConfig) -> tuple[Tokenizer, list[str]]:
    """The folder's tokenizer and what stops its use: unreadable, or more tokens than the model's vocabulary."""
    tok, problem = import_tokenizer(hf_dir, hf)
    if problem:
        return tok, [problem]
    if cfg.vocab_size < tok.n_vocab:
        return tok, [f"vocab_size is {cfg.vocab_size}, fewer than the {tok.kind} tokenizer's {tok.n_vocab} tokens"]
    return tok, []


def _import_state(ckpt_dir: Path, hf_dir: Path, family: str, tokenizer: str) -> dict[str, Any]:
    return {
        "iteration": 0, "best_val_loss": None, "last_val_loss": None, "last_train_loss": None,
        "tokens_seen": 0, "train_seconds": 0.0,
        "model_name": ckpt_dir.name,
        "input_file": None, "input_sha256": None,
        "tokenizer": tokenizer,
        "imported_from": str(hf_dir.resolve()),
        "note": f"imported from a transformers {family} folder; not trained by MyPT yet",
        "versions": versions(),
        "saved_at": now(),
    }


def _problems(hf_dir: Path, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{hf_dir} cannot be imported: {problems[0]}"
    listed = "\n".join(f"  - {p}" for p in problems)
    return f"{hf_dir} cannot be imported ({len(problems)} problems):\n{listed}"
