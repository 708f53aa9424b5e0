"""Continue a prompt with a trained model, printing the text as it is generated.

examples:
  python generate.py --model_name dante --prompt "Nel mezzo del cammin"
  python generate.py --model_name dante --prompt "To be" --temperature 0 --max_new_tokens 100
  python generate.py --model_name dante --prompt_file prompt.txt --num_samples 3 --seed 42
  python generate.py --model_name dante --prompt "Q: why?" --stop "\\n\\n" "Q:"
  mypt generate --model_name dante     # empty prompt: starts from <|endoftext|> (gpt2) or a newline (char)

The prompt and its continuation go to stdout; notes (seed, speed) go to stderr. The same
--seed, device and dtype give the same text. Each new token sees at most block_size tokens of
context: when the text outgrows it, the context slides in steps, keeping the last
block_size // 2 tokens (a prompt longer than block_size keeps its end).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any, TextIO

from mypt.errors import MyPTError
from mypt.fsutil import check_regular_file
from mypt.sampling import SamplingConfig, SamplingError, TextStream, fresh_seed

if TYPE_CHECKING:
    from mypt.api import LoadedModel

INTERRUPTED = 130


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_name", required=True, help="checkpoint folder name under --checkpoints_dir")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="text to continue (default: empty, the start token)")
    prompt.add_argument("--prompt_file", help="read the prompt from this UTF-8 file instead")
    p.add_argument("--best", action="store_true", help="use the weights with the best validation loss "
                   "(checkpoints/NAME/best/) instead of the latest")
    p.add_argument("--num_samples", type=int, default=1, help="independent continuations; sample i uses "
                   "seed + i (default: %(default)s)")
    add_sampling_arguments(p)
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print text as it is generated (default: on when stdout is a terminal)")
    add_runtime_arguments(p)


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The sampling flags (shared with `mypt compare`); defaults from SamplingConfig."""
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


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """--checkpoints_dir, --device, --dtype (shared with `mypt eval` and `mypt compare`)."""
    p.add_argument("--checkpoints_dir", default="checkpoints", help="where model folders live (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps "
                   "(default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast precision; auto: fp32 on CPU, bf16 (or fp16) on GPUs (default: %(default)s)")


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


def sampling_options(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """The SamplingConfig fields given by the command line, with the seed to use."""
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=seed,
                   stop=tuple(unescape(s) for s in args.stop), use_cache=args.cache, ignore_eot=args.ignore_eot)
    try:
        SamplingConfig(**options)  # every bad flag reported before the model is loaded
    except SamplingError as e:
        raise MyPTError(e.named(lambda field: "--cache" if field == "use_cache" else f"--{field}")) from None
    return options


PROMPT_MAX_BYTES = 1 << 20  # a prompt file's tail read: far more than any context window's tokens


def read_text_file(path: str, flag: str, max_bytes: int | None = None) -> tuple[str, int]:
    """(text, file size) of a regular UTF-8 file named by a flag: the whole file, or with
    max_bytes only its last max_bytes bytes (from the first whole character on)."""
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
    skip = 0
    while start and skip < min(3, len(data)) and 0x80 <= data[skip] < 0xC0:  # cut inside a character
        skip += 1
    try:
        return data[skip:].decode("utf-8"), size
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


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def write_sample(stream: TextStream, prompt: str, out: TextIO, live: bool) -> None:
    """Print prompt and continuation; live: piece by piece as they are generated. Interrupted
    (Ctrl-C), what was generated so far is printed all the same."""
    out.write(prompt)
    out.flush()
    pieces: list[str] = []
    try:
        for piece in stream:
            if live:
                out.write(piece)
                out.flush()
            else:
                pieces.append(piece)
    finally:
        out.write("".join(pieces) + "\n")
        out.flush()


def used_prompt(lm: LoadedModel, prompt: str, what: str) -> str:
    """The part of prompt the model sees (its last block_size tokens), with a note when that is not all."""
    ids, block = lm.encode_prompt(prompt, what), lm.config.block_size
    if len(ids) <= block or not prompt:
        return prompt
    note(f"note: the {what} is {len(ids)} tokens long; '{lm.name}' sees at most {block}, "
         f"so only its last {block} tokens are used (and shown)")
    return lm.tokenizer.decode(ids[-block:])


def run(args: argparse.Namespace) -> int:
    from mypt.api import load_model  # torch loads only when a command runs

    if args.num_samples < 1:
        raise MyPTError(f"--num_samples ({args.num_samples}) must be 1 or more")
    prompt, what = read_prompt(args)
    seed = fresh_seed() if args.seed is None else args.seed
    options = sampling_options(args, seed)
    lm = load_model(args.model_name, args.checkpoints_dir, best=args.best, device=args.device, dtype=args.dtype)
    shown = used_prompt(lm, prompt, what)
    live = sys.stdout.isatty() if args.stream is None else args.stream
    tokens, seconds = 0, 0.0
    try:
        for i in range(args.num_samples):
            if args.num_samples > 1:
                print(f"----- sample {i + 1} of {args.num_samples} (seed {seed + i}) -----", flush=True)
            stream = lm.stream(prompt, **{**options, "seed": seed + i})
            write_sample(stream, shown, sys.stdout, live)
            tokens, seconds = tokens + stream.n_tokens, seconds + stream.seconds
    except KeyboardInterrupt:
        note("interrupted")
        return INTERRUPTED
    speed = f", {tokens / seconds:.1f} tokens/s" if seconds > 0 else ""
    note(f"[{tokens} tokens{speed}; seed {seed}{'' if args.seed is not None else ' (pass --seed to repeat)'}]")
    return 0
