"""PEFT adapter folders: a LoRA fine-tune's adapters as `peft.PeftModel.from_pretrained` loads
them onto the transformers export of its base model (`mypt export --format hf` of the base).

The folder holds adapter_config.json and adapter_model.safetensors, in the names and layout of
the transformers family that computes the base (hf_gpt2 or hf_llama; each maps its own layers).
peft itself is never imported.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from mypt import fsutil
from mypt.build import Built
from mypt.errors import MyPTError
from mypt.finetune.lora import adapted
from mypt.formats.hf import export_family, write_with_weights

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def export_peft(built: Built, out: Path, base: str | None = None) -> list[str]:
    """Write built's LoRA adapters (unmerged: build_model without merge_adapters) as a PEFT folder."""
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
            tensors[f"base_model.model.{hf_name}.lora_A.weight"] = hf_a.clone()  # a shared A is stored per part
            tensors[f"base_model.model.{hf_name}.lora_B.weight"] = hf_b.contiguous()
            modules.add(hf_name.rsplit(".", 1)[1])
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "bias": "none",
        "target_modules": sorted(modules), "fan_in_fan_out": family.PEFT_FAN_IN_FAN_OUT,
        "inference_mode": True, "modules_to_save": None, "use_rslora": False, "use_dora": False,
    }
    write_with_weights(out, {ADAPTER_CONFIG: fsutil.json_bytes(config)}, ADAPTER_WEIGHTS, tensors)
    return [f"{len(modules)} kinds of layer adapted ({', '.join(sorted(modules))}), rank {lora.rank}, alpha "
            f"{lora.alpha:g}; load it onto the transformers export of the base model: "
            f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_HF_DIR), '{out}')"]
