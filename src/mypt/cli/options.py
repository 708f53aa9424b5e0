"""The options several commands share, defined once, and the reading of their values.

Each command module adds its own flags and calls these for the shared ones, so a flag means the
same everywhere and no command module imports another: the checkpoints folder; the runtime
(--device, --dtype, --quantize); the prompt and the sampling flags of generate, compare and chat; the
training flags of train and finetune; reading a prompt or text file; the seed. Every number a
flag gives is range-checked here or in the dataclass it fills (config.TrainConfig,
sampling.SamplingConfig) before it is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
from pathlib import Path
from typing import Any

from mypt.cli.output import note
from mypt.config import MAX_SEED, OPTIMIZERS, TrainConfig, seed_problem
from mypt.errors import MyPTError
from mypt.fsutil import check_regular_file

DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps"
DTYPES = ("auto", "fp32", "bf16", "fp16")
QUANTIZE = ("int8",)  # mypt.quant.KINDS (not imported: torch loads only when a command runs)
PROMPT_MAX_BYTES = 1 << 20  # a prompt file's tail read: far more than any context window's tokens
MAX_SAMPLES = 10_000  # --num_samples: continuations of one prompt in one command
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}  # a training command stopped by a signal


def folder(text: str) -> str:
    """argparse type of a folder flag: an empty value (an unset shell variable) would silently
    mean the current folder, so it is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path would mean the current folder; name a folder")
    return text


def folder_path(text: str) -> Path:
    """argparse type of a folder flag read as a Path (an empty value refused, as by folder)."""
    return Path(folder(text))


def add_checkpoints_dir(p: argparse.ArgumentParser | argparse._ArgumentGroup, help: str | None = None) -> None:
    p.add_argument("--checkpoints_dir", type=folder, default="checkpoints",
                   help=help or "where model folders live (default: %(default)s)")


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """--checkpoints_dir, --device, --dtype, --quantize (generate, eval, compare, serve)."""
    add_checkpoints_dir(p)
    p.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="autocast precision; auto: fp32 on CPU, bf16 (or fp16) on GPUs (default: %(default)s)")
    p.add_argument("--quantize", choices=QUANTIZE, help="int8: weight-only int8 matrices (per output row), "
                   "for faster decoding on a CPU; the embeddings stay fp32 (default: off, fp32 weights)")


def add_prompt_arguments(p: argparse.ArgumentParser, prompt_help: str) -> None:
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help=prompt_help)
    prompt.add_argument("--prompt_file", help="read the prompt from this UTF-8 file instead")


