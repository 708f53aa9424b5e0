"""Prompt-lookup decoding (`generate.py --lookup N`): tokens per second with and without it.

usage: python bench/bench_lookup.py [--work DIR] [--lookup 10] [--new_tokens 300] [--repeats 3] [--threads 2]

1. two small models (2 x 128, rotary), each trained once with train.py into DIR/checkpoints and
   kept for the next run:
   - 'lookup': char-level, on builtin:tinyshakespeare (shakespeare-char-modern's recipe with
     block_size 256 and batch_size 8, --train_iters iterations: about a minute): free text;
   - 'lookup-copy': a 1,024-token BPE model of the same size trained on the training part of
     tinyshakespeare written as windows of 60-200 characters, each followed by a copy of itself
     (four passes, other windows each time; --copy_iters iterations, about 6 minutes). It learns
     to copy what its prompt holds (its loss falls steeply around iteration 600, when an
     induction head forms), as a model asked to quote or edit a passage does; a model trained
     on plain text for minutes does not (BENCHMARKS.md);
2. input-grounded prompts from the held-out last tenth of the text, never trained on: a passage
   followed by its start up to a word boundary (the model continues by repeating it), and the
   same with its speakers renamed (editing: a copy with a change); each asks for as many tokens
   as the rest of its passage holds, and a row adds up several passages;
3. free text on the char model: a short prompt, greedy, and sampled at temperature 0.8 (the same seed);
4. for each prompt, plain decoding and --lookup N alternate --repeats times, the best of each is
   kept, and the text with lookup is asserted identical to the text without (greedy, and with a
   seed: lookup draws the same tokens).

Prints tokens/s with and without lookup, the ratio, and the share of drafted tokens accepted.
Targets (issue 23): >= 1.5x on input-grounded prompts, >= 0.95x on free text.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import torch
from _machine import header

from mypt.api import LoadedModel, load_model
from mypt.cli import run_command
from mypt.data.builtin import TINYSHAKESPEARE, builtin_text
from mypt.sampling import Continuation, Decoder, SamplingConfig

PRESET = Path(__file__).resolve().parents[1] / "configs" / "shakespeare-char-modern.json"
PASSAGE_CHARS = 400  # about 150 tokens of the BPE model: the passage, its start and its copy fit in block_size
PASSAGES = (0, 6000, 12000, 18000, 24000, 30000)  # where they start in the held-out text
NAMES = ["HOTSPUR", "MIRANDA", "OBERON", "PORTIA", "SHYLOCK", "TITANIA", "VIOLA", "YORICK"]


def train(work: Path, name: str, fields: dict, flags: list[str]) -> LoadedModel:
    """checkpoints/name in work, trained once (preset's recipe with `fields`), then loaded."""
    ckpts = work / "checkpoints"
    if not (ckpts / name / "model.pt").exists():
        work.mkdir(parents=True, exist_ok=True)
        config = work / f"{name}.json"
        config.write_text(json.dumps({**json.loads(PRESET.read_text(encoding="utf-8")), **fields}), encoding="utf-8")
        flags = ["--config_file", str(config), "--dtype", "fp32", "--model_name", name, "--checkpoints_dir",
                 str(ckpts), *flags]
        print(f"$ mypt train {' '.join(flags)}", flush=True)
        assert run_command("train", flags) == 0, f"training the benchmark's model {name} failed"
    return load_model(name, ckpts, device="cpu", dtype="fp32")


def copy_practice(path: Path, text: str) -> None:
    """Write text as windows of 60-200 characters, each followed by a copy of itself, to path."""
    rng, out = random.Random(0), []
    for _ in range(4):  # other windows each pass, so that copying, not the pairs, is what is learnt
        at = rng.randrange(100)
        while at < len(text):
            window = text[at:at + rng.randrange(60, 200)]
            out.append(f"{window}\n\n{window}\n\n")
            at += len(window)
    path.write_text("".join(out), encoding="utf-8")


def models(args: argparse.Namespace) -> tuple[LoadedModel, LoadedModel]:
    """(the char model for free text, the copying model for grounded prompts)."""
    work = Path(args.work)
    free = train(work, "lookup", {"block_size": 256, "batch_size": 8},
                 ["--tokenizer", "char", "--input_file", TINYSHAKESPEARE, "--max_iters", str(args.train_iters),
                  "--eval_interval", str(args.train_iters)])
    text = builtin_text(TINYSHAKESPEARE)
    data = work / "copy-practice.txt"  # the copying model's training text, written where it is to be trained
    if not (work / "checkpoints" / "lookup-copy" / "model.pt").exists():
        copy_practice(data, text[:int(len(text) * 0.9)])  # the training part
    copier = train(work, "lookup-copy", {"block_size": 256, "batch_size": 16, "vocab_size": 1024},
                   ["--tokenizer", "bpe", "--vocab_size", "1024", "--input_file", str(data), "--max_iters",
                    str(args.copy_iters), "--eval_interval", str(args.copy_iters // 4)])
    return free, copier


def renamed(passage: str) -> str:
    """passage with each speaker ('NAME:' on a line of its own) renamed, the same name each time."""
    speakers = sorted(set(re.findall(r"^([A-Z][A-Z ]+):$", passage, flags=re.M)))
    names = dict(zip(speakers, NAMES, strict=False))
    return re.sub(r"^([A-Z][A-Z ]+):$", lambda m: f"{names.get(m.group(1), m.group(1))}:", passage, flags=re.M)


def grounded(lm: LoadedModel) -> list[tuple[str, list[tuple[str, int]], dict]]:
    """(kind, [(prompt, new tokens)], options) of the input-grounded rows: held-out passages."""
    text = builtin_text(TINYSHAKESPEARE)
    held = text[int(len(text) * 0.9):]
    rows = []
    for kind, change in (("grounded: repeat a passage", lambda p: p), ("grounded: edit a passage", renamed)):
        prompts = []
        for at in PASSAGES:
            passage = change(held[at:at + PASSAGE_CHARS])
            cut = passage.rindex(" ", 0, 40)  # a word boundary: the copy's tokens are the passage's
            prompts.append((f"{passage}\n\n{passage[:cut]}", len(lm.tokenizer.encode(passage[cut:]))))
        rows.append((kind, prompts, dict(temperature=0)))
    return rows


def free_text(new_tokens: int) -> list[tuple[str, list[tuple[str, int]], dict]]:
    return [("free text, greedy", [("ROMEO:\n", new_tokens)], dict(temperature=0)),
            ("free text, temperature 0.8", [("ROMEO:\n", new_tokens)], dict(temperature=0.8, top_k=0, seed=3))]


def timed(lm: LoadedModel, prompt: str, cfg: SamplingConfig) -> tuple[list[int], float, tuple[int, int]]:
    """(new tokens, seconds, (drafted tokens, accepted ones)) of one generation."""
    ids = lm.encode_prompt(prompt)
    c = Continuation(ids, cfg, seed=cfg.seed or 0, vocab_size=lm.tokenizer.sampled_vocab)
    decoder = Decoder(lm.model, 1, capacity=min(len(ids), lm.config.block_size) + cfg.max_new_tokens)  # as generate_ids
    start = time.perf_counter()
    decoder.add(c)
    while c.finish_reason is None:
        decoder.step()
    seconds = time.perf_counter() - start
    counts = (c.lookup.drafted, c.lookup.accepted) if c.lookup else (0, 0)
    return c.tokens[len(c.tokens) - c.n_new:], seconds, counts


def compare(lm: LoadedModel, prompts: list[tuple[str, int]], options: dict,
            args: argparse.Namespace) -> tuple[float, float, float]:
    """(plain tokens/s, lookup tokens/s, acceptance) over the prompts (best of --repeats each),
    outputs asserted equal."""
    tokens = plain_s = fast_s = drafted = accepted = 0
    for prompt, n in prompts:
        base = dict(max_new_tokens=n, ignore_eot=True, **options)
        plain_cfg, fast_cfg = SamplingConfig(**base), SamplingConfig(**base, lookup=args.lookup)
        best_plain = best_fast = float("inf")
        for _ in range(args.repeats):
            plain, s_plain, _ = timed(lm, prompt, plain_cfg)
            fast, s_fast, counts = timed(lm, prompt, fast_cfg)
            assert fast == plain, "lookup changed the text"
            best_plain, best_fast = min(best_plain, s_plain), min(best_fast, s_fast)
        tokens, plain_s, fast_s = tokens + len(plain), plain_s + best_plain, fast_s + best_fast
        drafted, accepted = drafted + counts[0], accepted + counts[1]
    return tokens / plain_s, tokens / fast_s, accepted / max(1, drafted)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="bench_lookup_work", help="where the models are kept (default: %(default)s)")
    p.add_argument("--train_iters", type=int, default=1000, help="the char model's iterations (default: %(default)s)")
    p.add_argument("--copy_iters", type=int, default=2000, help="the copying model's iterations (default: %(default)s)")
    p.add_argument("--lookup", type=int, default=10, help="N of --lookup N (default: %(default)s)")
    p.add_argument("--new_tokens", type=int, default=300, help="tokens per free text (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure, best kept (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(header("bench_lookup: prompt-lookup decoding against plain decoding"), flush=True)
    free, copier = models(args)
    for lm in (copier, free):
        c = lm.config
        print(f"model: {lm.name}, {lm.tokenizer.kind} tokens, {c.n_layer} layers x {c.n_embd}, block_size "
              f"{c.block_size}, {lm.model.num_params() / 1e6:.2f}M parameters")
    print(f"--lookup {args.lookup}, best of {args.repeats}; grounded rows: {len(PASSAGES)} held-out passages of "
          f"{PASSAGE_CHARS} characters each; free text: {args.new_tokens} tokens")
    print(f"\n{'prompt':<30} {'plain tok/s':>12} {'lookup tok/s':>13} {'ratio':>7} {'accepted':>9}")
    rows = [(copier, *row) for row in grounded(copier)] + [(free, *row) for row in free_text(args.new_tokens)]
    with torch.inference_mode():
        for lm, kind, prompts, options in rows:
            plain, fast, rate = compare(lm, prompts, options, args)
            print(f"{kind:<30} {plain:>12.1f} {fast:>13.1f} {fast / plain:>6.2f}x {rate:>8.0%}", flush=True)
    print("\nthe text with lookup was identical to the text without it in every run")


if __name__ == "__main__":
    main()
