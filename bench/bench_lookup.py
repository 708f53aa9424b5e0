"""Prompt-lookup decoding (`generate.py --lookup N`): tokens per second with and without it.

usage: python bench/bench_lookup.py [--work DIR] [--model_name NAME --checkpoints_dir DIR]
                                    [--lookup 10] [--new_tokens 300] [--repeats 3] [--threads 2]

1. a char-level Shakespeare model: --model_name in --checkpoints_dir if given; else trained once
   with train.py on builtin:tinyshakespeare into DIR/checkpoints/lookup (shakespeare-char-modern's
   recipe with block_size 256 and batch_size 8, --train_iters iterations: about a minute on an
   idle 2-core CPU), kept for the next run;
2. input-grounded prompts, where the text to write is in the prompt: a passage of the corpus
   followed by its own first lines (the model continues by repeating it), and a passage with
   its speakers renamed followed by the renamed start (editing: copy with a change);
3. free text: a short prompt, greedy, and sampled at temperature 0.8 (the same seed);
4. for each prompt, plain decoding and --lookup N alternate --repeats times, the best of each is
   kept, and the text with lookup is asserted identical to the text without (greedy, and with a
   seed: lookup draws the same tokens).

Prints tokens/s with and without lookup, the ratio, and the share of drafted tokens accepted.
Targets (issue 23): >= 1.5x on input-grounded prompts, >= 0.95x on free text.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _machine import header

from mypt.api import LoadedModel, load_model
from mypt.cli import run_command
from mypt.data.builtin import TINYSHAKESPEARE, builtin_text
from mypt.sampling import Continuation, Decoder, SamplingConfig

PRESET = Path(__file__).resolve().parents[1] / "configs" / "shakespeare-char-modern.json"


def model(args: argparse.Namespace) -> LoadedModel:
    if args.model_name:
        return load_model(args.model_name, args.checkpoints_dir, device="cpu", dtype="fp32")
    work = Path(args.work)
    ckpts = work / "checkpoints"
    if not (ckpts / "lookup" / "model.pt").exists():
        work.mkdir(parents=True, exist_ok=True)
        preset = json.loads(PRESET.read_text(encoding="utf-8"))  # its recipe, with room for a passage and its copy
        config = work / "lookup-char.json"
        config.write_text(json.dumps({**preset, "block_size": 256, "batch_size": 8}), encoding="utf-8")
        flags = ["--config_file", str(config), "--tokenizer", "char", "--input_file", TINYSHAKESPEARE, "--dtype",
                 "fp32", "--model_name", "lookup", "--checkpoints_dir", str(ckpts), "--max_iters",
                 str(args.train_iters), "--eval_interval", str(args.train_iters)]
        print(f"$ mypt train {' '.join(flags)}", flush=True)
        assert run_command("train", flags) == 0, "training the benchmark's model failed"
    return load_model("lookup", ckpts, device="cpu", dtype="fp32")


def prompts(block_size: int) -> list[tuple[str, str, dict]]:
    """(kind, prompt, sampling options): input-grounded ones, then free text."""
    text = builtin_text(TINYSHAKESPEARE)
    passage = text[2000:2000 + block_size - 80]  # the prompt (passage, blank line, 40 characters) fits
    renamed = passage.replace("First Citizen", "Old Man").replace("Second Citizen", "Young Man")
    greedy = dict(temperature=0)
    return [
        ("grounded: repeat a passage", f"{passage}\n\n{passage[:40]}", greedy),
        ("grounded: edit a passage", f"{renamed}\n\n{renamed[:40]}", greedy),
        ("free text, greedy", "ROMEO:\n", greedy),
        ("free text, temperature 0.8", "ROMEO:\n", dict(temperature=0.8, top_k=0, seed=3)),
    ]


def timed(lm: LoadedModel, prompt: str, cfg: SamplingConfig) -> tuple[list[int], float, float]:
    """(new tokens, seconds, share of drafted tokens accepted) of one generation."""
    ids = lm.encode_prompt(prompt)
    c = Continuation(ids, cfg, seed=cfg.seed or 0, vocab_size=lm.tokenizer.sampled_vocab)
    decoder = Decoder(lm.model, 1, capacity=min(len(ids), lm.config.block_size) + cfg.max_new_tokens)  # as generate_ids
    start = time.perf_counter()
    decoder.add(c)
    while c.finish_reason is None:
        decoder.step()
    seconds = time.perf_counter() - start
    rate = c.lookup.accepted / max(1, c.lookup.drafted) if c.lookup else 0.0
    return c.tokens[len(c.tokens) - c.n_new:], seconds, rate


def compare(lm: LoadedModel, prompt: str, options: dict, args: argparse.Namespace) -> tuple[float, float, float]:
    """(plain tokens/s, lookup tokens/s, acceptance), best of --repeats each, outputs asserted equal."""
    base = dict(max_new_tokens=args.new_tokens, ignore_eot=True, **options)
    plain_cfg, fast_cfg = SamplingConfig(**base), SamplingConfig(**base, lookup=args.lookup)
    best_plain = best_fast = float("inf")
    for _ in range(args.repeats):
        plain, s_plain, _ = timed(lm, prompt, plain_cfg)
        fast, s_fast, rate = timed(lm, prompt, fast_cfg)
        assert fast == plain, "lookup changed the text"
        best_plain, best_fast = min(best_plain, s_plain), min(best_fast, s_fast)
    return len(plain) / best_plain, len(fast) / best_fast, rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="bench_lookup_work", help="where the trained model is kept (default: %(default)s)")
    p.add_argument("--model_name", help="a trained char model to use instead (in --checkpoints_dir)")
    p.add_argument("--checkpoints_dir", default="checkpoints")
    p.add_argument("--train_iters", type=int, default=1000, help="iterations of its training (default: %(default)s)")
    p.add_argument("--lookup", type=int, default=10, help="N of --lookup N (default: %(default)s)")
    p.add_argument("--new_tokens", type=int, default=300, help="tokens per generation (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure, best kept (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(header("bench_lookup: prompt-lookup decoding against plain decoding"), flush=True)
    lm = model(args)
    c = lm.config
    print(f"model: {lm.name}, {c.n_layer} layers x {c.n_embd}, block_size {c.block_size}, {c.position} positions, "
          f"{lm.model.num_params() / 1e6:.2f}M parameters; --lookup {args.lookup}, {args.new_tokens} new tokens, "
          f"best of {args.repeats}")
    print(f"\n{'prompt':<30} {'plain tok/s':>12} {'lookup tok/s':>13} {'ratio':>7} {'accepted':>9}")
    with torch.inference_mode():
        for kind, prompt, options in prompts(c.block_size):
            plain, fast, rate = compare(lm, prompt, options, args)
            print(f"{kind:<30} {plain:>12.1f} {fast:>13.1f} {fast / plain:>6.2f}x {rate:>8.0%}", flush=True)
    print("\nthe text with lookup was identical to the text without it in every run")


if __name__ == "__main__":
    main()
