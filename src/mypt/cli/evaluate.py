"""Measure how well models predict one text: loss, perplexity and bits per character.

examples:
  mypt eval --model_name dante_tiny dante_small --input_file held_out.txt
  mypt eval --model_name dante_tiny dante_char --input_file held_out.txt --max_chars 200000

Every model reads the same text with its own tokenizer and predicts each of its tokens once,
in non-overlapping windows of its block_size (so early tokens of a window see little context).
Loss (nats per token) and perplexity compare models that share a tokenizer; bits per character
compares any models. Give a text the models were not trained on.
"""

from __future__ import annotations

import argparse
import sys

from mypt.cli.options import add_runtime_arguments, check_count, read_text_file
from mypt.cli.output import format_params

COLUMNS = ("model", "tokenizer", "parameters", "iterations", "tokens", "loss", "perplexity", "bits/char")
WIDTHS = (20, 9, 10, 10, 10, 8, 10, 9)
MAX_CHARS = 1 << 40  # --max_chars: more than any text
MAX_BATCH = 1 << 16  # --batch_size: windows per forward pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_name", nargs="+", required=True, metavar="NAME", help="one or more models to evaluate")
    p.add_argument("--input_file", required=True, help="UTF-8 text to measure on (held out from training)")
    p.add_argument("--max_chars", type=int, help="use only the first N characters (default: all)")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward pass (default: %(default)s)")
    p.add_argument("--best", action="store_true", help="use each model's best-validation weights (its best/), "
                   "not its latest")
    add_runtime_arguments(p)


def format_row(cells: tuple[str, ...]) -> str:
    first = f"{cells[0]:<{WIDTHS[0]}}"
    rest = (f"{c:>{w}}" for c, w in zip(cells[1:], WIDTHS[1:], strict=True))
    return "  ".join((first, *rest))


def run(args: argparse.Namespace) -> int:
    from mypt.api import load_model
    from mypt.checkpoint import require_models

    check_count("--max_chars", args.max_chars, MAX_CHARS)
    check_count("--batch_size", args.batch_size, MAX_BATCH)
    text = read_text_file(args.input_file, "--input_file")[0][: args.max_chars]
    require_models(args.model_name, args.checkpoints_dir)
    print(f"{args.input_file}: {len(text):,} characters", flush=True)
    print(format_row(COLUMNS))
    print(format_row(tuple("-" * w for w in WIDTHS)), flush=True)
    for name in args.model_name:
        lm = load_model(name, args.checkpoints_dir, best=args.best, device=args.device, dtype=args.dtype,
                    quantize=args.quantize)
        r = lm.evaluate(text, what=f"--input_file {args.input_file}", batch_size=args.batch_size)
        iters = "?" if lm.iterations is None else f"{lm.iterations:,}"
        cells = (name, lm.tokenizer.kind, format_params(lm.num_params), iters, f"{r.n_tokens:,}",
                 f"{r.loss:.4f}", f"{r.perplexity:.2f}", f"{r.bits_per_char:.4f}")
        print(format_row(cells), flush=True)
        del lm
    sys.stdout.flush()
    return 0
