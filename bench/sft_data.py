"""Chat data with right answers, built from tinyshakespeare (MyPT's builtin:tinyshakespeare).

usage: python bench/sft_data.py [--out DIR] [--n_train 3000] [--n_heldout 300] [--seed 0]

Writes DIR/train.jsonl and DIR/heldout.jsonl, one conversation per line in the "messages" shape
(mypt finetune reads it). Two tasks, each with one right answer taken from the play:

- next speaker: the first lines of two speeches, "Who speaks next?"; the answer is the name of
  the character who speaks the following speech (a model can learn that in a dialogue the
  speaker before last often answers);
- missing word: a line with one word replaced by "...", "Which word is missing?"; the answer is
  that word.

The speeches of the first 90% of the text give the training conversations, those of the last
10% (the part a base trained by train.py holds out for validation) the held-out ones; both are
sampled with --seed, so the same command writes the same files.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from mypt.data.builtin import TINYSHAKESPEARE, builtin_text

SPEECH = re.compile(r"^([A-Z][A-Za-z ]*):\n((?:.+\n?)+)", re.M)
MAX_LINE = 40  # characters of a speech's line in a prompt
SYSTEM = {"next": "Answer with the name of a character.", "word": "Answer with one word."}


def speeches(text: str) -> list[tuple[str, str, int]]:
    """(speaker, first line of the speech, its offset in the text) of every speech."""
    return [(m[1], m[2].splitlines()[0][:MAX_LINE], m.start()) for m in SPEECH.finditer(text)]


def next_speaker(s: list[tuple[str, str, int]], i: int) -> dict:
    (a, la, _), (b, lb, _), (c, _, _) = s[i - 2], s[i - 1], s[i]
    return _chat("next", f"{a}:\n{la}\n\n{b}:\n{lb}\n\nWho speaks next?", c)


def missing_word(s: list[tuple[str, str, int]], i: int, rng: random.Random) -> dict | None:
    line = s[i][1]
    words = list(re.finditer(r"[A-Za-z]{3,}", line))
    if not words:
        return None
    w = rng.choice(words)
    return _chat("word", f"{line[:w.start()]}...{line[w.end():]}\n\nWhich word is missing?", w[0])


def _chat(task: str, question: str, answer: str) -> dict:
    return {"task": task, "messages": [{"role": "system", "content": SYSTEM[task]},
                                       {"role": "user", "content": question},
                                       {"role": "assistant", "content": answer}]}


def build(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training, held-out) conversations, half of each task."""
    text = builtin_text(TINYSHAKESPEARE)
    s = speeches(text)
    cut = int(len(text) * 0.9)
    rng = random.Random(seed)
    out = []
    for part, n in (([i for i in range(2, len(s)) if s[i][2] < cut]), n_train), \
                   (([i for i in range(2, len(s)) if s[i - 2][2] >= cut]), n_heldout):
        chosen = rng.sample(part, min(len(part), n))
        convs = [next_speaker(s, i) for i in chosen[: n // 2]]
        convs += [c for i in chosen[n // 2:] if (c := missing_word(s, i, rng)) is not None]
        rng.shuffle(convs)
        out.append(convs)
    return out[0], out[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("sft_data"))
    p.add_argument("--n_train", type=int, default=3000)
    p.add_argument("--n_heldout", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    train, heldout = build(args.n_train, args.n_heldout, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, convs in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        (args.out / name).write_text("".join(json.dumps(c) + "\n" for c in convs), encoding="utf-8")
        print(f"wrote {args.out / name}: {len(convs)} conversations")


if __name__ == "__main__":
    main()
