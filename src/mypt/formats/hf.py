"""Hugging Face transformers folders, both ways: the folder-level work of export and import.

Export writes config.json, model.safetensors and the tokenizer files; import reads a local
folder's config.json and safetensors weights (never pickle: a folder with only
pytorch_model.bin is refused) into a MyPT checkpoint. The architecture-specific parts (name
map, shape rule, config schema) live in hf_gpt2; the tokenizer files in hf_tokenizer.
transformers itself is never imported.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mypt import fsutil
from mypt.build import Built
from mypt.checkpoint import now, recover, save_checkpoint, training_lock, versions, write_folder
from mypt.errors import MyPTError
from mypt.formats import hf_gpt2, weights_only
from mypt.formats.hf_tokenizer import tokenizer_files, tokenizer_problem
from mypt.model import GPT
from mypt.tokenizers import GPT2_EOT_ID

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"


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
    files[HF_CONFIG] = fsutil.json_bytes(hf_gpt2.hf_config(cfg, tok))
    with fsutil.new_folder(out) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        save_file(hf_gpt2.to_hf_state(built.model.state_dict(), cfg), str(tmp / HF_WEIGHTS),
                  metadata={"format": "pt"})
        # safetensors creates its file private (0600): give it the mode the other files got
        os.chmod(tmp / HF_WEIGHTS, (tmp / HF_CONFIG).stat().st_mode & 0o777)
    return notes


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
    """All tensors of model.safetensors (or its shards), named with the transformer. prefix."""
    index = hf_dir / HF_WEIGHTS_INDEX
    if (hf_dir / HF_WEIGHTS).is_file():
        files = [hf_dir / HF_WEIGHTS]
    elif index.is_file():
        weight_map = fsutil.read_json(index, "weights index").get("weight_map", {})
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
    elif (hf_dir / "pytorch_model.bin").is_file():
        raise MyPTError(
            f"{hf_dir} has only pytorch_model.bin, a pickle, which MyPT does not load; convert it first: "
            "GPT2LMHeadModel.from_pretrained(DIR).save_pretrained(NEW_DIR) writes model.safetensors")
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
    prefix = "transformer."
    return {(k if k.startswith(prefix) or k == hf_gpt2.TIED_HEAD else prefix + k): v for k, v in tensors.items()}


def import_hf(hf_dir: Path, ckpt_dir: Path) -> tuple[Any, list[str]]:
    """Turn the transformers GPT-2 folder hf_dir into the MyPT checkpoint ckpt_dir."""
    if not hf_dir.is_dir():
        raise MyPTError(f"--hf_dir {hf_dir}: no such folder")
    if ckpt_dir.exists() and (not ckpt_dir.is_dir() or any(ckpt_dir.iterdir())):
        raise MyPTError(f"{ckpt_dir} already exists; pick another --model_name or remove that folder")
    hf = fsutil.read_json(hf_dir / HF_CONFIG, "transformers config")
    if not isinstance(hf, dict):
        raise MyPTError(f"{hf_dir / HF_CONFIG}: expected a JSON object")
    problems = hf_gpt2.architecture_problems(hf)
    if problems:
        raise MyPTError(_problems(hf_dir, problems))
    cfg = hf_gpt2.import_config(hf, hf_dir, str(hf_dir / HF_CONFIG))
    shapes = hf_gpt2.hf_shapes(cfg)
    weights = _read_hf_weights(hf_dir)
    problems = hf_gpt2.weight_problems(weights, shapes)
    problem = tokenizer_problem(hf_dir)
    if problem:
        problems.append(problem)
    if cfg.vocab_size <= GPT2_EOT_ID:
        problems.append(f"vocab_size is {cfg.vocab_size}, fewer than the gpt2 tokenizer's {GPT2_EOT_ID + 1} tokens")
    if problems:
        raise MyPTError(_problems(hf_dir, problems))
    bias = any(bool(weights[name].any()) for name in shapes if name.endswith(".bias"))
    cfg = dataclasses.replace(cfg, bias=bias)
    state = hf_gpt2.from_hf_state(weights, shapes, bias)
    with torch.device("meta"):
        GPT(cfg).load_state_dict(state, assign=True)  # names and shapes fit the model MyPT builds
    with training_lock(ckpt_dir):
        recover(ckpt_dir)
        save_checkpoint(ckpt_dir, model_state=state, config=cfg.to_dict(), tokenizer={"kind": "gpt2"},
                        training_state=_import_state(ckpt_dir, hf_dir), optimizer_state=None)
    notes = [] if bias else ["every bias is zero: imported with bias false (no bias parameters)"]
    attn_pdrop = float(hf_gpt2.hf_value(hf, "attn_pdrop", 0.0))
    if attn_pdrop:
        notes.append(f"attn_pdrop {attn_pdrop} dropped: MyPT has no attention dropout "
                     f"(dropout {cfg.dropout} applies to the residual stream)")
    return cfg, notes


def _import_state(ckpt_dir: Path, hf_dir: Path) -> dict[str, Any]:
    return {
        "iteration": 0, "best_val_loss": None, "last_val_loss": None, "last_train_loss": None,
        "tokens_seen": 0, "train_seconds": 0.0,
        "model_name": ckpt_dir.name,
        "input_file": None, "input_sha256": None,
        "tokenizer": "gpt2",
        "imported_from": str(hf_dir.resolve()),
        "note": "imported from a transformers GPT-2 folder; not trained by MyPT yet",
        "versions": versions(),
        "saved_at": now(),
    }


def _problems(hf_dir: Path, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{hf_dir} cannot be imported: {problems[0]}"
    listed = "\n".join(f"  - {p}" for p in problems)
    return f"{hf_dir} cannot be imported ({len(problems)} problems):\n{listed}"
