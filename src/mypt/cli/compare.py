"""Continue one prompt with several models: same seed, same settings, one after another.

examples:
  mypt compare --model_name dante_tiny dante_small dante_150M --prompt "Test"
  mypt compare --model_name dante_tiny dante_small --prompt "To be" --temperature 0 --max_new_tokens 100

Each model's text comes under a header naming the model, its size and training iterations,
followed by its generation speed; a summary table ends the output. The sampling flags mean
what they mean for `mypt generate`.
"""

from __future__ import annotations

import argparse
import sys

from mypt.cli.options import (
    add_prompt_arguments,
    add_runtime_arguments,
    add_sampling_arguments,
    add_stream_argument,
    read_prompt,
    run_seed,
    sampling_options,
)
from mypt.cli.output import format_params, used_prompt, write_sample


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_name", nargs="+", required=True, metavar="NAME", help="the models to compare")
    add_prompt_arguments(p, "text to continue (default: empty, each model's start token)")
    add_sampling_arguments(p)
    add_stream_argument(p)
    add_runtime_arguments(p)


def run(args: argparse.Namespace) -> int:
    from mypt.api import load_model
    from mypt.checkpoint import require_models

    prompt, what = read_prompt(args)
    seed = run_seed(args)
    options = sampling_options(args, seed)
    require_models(args.model_name, args.checkpoints_dir)
    live = sys.stdout.isatty() if args.stream is None else args.stream
    print(f"seed {seed}, temperature {args.temperature}, top_k {args.top_k}, top_p {args.top_p}, "
          f"max_new_tokens {args.max_new_tokens}", flush=True)
    rows = []
    for name in args.model_name:
        lm = load_model(name, args.checkpoints_dir, device=args.device, dtype=args.dtype, quantize=args.quantize)
        params = format_params(lm.num_params)
        iters = "?" if lm.iterations is None else f"{lm.iterations:,}"
        print(f"\n===== {name}: {params} parameters, {iters} iterations, {lm.tokenizer.kind} tokenizer =====",
              flush=True)
        shown = used_prompt(lm, prompt, what)
        stream = lm.stream(prompt, **options)
        write_sample(stream, shown, sys.stdout, live)
        print(f"----- {stream.n_tokens} tokens, {stream.tokens_per_second:.1f} tokens/s", flush=True)
        rows.append((name, params, stream.n_tokens, stream.tokens_per_second))
        del lm
    print(f"\n{'model':<20}  {'parameters':>10}  {'tokens':>6}  {'tokens/s':>9}")
    for name, params, n, speed in rows:
        print(f"{name:<20}  {params:>10}  {n:>6}  {speed:>9.1f}")
    return 0
