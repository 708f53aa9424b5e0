"""Write a trained model as a Hugging Face transformers folder, or as pickle-free safetensors.

examples:
  mypt export --model_name dante --out exports/dante-hf
  mypt export --model_name dante --format safetensors --out exports/dante-weights

--format hf (the default) writes config.json, model.safetensors and the tokenizer files of the
transformers class that computes the same function: GPT2LMHeadModel for the GPT-2 recipe,
LlamaForCausalLM for rotary positions + RMSNorm + SwiGLU (any n_kv_head, tied or not), and
Qwen3ForCausalLM for the same with qk_norm. A model no class computes (a relu2 MLP, say) is
refused with the fields that differ. With no MyPT code and no network:

  from transformers import AutoModelForCausalLM, AutoTokenizer
  model = AutoModelForCausalLM.from_pretrained("exports/dante-hf")
  tokenizer = AutoTokenizer.from_pretrained("exports/dante-hf")

A LoRA fine-tune (mypt finetune --lora_rank R) exports with its adapters merged into the
weights; --format peft writes the adapters alone (adapter_config.json and
adapter_model.safetensors, and the fine-tune's tokenizer files), which peft loads onto the
--format hf export of the base model (or the transformers folder it was fine-tuned from):

  from peft import PeftModel
  model = AutoModelForCausalLM.from_pretrained("exports/base-hf")
  model.resize_token_embeddings(VOCAB_SIZE, mean_resizing=False)  # only if the export says so
  model = PeftModel.from_pretrained(model, "exports/dante-lora")

The resize is needed where the base grew for the chat tokens (an older checkpoint, an imported
folder): the export then says so and names VOCAB_SIZE, and the adapter carries the grown
embedding and output layer (modules_to_save).

--format safetensors writes MyPT's own folder with model.safetensors in place of model.pt and
no optimizer state (nothing in it is a pickle): mypt.api.load_model(path=DIR) reads it, and so
does generate.py once the folder sits in a checkpoints folder. Training cannot resume from it.
"""

from __future__ import annotations

import argparse

from mypt.cli.options import add_checkpoints_dir, folder_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_name", required=True, help="the model to export (a folder under --checkpoints_dir)")
    add_checkpoints_dir(p)
    p.add_argument("--format", choices=("hf", "safetensors", "peft"), default="hf",
                   help="hf: a transformers folder (GPT-2, Llama or Qwen3; a LoRA fine-tune's adapters merged); "
                        "safetensors: MyPT's weights-only folder; peft: a LoRA fine-tune's adapters as a PEFT "
                        "folder (default: %(default)s)")
    p.add_argument("--best", action="store_true", help="export the weights with the best validation loss "
                   "(checkpoints/NAME/best/) instead of the latest")
    p.add_argument("--out", type=folder_path, required=True,
                   help="folder to create (it must not exist yet, or be empty)")


def run(args: argparse.Namespace) -> int:
    from mypt.build import build_model
    from mypt.checkpoint import best_dir, checkpoint_dir, load_checkpoint
    from mypt.formats.hf import export_hf, export_weights_only
    from mypt.formats.peft import export_peft

    folder = checkpoint_dir(args.checkpoints_dir, args.model_name)
    if args.best:
        folder = best_dir(folder)
    ckpt = load_checkpoint(folder)
    built = build_model(ckpt, merge_adapters=args.format != "peft")
    if args.format == "hf":
        notes = export_hf(built, args.out)
    elif args.format == "peft":
        notes = export_peft(built, args.out, ckpt.training_state.get("finetune"))
    else:
        notes = export_weights_only(built, ckpt.training_state, folder, args.out)
    which = " (best-validation weights)" if args.best else ""
    print(f"exported '{args.model_name}'{which} ({args.format}) to {args.out}/")
    for note in notes:
        print(f"note: {note}")
    return 0
