"""Train a GPT on your text, or resume a model by running the same command again.

examples:
  python train.py --config_file configs/tiny.json --model_name test --input_file input.txt
  python train.py --config_file configs/150M.json --model_name dante --input_file input.txt --max_iters 5000
  python train.py --model_name dante --max_iters 10000          # resume: continues from the checkpoint
  python train.py --model_name books --input_file books/ --input_file 'web/**/*.jsonl.gz'
  python train.py --model_name mix --data mix.json              # named sources with weights
  python train.py --config_file configs/tiny.json --model_name t --input_file in.txt --tokenizer bpe --vocab_size 4096
  torchrun --nproc_per_node=2 train.py --config_file configs/small.json --model_name dante

A new model without --input_file trains on the built-in corpus (Python's own documentation).
The data are prepared once into token shards under CHECKPOINTS_DIR/.cache/ (`mypt prepare` does
that step alone); every document ends with the tokenizer's end-of-text token.
Architecture comes from --config_file (its flags below are then ignored, with a warning);
training flags always come from the command line. On resume the saved config.json wins and the
saved training flags are the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from pathlib import Path
from typing import Any

from mypt.cli.options import DEVICE_HELP, DTYPES, add_checkpoints_dir
from mypt.config import ARCH_FLAGS, OPTIMIZERS, TrainConfig

SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--model_name", required=True, help="checkpoint folder name under --checkpoints_dir")
    p.add_argument("--config_file", help="architecture preset: a path such as configs/tiny.json or a name such as tiny")
    p.add_argument("--input_file", action="append", metavar="PATH",
                   help="what to train on, repeatable: a UTF-8 text file (one document), a folder (searched "
                   "recursively), or a glob ('data/**/*.jsonl'); .jsonl/.json lines and .parquet rows are documents, "
                   ".gz and .zst are read compressed (default for a new model: the built-in corpus; on resume: "
                   "the data the model was trained on)")
    p.add_argument("--text_field", metavar="NAME",
                   help="the JSON field / Parquet column holding the text (default: text)")
    p.add_argument("--data", metavar="MIX.json",
                   help='a mixture: {"sources": [{"name": "prose", "input_file": ["books/"], "weight": 0.7}, ...]}')
    add_checkpoints_dir(p)
    p.add_argument("--tokenizer", metavar="{gpt2,char,bpe,FILE.json}",
                   help="gpt2 (GPT-2's BPE), char (the characters of the text), bpe (a byte-level BPE trained "
                   "on the training part of the text, --vocab_size tokens) or a tokenizer file from "
                   "mypt tokenizer train (default: gpt2)")
    p.add_argument("--vocab_size", type=int, help="tokens of a new --tokenizer bpe, end-of-text included "
                   "(default: 4096); the model's vocab_size is this padded up to a multiple of 64")
    p.add_argument("--allow_data_change", action="store_true",
                   help="on resume, accept an --input_file whose content differs from the one trained on")
    arch = p.add_argument_group("architecture (used when no --config_file is given; default: the tiny preset)")
    for name, kind in (("n_layer", int), ("n_head", int), ("n_embd", int), ("block_size", int),
                       ("batch_size", int), ("dropout", float), ("bias", _bool)):
        arch.add_argument(f"--{name}", type=kind)
    t = p.add_argument_group("training (on resume the saved values are the defaults)")
    helps = {
        "max_iters": "total iterations to train to", "eval_interval": "evaluate and save every N iterations",
        "eval_iters": "batches per evaluation", "log_interval": "print progress every N iterations",
        "learning_rate": "peak learning rate", "min_lr": "final learning rate (default: learning_rate / 10)",
        "warmup_iters": "linear warmup iterations", "lr_decay_iters": "cosine decay ends here (default: max_iters)",
        "weight_decay": "AdamW weight decay on matrices", "beta1": "AdamW beta1", "beta2": "AdamW beta2",
        "grad_clip": "clip the gradient norm to this (0: off)", "grad_accum_steps": "micro-batches per step",
        "muon_lr": "peak learning rate of Muon's matrices (--optimizer muon)",
        "muon_momentum": "Muon's momentum (--optimizer muon)",
        "seed": "seed of batches, dropout and initialisation", "val_split": "fraction of the text held out",
    }
    for f in dataclasses.fields(TrainConfig):
        if f.name in helps:
            kind = int if f.type in ("int", "int | None") else float
            default = getattr(d, f.name)
            t.add_argument(f"--{f.name}", type=kind, help=f"{helps[f.name]} (default: {default})")
    t.add_argument("--optimizer", choices=OPTIMIZERS,
                   help="adamw, or muon: Muon on the blocks' matrices, AdamW (--learning_rate) on embeddings, "
                   "output layer and gains (default: adamw)")
    t.add_argument("--dtype", choices=DTYPES,
                   help="auto: bf16 autocast where the device runs it fast, fp16 on older GPUs, else fp32")
    t.add_argument("--device", default="auto", help=DEVICE_HELP)
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: off)")
    t.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute block activations in backward: less memory, more time (default: off)")
    t.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="write TensorBoard scalars to checkpoints/NAME/tensorboard/ (default: off)")
    t.add_argument("--keep_best", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the weights with the best validation loss in checkpoints/NAME/best/ (default: on; "
                   "--no-keep_best turns it off)")
    t.add_argument("--keep_every", type=int, help="also keep the checkpoint every N iterations in "
                   "checkpoints/NAME/iter_N/ (default: 0, off)")
    t.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimizer state (torchrun only)")
    p.add_argument("--skip_memory_check", action="store_true",
                   help="start even if the estimated training memory exceeds this machine's (or GPU's)")


def run(args: argparse.Namespace) -> int:
    from mypt.train_run import train  # torch and friends load only when training

    try:
        stop = train(
            model_name=args.model_name, checkpoints_dir=Path(args.checkpoints_dir),
            config_file=args.config_file, input_files=args.input_file, tokenizer=args.tokenizer,
            arch_flags={k: getattr(args, k) for k in ARCH_FLAGS}, train_flags=train_flags(args),
            device=args.device, allow_data_change=args.allow_data_change, fsdp=args.fsdp,
            skip_memory_check=args.skip_memory_check, text_field=args.text_field, data_file=args.data,
            vocab_size=args.vocab_size,
        )
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves and returns instead)
        print("\ninterrupted; the checkpoint folder is as it was last saved", file=sys.stderr, flush=True)
        return SIGNAL_EXIT[signal.SIGINT]
    return SIGNAL_EXIT.get(stop.signum, 0) if stop.signum else 0


def train_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The training flags given on the command line (None means: not given)."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
