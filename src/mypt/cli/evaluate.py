"""Measure models: accuracy on tasks, or loss, perplexity and bits per character on one text.

examples:
  mypt eval --model_name dante --task builtin
  mypt eval --model_name dante_tiny dante_small --task hellaswag_val.jsonl --task arc.jsonl --json
  mypt eval --model_name dante --task my_task.jsonl --num_fewshot 3 --limit 500 --plot scores.png
  mypt eval --model_name dante_tiny dante_small --input_file held_out.txt

--task FILE (repeatable): a .jsonl file holds one item a line. Multiple choice is
{"context": "...", "choices": ["...", "..."], "answer": 0}: each choice is appended to the context
as it is (put a leading space in the choices if they need one) and scored by the log-probability
of its tokens; acc picks the highest sum, acc_norm the highest per UTF-8 byte of the choice. A
cloze is {"context": "...", "target": "..."} or {"text": "..."} (its last word is the target):
right when the greedy continuation is exactly the target. The public JSONL files of HellaSwag
(ctx, endings, label), ARC (question, choices.text, answerKey), PIQA (goal, sol1, sol2, label)
and Winogrande (sentence with a _ blank, option1, option2, answer) are read directly (the table
is in mypt/evaluation/tasks.py). Any other file is a text: bits per byte and per character.
`--task builtin` is a task set made from the shipped tinyshakespeare (mypt/evaluation/builtin.py).

The table gives per model and task: n, acc with its standard error, acc_norm, chance (the mean
over items of 1 / number of choices) and the centered score (acc - chance) / (1 - chance), then
each model's average. --json prints one JSON object a line instead, per model and task, with the
keys model, task, kind, n, acc, acc_norm, stderr, acc_norm_stderr, chance, centered, logprob,
bits_per_byte, bits_per_char. A context longer than the model's block_size loses its start.

--input_file: every model reads the same text with its own tokenizer and predicts each of its
tokens once, in non-overlapping windows of its block_size (so early tokens of a window see little
context). Loss (nats per token) and perplexity compare models that share a tokenizer; bits per
character compares any models. Give a text the models were not trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mypt.cli.options import add_runtime_arguments, check_count, read_text_file
from mypt.cli.output import format_params
from mypt.errors import MyPTError

COLUMNS = ("model", "tokenizer", "parameters", "iterations", "tokens", "loss", "perplexity", "bits/char")
WIDTHS = (20, 9, 10, 10, 10, 8, 10, 9)
MAX_CHARS = 1 << 40  # --max_chars: more than any text
MAX_BATCH = 1 << 16  # --batch_size: windows per forward pass
MAX_ITEMS = 1 << 40  # --limit, --num_fewshot


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_name", nargs="+", required=True, metavar="NAME", help="one or more models to evaluate")
    p.add_argument("--task", action="append", metavar="FILE", help="a task file (.jsonl items, or a text), or "
                   "'builtin' (the built-in task set); repeat for several")
    p.add_argument("--input_file", help="UTF-8 text to measure loss and bits per character on (held out from "
                   "training)")
    p.add_argument("--json", action="store_true", help="--task results as one JSON object a line")
    p.add_argument("--num_fewshot", type=int, default=0, help="examples from the same task before each item "
                   "(default: %(default)s)")
    p.add_argument("--limit", type=int, help="evaluate only each task's first N items (default: all)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the few-shot draw (default: %(default)s)")
    p.add_argument("--plot", type=Path, metavar="PNG", help="also draw the --task accuracies as a bar chart")
    p.add_argument("--max_chars", type=int, help="--input_file: use only the first N characters (default: all)")
    p.add_argument("--batch_size", type=int, default=8, help="--input_file: windows per forward pass "
                   "(default: %(default)s)")
    p.add_argument("--best", action="store_true", help="use each model's best-validation weights (its best/), "
                   "not its latest")
    add_runtime_arguments(p)


def format_row(cells: tuple[str, ...]) -> str:
    first = f"{cells[0]:<{WIDTHS[0]}}"
    rest = (f"{c:>{w}}" for c, w in zip(cells[1:], WIDTHS[1:], strict=True))
    return "  ".join((first, *rest))


def _check(args: argparse.Namespace) -> None:
    if not args.task and not args.input_file:
        raise MyPTError("give --task FILE (task accuracy; 'builtin' for the built-in set) or --input_file TEXT "
                        "(loss and bits per character)")
    check_count("--max_chars", args.max_chars, MAX_CHARS)
    check_count("--batch_size", args.batch_size, MAX_BATCH)
    check_count("--limit", args.limit, MAX_ITEMS)
    if not 0 <= args.num_fewshot < MAX_ITEMS:
        raise MyPTError(f"--num_fewshot ({args.num_fewshot}) must be 0 or more")
    if args.plot is not None and not args.task:
        raise MyPTError("--plot draws --task results: give --task too")
    if args.plot is not None and not args.plot.parent.is_dir():
        raise MyPTError(f"--plot {args.plot}: the folder {args.plot.parent} does not exist")


def run(args: argparse.Namespace) -> int:
    from mypt.checkpoint import require_models
    from mypt.evaluation.tasks import load_tasks, prepare

    _check(args)
    tasks = [prepare(t, args.num_fewshot, args.limit, args.seed) for spec in args.task or [] for t in load_tasks(spec)]
    text = read_text_file(args.input_file, "--input_file")[0][: args.max_chars] if args.input_file else None
    require_models(args.model_name, args.checkpoints_dir)
    if text is not None:
        run_text(args, text)
    if tasks:
        run_tasks(args, tasks)
    sys.stdout.flush()
    return 0


def run_text(args: argparse.Namespace, text: str) -> None:
    from mypt.api import load_model

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


def run_tasks(args: argparse.Namespace, tasks: list) -> None:
    from mypt.api import load_model
    from mypt.evaluation.report import average_row, plot_results, table_header, table_row

    if args.input_file:
        print()
    if not args.json:
        print("\n".join(table_header()), flush=True)
    results = []
    for name in args.model_name:
        lm = load_model(name, args.checkpoints_dir, best=args.best, device=args.device, dtype=args.dtype)
        mine = [r for task in tasks for r in lm.evaluate_task(task)]
        for r in mine:
            print(json.dumps(r.to_json()) if args.json else table_row(r), flush=True)
        average = average_row(name, mine)
        if average is not None and not args.json:
            print(average, flush=True)
        results += mine
        del lm
    if args.plot is not None:
        plot_results(results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
