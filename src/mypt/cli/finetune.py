"""Fine-tune a model on conversations into a chat model (full fine-tuning), or resume one.

examples:
  mypt finetune --from dante --model_name dante-chat --input_file chat.jsonl
  mypt finetune --model_name dante-chat                       # resume: continues exactly
  mypt finetune --from dante --model_name dc --input_file 'chats/**/*.jsonl' --epochs 3
  mypt finetune --from ~/models/gpt2 --model_name gpt2-chat --input_file alpaca.jsonl   # a transformers folder
  mypt chat --model_name dante-chat                           # then talk to it

Each line of the data (JSON lines or Parquet rows) is a conversation, in one of three shapes
(detected per file, or set with --format):
  {"messages": [{"role": "system", "content": "..."}, {"role": "user", ...}, {"role": "assistant", ...}]}
  {"prompt": "...", "completion": "..."}
  {"instruction": "...", "input": "...", "output": "..."}           (Alpaca; input may be empty)
The loss counts only the assistant's tokens (and the end-of-turn closing each of its messages).
Conversations are packed into rows of block_size + 1 tokens; about --val_split of them (chosen
by a hash of file and line) are held out for validation.

BASE (--from) is a model in --checkpoints_dir, a checkpoint folder, or a transformers folder
that mypt import reads; it is never changed. NEW (--model_name) is a new checkpoint folder that
records BASE's name and the sha256 of its weights. Everything train.py does applies: evaluation,
best/, --keep_every, Ctrl-C and crash-safe saves, torchrun. The defaults suit fine-tuning and
depend on the data and the base (the run prints them): 2 epochs, a tenth of the base's learning
rate (1e-4 if it records none), no weight decay.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from mypt.cli.options import (
    SIGNAL_EXIT,
    add_checkpoints_dir,
    add_eval_task_argument,
    add_training_arguments,
    train_flags,
)
from mypt.config import TrainConfig
from mypt.errors import MyPTError
from mypt.finetune import DEFAULT_EPOCHS, DEFAULTS
from mypt.finetune.chat_data import FORMATS

HELP_DEFAULTS = {**TrainConfig().to_dict(), **DEFAULTS, "max_iters": "--epochs", "eval_interval": "max_iters / 8",
                 "eval_iters": "the whole validation set, at most 100", "log_interval": "max_iters / 20, at most 10",
                 "warmup_iters": "max_iters / 20, at most 100",
                 "learning_rate": "a tenth of the base's, or 1e-4"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="base", metavar="BASE",
                   help="the model to fine-tune: a name in --checkpoints_dir, a checkpoint folder, or a transformers "
                   "folder (needed to start; on resume it may be left out)")
    p.add_argument("--model_name", required=True, help="the fine-tuned model's folder name under --checkpoints_dir")
    p.add_argument("--input_file", action="append", metavar="PATH",
                   help="the conversations, repeatable: a .jsonl/.json or .parquet file, a folder or a glob "
                   "(.gz and .zst read compressed); on resume: the data it was fine-tuned on")
    p.add_argument("--data", metavar="MIX.json",
                   help='a mixture: {"sources": [{"name": "chat", "input_file": ["chat/"], "weight": 0.7}, ...]}')
    p.add_argument("--format", choices=FORMATS, help="the shape of every line (default: detected per file)")
    p.add_argument("--epochs", type=int, help=f"passes over the training conversations (default: {DEFAULT_EPOCHS}; "
                   "or --max_iters)")
    add_checkpoints_dir(p)
    p.add_argument("--allow_data_change", action="store_true",
                   help="on resume, accept data whose content differs from the data fine-tuned on")
    p.add_argument("--batch_size", type=int, help="rows per micro-batch (default: the base's)")
    p.add_argument("--dropout", type=float, help="dropout while fine-tuning (default: the base's)")
    add_training_arguments(p, HELP_DEFAULTS)
    add_eval_task_argument(p)
    lora = p.add_argument_group("LoRA (without --lora_rank: every weight is fine-tuned)")
    lora.add_argument("--lora_rank", type=int, help="train rank-R adapters on the blocks' linear layers; the base's "
                      "weights stay frozen (no gradients, no optimizer state)")
    lora.add_argument("--lora_alpha", type=float, help="the adapters' update is scaled by alpha / rank "
                      "(default: 2 x --lora_rank)")
    lora.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the adapters' input "
                      "(default: %(default)s)")
    lora.add_argument("--lora_targets", choices=("attn", "mlp", "all"), default="all",
                      help="which linear layers of the blocks get adapters (default: %(default)s)")
    p.add_argument("--skip_memory_check", action="store_true",
                   help="start even if the estimated training memory exceeds this machine's (or GPU's)")


def lora_flags(args: argparse.Namespace) -> dict[str, Any] | None:
    """The LoRA block the --lora_* flags ask for (None: a full fine-tune), checked field by field."""
    from mypt.config import lora_problems

    if args.lora_rank is None:
        if args.lora_alpha is not None or args.lora_dropout or args.lora_targets != "all":
            raise MyPTError("--lora_alpha, --lora_dropout and --lora_targets set LoRA adapters: add --lora_rank R")
        return None
    block = {"rank": args.lora_rank, "alpha": args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank,
             "dropout": args.lora_dropout, "targets": args.lora_targets}
    problems = lora_problems(block)
    if problems:
        raise MyPTError("; ".join(f"--lora_{p}" for p in problems))
    return block


def run(args: argparse.Namespace) -> int:
    from mypt.finetune.run import finetune

    try:
        stop = finetune(
            model_name=args.model_name, base=args.base, checkpoints_dir=Path(args.checkpoints_dir),
            input_files=args.input_file, data_file=args.data, form=args.format, epochs=args.epochs,
            arch_flags={"batch_size": args.batch_size, "dropout": args.dropout}, train_flags=train_flags(args),
            device=args.device, allow_data_change=args.allow_data_change, fsdp=args.fsdp,
            skip_memory_check=args.skip_memory_check, lora=lora_flags(args), eval_tasks=args.eval_task,
        )
    except KeyboardInterrupt:
        print("\ninterrupted; the checkpoint folder is as it was last saved", file=sys.stderr, flush=True)
        return SIGNAL_EXIT[signal.SIGINT]
    return SIGNAL_EXIT.get(stop.signum, 0) if stop.signum else 0