def add_stream_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print text as it is generated (default: on when stdout is a terminal)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The sampling flags (generate and compare); defaults from SamplingConfig."""
    from mypt.sampling import SamplingConfig  # (with the tokenizers: only for the commands that sample)

    d = SamplingConfig()
    s = p.add_argument_group("sampling")
    s.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens,
                   help="tokens to generate (default: %(default)s)")
    s.add_argument("--temperature", type=float, default=d.temperature,
                   help="randomness: 0 is greedy (always the likeliest token), 1 the model's own "
                   "distribution (default: %(default)s)")
    s.add_argument("--top_k", type=int, default=d.top_k,
                   help="sample only among the k likeliest tokens; 0: off (default: %(default)s)")
    s.add_argument("--top_p", type=float, default=d.top_p,
                   help="sample only among the likeliest tokens holding this much probability; "
                   "1: off (default: %(default)s)")
    s.add_argument("--repetition_penalty", type=float, default=d.repetition_penalty,
                   help="above 1 makes tokens already in the text less likely; 1: off (default: %(default)s)")
    s.add_argument("--seed", type=int, help="random seed; the same seed gives the same text "
                   "(default: a fresh one, shown on stderr)")
    s.add_argument("--stop", nargs="+", default=[], metavar="TEXT",
                   help="stop when the continuation contains one of these strings (not printed); "
                   "\\n and \\t are understood")
    s.add_argument("--ignore_eot", action="store_true",
                   help="keep generating past the end-of-text token (default: the text ends there, as a "
                   "document ends in training)")
    s.add_argument("--cache", action=argparse.BooleanOptionalAction, default=d.use_cache,
                   help="KV cache: one position per new token (--no-cache reruns the whole context "
                   "each token; same output, slower) (default: on)")


def check_count(flag: str, value: int | None, most: int) -> None:
    """A counting flag (None: not given) must be from 1 to most."""
    if value is not None and not 1 <= value <= most:
        limit = "1 or more" if value < 1 else f"at most {most:,}"
        raise MyPTError(f"{flag} ({str(value)[:40]}) must be {limit}")


def unescape(text: str) -> str:
    """Turn the two-character sequences \\n, \\t and \\\\ into newline, tab and backslash."""
    table = {"n": "\n", "t": "\t", "\\": "\\"}
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in table:
            out.append(table[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def run_seed(args: argparse.Namespace, samples: int = 1) -> int:
    """--seed (the one seed check: config.seed_problem), or a fresh seed; samples use seed + i."""
    from mypt.sampling import fresh_seed

    if args.seed is None:
        return fresh_seed()
    problem = seed_problem(args.seed)
    if problem is None and args.seed + samples - 1 > MAX_SEED:
        problem = f"--seed ({args.seed}) + --num_samples ({samples}) - 1 must be at most {MAX_SEED}"
    if problem:
        raise MyPTError(problem)
    return args.seed


def sampling_options(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """The SamplingConfig fields given by the command line, with the seed to use."""
    from mypt.sampling import SamplingConfig, SamplingError

    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=seed,
                   stop=tuple(unescape(s) for s in args.stop), use_cache=args.cache, ignore_eot=args.ignore_eot)
    if getattr(args, "lookup", 0):  # generate.py's --lookup
        options["lookup"] = args.lookup
    try:
        SamplingConfig(**options)  # every bad flag reported before the model is loaded
    except SamplingError as e:
        raise MyPTError(e.named(lambda field: "--cache" if field == "use_cache" else f"--{field}")) from None
    return options


def read_text_file(path: str, flag: str, max_bytes: int | None = None) -> tuple[str, int]:
    """(text, bytes in the file) of a regular UTF-8 file named by a flag: the whole file, or with
    max_bytes only its last max_bytes bytes (from the first whole character on). A file whose
    size reads 0 (procfs) is read to its end, as any file whose size is not known."""
    what = f"{flag} {path}"
    check_regular_file(path, what)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            start = max(0, size - max_bytes) if max_bytes is not None else 0
            f.seek(start)
            data = f.read()
    except OSError as e:
        raise MyPTError(f"{what}: cannot be read ({e.strerror or e})") from None
    if max_bytes is not None and start == 0 and len(data) > max_bytes:  # its size said less than it holds
        start, data = len(data) - max_bytes, data[-max_bytes:]
    skip = 0
    while start and skip < min(3, len(data)) and 0x80 <= data[skip] < 0xC0:  # cut inside a character
        skip += 1
    try:
        return data[skip:].decode("utf-8"), start + len(data)
    except UnicodeDecodeError as e:
        at = start + skip + e.start
        raise MyPTError(f"{what}: not UTF-8 text ({e.reason} at byte {at}); save it as UTF-8") from None


def read_prompt(args: argparse.Namespace) -> tuple[str, str]:
    """(prompt, how to name it): --prompt, or the end of --prompt_file (a huge file is not read whole)."""
    if not args.prompt_file:
        return args.prompt, "prompt"
    what = f"--prompt_file {args.prompt_file}"
    text, size = read_text_file(args.prompt_file, "--prompt_file", PROMPT_MAX_BYTES)
    if size > PROMPT_MAX_BYTES:
        note(f"note: {what} is {size:,} bytes; only its last {PROMPT_MAX_BYTES:,} are read (a model sees at "
             "most block_size tokens of it)")
    return text, what


def add_training_arguments(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """The training flags (TrainConfig's fields and the run's switches); `defaults` (by field) for --help."""
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
            t.add_argument(f"--{f.name}", type=kind, help=f"{helps[f.name]} (default: {defaults[f.name]})")
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


def add_eval_task_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval_task", action="append", metavar="FILE",
                   help="at every evaluation also score a task (a file as mypt eval --task reads, or 'builtin', "
                   "the built-in set) and log its accuracy beside the validation loss; repeatable")


def train_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The training flags given on the command line (None means: not given)."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
