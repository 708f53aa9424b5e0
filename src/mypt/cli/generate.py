"""Continue a prompt with a trained model, printing the text as it is generated.

examples:
  python generate.py --model_name dante --prompt "Nel mezzo del cammin"
  python generate.py --model_name dante --prompt "To be" --temperature 0 --max_new_tokens 100
  python generate.py --model_name dante --prompt_file prompt.txt --num_samples 3 --seed 42
  python generate.py --model_name dante --prompt "Q: why?" --stop "\\n\\n" "Q:"
  python generate.py --model_name dante --prompt_file passage.txt --temperature 0 --lookup 10
  mypt generate --model_name dante     # empty prompt: starts from <|endoftext|> (gpt2) or a newline (char)

The prompt and its continuation go to stdout; notes (seed, speed) go to stderr. The same
--seed, device and dtype give the same text. Each new token sees at most block_size tokens of
context: when the text outgrows it, the context slides in steps, keeping the last
block_size // 2 tokens (a prompt longer than block_size keeps its end).
"""

from __future__ import annotations

import argparse
import sys

from mypt.cli.options import (
    MAX_SAMPLES,
    add_prompt_arguments,
    add_runtime_arguments,
    add_sampling_arguments,
    add_stream_argument,
    check_count,
    read_prompt,
    run_seed,
    sampling_options,
)
from mypt.cli.output import INTERRUPTED, note, used_prompt, write_sample


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_name", required=True, help="checkpoint folder name under --checkpoints_dir")
    add_prompt_arguments(p, "text to continue (default: empty, the start token)")
    p.add_argument("--best", action="store_true", help="use the weights with the best validation loss "
                   "(checkpoints/NAME/best/) instead of the latest")
    p.add_argument("--num_samples", type=int, default=1, help="independent continuations; sample i uses "
                   "seed + i (default: %(default)s)")
    add_sampling_arguments(p)
    p.add_argument("--lookup", type=int, default=0, metavar="N",
                   help="prompt-lookup decoding: each step drafts up to N tokens by finding the text's last few "
                   "tokens earlier in the prompt or output and verifies them in one forward pass; the same text, "
                   "faster where the output repeats its input (quoting, editing, continuing a passage); drafting "
                   "pauses by itself where it does not pay. 0: off (default: %(default)s)")
    add_stream_argument(p)
    add_runtime_arguments(p)


def run(args: argparse.Namespace) -> int:
    from mypt.api import load_model  # torch loads only when a command runs

    check_count("--num_samples", args.num_samples, MAX_SAMPLES)
    prompt, what = read_prompt(args)
    seed = run_seed(args, args.num_samples)
    options = sampling_options(args, seed)
    lm = load_model(args.model_name, args.checkpoints_dir, best=args.best, device=args.device, dtype=args.dtype,
                    quantize=args.quantize)
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
