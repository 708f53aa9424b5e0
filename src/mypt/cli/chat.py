"""Talk to a chat model (one made by mypt finetune) in the terminal, or through a pipe.

examples:
  mypt chat --model_name dante-chat
  mypt chat --model_name dante-chat --system "Answer with one name." --temperature 0
  printf 'Who speaks first?\\nAnd then?\\n' | mypt chat --model_name dante-chat --seed 1

Each line read from standard input is a user message (\\n in it stands for a newline, \\t for
a tab, \\\\ for a backslash); the reply streams to standard output and ends at the model's
end-of-turn (or after --max_new_tokens). The conversation is kept, rendered
with the model's chat template: when it no longer fits in the context (block_size, with room
for --max_new_tokens), the oldest messages are dropped (a --system message stays). An empty
line is skipped; end of input (Ctrl-D) ends the conversation.
"""

from __future__ import annotations

import argparse
import sys

from mypt.cli.options import add_runtime_arguments, add_sampling_arguments, run_seed, sampling_options, unescape
from mypt.cli.output import INTERRUPTED


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_name", required=True, help="checkpoint folder name under --checkpoints_dir")
    p.add_argument("--best", action="store_true", help="use the weights with the best validation loss "
                   "(checkpoints/NAME/best/) instead of the latest")
    p.add_argument("--system", help="a system message that opens the conversation")
    add_sampling_arguments(p)
    add_runtime_arguments(p)


def run(args: argparse.Namespace) -> int:
    seed = run_seed(args)
    options = sampling_options(args, seed)  # every bad flag reported before the model is loaded
    from mypt.api import load_model
    from mypt.finetune.template import Message, check_template, fit_history

    lm = load_model(args.model_name, args.checkpoints_dir, best=args.best, device=args.device, dtype=args.dtype)
    check_template(lm.tokenizer, f"'{args.model_name}'")
    budget = max(1, lm.config.block_size - args.max_new_tokens)
    history = [Message("system", args.system)] if args.system else []
    interactive = sys.stdin.isatty()
    print(f"chatting with '{lm.name}' (seed {seed}); end with Ctrl-D", file=sys.stderr, flush=True)
    turn = 0
    try:
        while (line := _read(interactive)) is not None:
            if not line.strip():
                continue
            history, _ = fit_history(lm.tokenizer, [*history, Message("user", unescape(line))], budget)
            stream = lm.chat([{"role": m.role, "content": m.content} for m in history],
                             **{**options, "seed": seed + turn})
            reply = []
            for piece in stream:
                print(piece, end="", flush=True)
                reply.append(piece)
            print(flush=True)
            history.append(Message("assistant", "".join(reply)))
            turn += 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return INTERRUPTED
    return 0


def _read(interactive: bool) -> str | None:
    """The next line of standard input without its newline; None at its end."""
    if interactive:
        print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None
