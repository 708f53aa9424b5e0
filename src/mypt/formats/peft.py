"""PEFT adapter folders: a LoRA fine-tune's adapters as `peft.PeftModel.from_pretrained` loads
them onto the transformers export of its base model (`mypt export --format hf` of the base, or
the transformers folder it was fine-tuned from).

The folder holds adapter_config.json and adapter_model.safetensors, in the names and layout of
the transformers family that computes the base (hf_gpt2 or hf_llama; each maps its own layers),
and the fine-tune's tokenizer files (its chat template). Where the base had to grow for the chat
tokens (an older checkpoint, an imported folder: training_state.json's finetune.base_vocab_size
is below vocab_size), or where the chat tokens' rows were trained (config.json's lora.tokens),
the adapter also carries the whole embedding and output layer as PEFT's `modules_to_save`; a
grown base is resized to the fine-tune's vocab_size before the adapter loads:

    model = AutoModelForCausalLM.from_pretrained(BASE_HF_DIR)
    model.resize_token_embeddings(VOCAB_SIZE, mean_resizing=False)
    model = PeftModel.from_pretrained(model, ADAPTER_DIR)

peft itself is never imported.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mypt import fsutil
from mypt.build import Built
from mypt.errors import MyPTError
from mypt.finetune.lora import adapted, output_matrices
from mypt.formats.hf import export_family, write_with_weights
from mypt.formats.hf_tokenizer import tokenizer_files

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's names for the wrapped transformers model's tensors


def export_peft(built: Built, out: Path, finetune: dict[str, Any] | None = None) -> list[str]:
    """Write built's LoRA adapters (unmerged: build_model without merge_adapters) as a PEFT folder;
    finetune is training_state.json's record of the base ("finetune"), if any."""
    cfg, lora = built.config, built.config.lora_config
    if lora is None:
        raise MyPTError("--format peft: this model has no LoRA adapters (its config.json has no \"lora\"); "
                        "fine-tune it with mypt finetune --lora_rank R, or export it with --format hf")
    base_cfg = replace(cfg, lora=None)
    family = export_family(base_cfg)
    tensors, modules = {}, set()
    for name, layer in adapted(built.model):
        a, b = layer.lora_A.detach().float().cpu(), layer.lora_B.detach().float().cpu()
        for hf_name, hf_a, hf_b in family.lora_to_hf(name, a, b, base_cfg):
            tensors[f"{PREFIX}{hf_name}.lora_A.weight"] = hf_a.clone()  # a shared A is stored per part
            tensors[f"{PREFIX}{hf_name}.lora_B.weight"] = hf_b.contiguous()
            modules.add(hf_name.rsplit(".", 1)[1])
    base_vocab = _base_vocab_size(finetune, cfg.vocab_size)
    saved = _whole_layers(built, family.EMBEDDING) if base_vocab < cfg.vocab_size or lora.tokens else {}
    tensors |= {PREFIX + name: t for name, t in saved.items()}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "bias": "none",
        "target_modules": sorted(modules), "fan_in_fan_out": family.PEFT_FAN_IN_FAN_OUT,
        "inference_mode": True, "modules_to_save": [n.removesuffix(".weight") for n in saved] or None,
        "use_rslora": False, "use_dora": False,
    }
    files, _ = tokenizer_files(built.tokenizer, cfg.block_size)
    write_with_weights(out, {ADAPTER_CONFIG: fsutil.json_bytes(config), **files}, ADAPTER_WEIGHTS, tensors)
    return [f"{len(modules)} kinds of layer adapted ({', '.join(sorted(modules))}), rank {lora.rank}, alpha "
            f"{lora.alpha:g}; the fine-tune's tokenizer is in the folder too (AutoTokenizer.from_pretrained('{out}'))",
            _loading_note(out, saved, base_vocab, cfg.vocab_size)]


def _loading_note(out: Path, saved: dict[str, torch.Tensor], base_vocab: int, vocab: int) -> str:
    load = f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_HF_DIR), '{out}')"
    if not saved:
        return f"load it onto the transformers export of the base model: {load}"
    layers = ", ".join(name.removesuffix(".weight") for name in saved)
    if base_vocab >= vocab:
        return (f"the chat tokens' rows were trained, so the adapter carries the embedding and output layer "
                f"(modules_to_save: {layers}); load it onto the transformers export of the base model: {load}")
    grew = f"grew from {base_vocab}" if base_vocab else "may have grown (its size is not recorded)"
    return (f"the base's vocabulary {grew} to {vocab} rows for the chat tokens, so the adapter carries "
            f"the embedding and output layer (modules_to_save: {layers}); load it onto the transformers export of the "
            f"base model resized first: model = AutoModelForCausalLM.from_pretrained(BASE_HF_DIR); "
            f"model.resize_token_embeddings({vocab}, mean_resizing=False); PeftModel.from_pretrained(model, '{out}')")


def _base_vocab_size(finetune: dict[str, Any] | None, vocab_size: int) -> int:
    """The base's vocab_size as the fine-tune recorded it, or as the base's config.json (still at
    finetune.base_path) says for a fine-tune that predates the record. A model that is no fine-tune
    has no base to grow from (vocab_size); an unknown base counts as grown (0): its adapter then
    carries the embedding and output layer, which loads right whatever the base's size."""
    if not isinstance(finetune, dict):
        return vocab_size
    recorded = finetune.get("base_vocab_size")
    if isinstance(recorded, int):
        return recorded
    try:
        return int(fsutil.read_json(Path(finetune["base_path"]) / "config.json")["vocab_size"])
    except (MyPTError, OSError, KeyError, TypeError, ValueError):
        return 0


def _whole_layers(built: Built, embedding: str) -> dict[str, torch.Tensor]:
    """The embedding (under the family's name) and the output layer, both whole, their trained
    rows added: PEFT keeps a copy of each (tied in the base or not), and the copies compute what
    MyPT's layers do."""
    wte, head = output_matrices(built.model)
    return {embedding: wte.detach().float().cpu().clone(), "lm_head.weight": head.detach().float().cpu().clone()}
