"""The `mypt` command: a table from subcommand to module, and the one place errors become exit 2.

Each subcommand module has a docstring (its --help, with an example), `add_arguments(parser)`
and `run(args) -> int`. The spec's scripts (train.py, generate.py, scripts/*.py) call `main`
with their subcommand, so they are aliases of the same code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mypt.errors import MyPTError, ReportedElsewhere

COMMANDS = {
    "train": "mypt.cli.train",
    "finetune": "mypt.cli.finetune",
    "generate": "mypt.cli.generate",
    "chat": "mypt.cli.chat",
    "configs": "mypt.cli.configs",
    "inspect": "mypt.cli.inspect",
    "eval": "mypt.cli.evaluate",
    "compare": "mypt.cli.compare",
    "export": "mypt.cli.export",
    "import": "mypt.cli.import_hf",
    "prepare": "mypt.cli.prepare",
    "tokenizer": "mypt.cli.tokenizer",
    "serve": "mypt.cli.serve",
}
SUMMARIES = {
    "train": "train a model, or resume one",
    "finetune": "fine-tune a model on conversations into a chat model, or resume one",
    "generate": "sample text from a trained model",
    "chat": "talk to a fine-tuned chat model in the terminal",
    "configs": "list the presets with exact parameter counts and memory estimates",
    "inspect": "show what a checkpoint folder holds",
    "eval": "accuracy of models on tasks, or loss and bits per character on one text",
    "compare": "continue one prompt with several models side by side",
    "export": "write a model as a Hugging Face transformers folder",
    "import": "turn a Hugging Face GPT-2, Llama or Qwen3 folder into a MyPT checkpoint",
    "prepare": "tokenize training data into shards once (train.py does it when needed)",
    "tokenizer": "train a bpe tokenizer on your text, or inspect a tokenizer",
    "serve": "serve models over an OpenAI-compatible HTTP API, with a page for a browser",
}


def build_parser(command: str, prog: str | None = None) -> tuple[argparse.ArgumentParser, object]:
    module = importlib.import_module(COMMANDS[command])
    parser = argparse.ArgumentParser(
        prog=prog or f"mypt {command}",
        description=module.__doc__,
        allow_abbrev=False,  # --lr must not silently mean --lr_decay_iters
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    return parser, module


def run_command(command: str, argv: list[str], prog: str | None = None) -> int:
    """Parse argv for one subcommand and run it; a MyPTError becomes one message and status 2."""
    parser, module = build_parser(command, prog)
    args = parser.parse_args(argv)
    try:
        return module.run(args) or 0
    except MyPTError as e:
        if not isinstance(e, ReportedElsewhere):  # else torchrun's rank 0 printed it
            print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)  # 2: a mistake in the input; a diverged run says 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<10} {SUMMARIES[name]}" for name in COMMANDS]
        usage = "usage: mypt <command> [options]   (mypt <command> --help for each)\n\ncommands:\n"
        print(usage + "\n".join(lines), file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command '{argv[0]}'", file=sys.stderr)
            return 2
        return 0 if argv else 2
    return run_command(argv[0], argv[1:])
