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
import signal
import sys
from pathlib import Path

from mypt.cli.options import (
    SIGNAL_EXIT,
    add_checkpoints_dir,
    add_eval_task_argument,
    add_training_arguments,
    train_flags,
)
from mypt.config import ARCH_FLAGS, TrainConfig


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--vocab_size", type=int, help="tokens of a new --tokenizer bpe, end-of-text and the 4 chat "
                   "tokens included (default: 4096); the model's vocab_size is this padded up to a multiple of 64")
    p.add_argument("--allow_data_change", action="store_true",
                   help="on resume, accept an --input_file whose content differs from the one trained on")
    arch = p.add_argument_group("architecture (used when no --config_file is given; default: the tiny preset)")
    for name, kind in (("n_layer", int), ("n_head", int), ("n_embd", int), ("block_size", int),
                       ("batch_size", int), ("dropout", float), ("bias", _bool)):
        arch.add_argument(f"--{name}", type=kind)
    add_training_arguments(p, TrainConfig().to_dict())
    add_eval_task_argument(p)
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
            vocab_size=args.vocab_size, eval_tasks=args.eval_task,
        )
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves and returns instead)
        print("\ninterrupted; the checkpoint folder is as it was last saved", file=sys.stderr, flush=True)
        return SIGNAL_EXIT[signal.SIGINT]
    return SIGNAL_EXIT.get(stop.signum, 0) if stop.signum else 0
