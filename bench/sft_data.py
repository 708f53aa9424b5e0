"""Chat data with right answers, built from tinyshakespeare (MyPT's builtin:tinyshakespeare).

usage: python bench/sft_data.py [--out DIR] [--n_train 3000] [--n_heldout 300] [--seed 0]

Writes DIR/train.jsonl and DIR/heldout.jsonl, one conversation per line in the "messages" shape
(mypt finetune reads it). Three tasks, each with one right answer taken from the play:

- speaker: the first line of a speech after its speaker's name, "Who is speaking?"; the answer
  is that name (read from the prompt);
- last word: a line, "Which word ends this line?"; the answer is its last word (read from the
  prompt);
- next speaker: the first lines of two speeches, "Who speaks next?"; the answer is the name of
  the character who speaks the following speech (a model can learn that in a dialogue the
  speaker before last often answers, but not always: the hardest of the three).

Only the first 90% of the text is used (the part a base trained by train.py trains on; the
characters of the last 10%, The Tempest's, are names a base never saw). Its speeches, in runs of
50, go one run in ten to the held-out conversations and the rest to the training ones, so no
line is in both and the plays and names are shared; both are sampled with --seed, so the same
command writes the same files.
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
RUN = 50  # speeches: one run in ten is held out
SYSTEM = {"speaker": "Answer with the name of a character.", "next": "Answer with the name of a character.",
          "last": "Answer with one word."}
TASKS = tuple(SYSTEM)


def speeches(text: str) -> list[tuple[str, str, int]]:
    """(speaker, first line of the speech, its offset in the text) of every speech."""
    return [(m[1], m[2].splitlines()[0][:MAX_LINE], m.start()) for m in SPEECH.finditer(text)]


def speaker(s: list[tuple[str, str, int]], i: int) -> dict | None:
    name, line, _ = s[i]
    return _chat("speaker", f"{name}:\n{line}\n\nWho is speaking?", name)


def next_speaker(s: list[tuple[str, str, int]], i: int) -> dict | None:
    (a, la, _), (b, lb, _), (c, _, _) = s[i - 2], s[i - 1], s[i]
    return _chat("next", f"{a}:\n{la}\n\n{b}:\n{lb}\n\nWho speaks next?", c)


def last_word(s: list[tuple[str, str, int]], i: int) -> dict | None:
    line = s[i][1]
    words = re.findall(r"[A-Za-z']+", line)
    return _chat("last", f"{line}\n\nWhich word ends this line?", words[-1]) if words else None


MAKERS = {"speaker": speaker, "next": next_speaker, "last": last_word}


def _chat(task: str, question: str, answer: str) -> dict:
    return {"task": task, "messages": [{"role": "system", "content": SYSTEM[task]},
                                       {"role": "user", "content": question},
                                       {"role": "assistant", "content": answer}]}


def build(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training, held-out) conversations, a third of each task."""
    text = builtin_text(TINYSHAKESPEARE)
    s = speeches(text)
    cut = int(len(text) * 0.9)
    rng = random.Random(seed)
    out = []
    usable = [i for i in range(len(s)) if s[i][2] < cut and i % RUN >= 2]  # a next speaker's two speeches in its run
    for part, n in ([i for i in usable if i // RUN % 10 != 9], n_train), ([i for i in usable if i // RUN % 10 == 9],
                                                                          n_heldout):
        convs = []
        for k, task in enumerate(TASKS):
            chosen = rng.sample(part, min(len(part), n // len(TASKS) + (k < n % len(TASKS))))
            convs += [c for i in chosen if (c := MAKERS[task](s, i)) is not None]
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
