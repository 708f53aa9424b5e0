"""Turn a local Hugging Face transformers GPT-2, Llama or Qwen3 folder into a MyPT checkpoint.

examples:
  mypt import --hf_dir ~/models/gpt2 --model_name gpt2
  python train.py --model_name gpt2 --input_file input.txt --max_iters 500   # fine-tune it
  python generate.py --model_name gpt2 --prompt "Once upon a time"

The folder needs config.json (model_type gpt2, llama or qwen3) and model.safetensors (or its
shards); a Llama or Qwen3 folder becomes a rotary, RMSNorm, SwiGLU model (with QK-norm for
Qwen3) of its sizes, its max_position_embeddings the block_size. A folder
with only pytorch_model.bin is refused, because loading it would unpickle. head_dim and a
Llama 3 rope_scaling are kept (Qwen3-0.6B, Llama-3.2-1B). The new checkpoint keeps the folder's
own byte-level BPE tokenizer.json (Llama 3's, Qwen's: its special tokens and the chat template
of tokenizer_config.json; the end-of-text is the model's eos), or GPT-2's vocab.json; a folder
whose tokenizer MyPT cannot read (WordPiece, Unigram, SentencePiece-style), or with no
tokenizer files and a vocab_size other than GPT-2's, is refused. It is at iteration 0 with no
optimizer state yet (training starts a fresh one), and records where it came from. bias is
set to true when any of the folder's biases is nonzero. It has no input file yet: the first
fine-tuning run needs --input_file.
"""

from __future__ import annotations

import argparse

from mypt.cli.options import add_checkpoints_dir, folder_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf_dir", type=folder_path, required=True,
                   help="a transformers GPT-2, Llama or Qwen3 folder on this machine (config.json, "
                   "model.safetensors)")
    p.add_argument("--model_name", required=True, help="name of the new checkpoint folder")
    add_checkpoints_dir(p)


def run(args: argparse.Namespace) -> int:
    from mypt.checkpoint import checkpoint_dir
    from mypt.estimate import count_params
    from mypt.formats.hf import import_hf

    ckpt = checkpoint_dir(args.checkpoints_dir, args.model_name)
    cfg, notes = import_hf(args.hf_dir, ckpt)
    print(f"imported {args.hf_dir} as '{args.model_name}' in {ckpt}/: {count_params(cfg):,} parameters, "
          f"{cfg.n_layer} layers, {cfg.n_embd} wide, block_size {cfg.block_size}, bias {str(cfg.bias).lower()}")
    for note in notes:
        print(f"note: {note}")
    print(f"fine-tune it: python train.py --model_name {args.model_name} --checkpoints_dir {args.checkpoints_dir} "
          "--input_file YOUR_TEXT.txt")
    return 0
