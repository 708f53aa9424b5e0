"""`--task builtin`: a task set made from text MyPT ships, the same on every machine.

Built from the last tenth of tinyshakespeare (`builtin:tinyshakespeare`, checked against its
sha256): the part a run on that single file holds out for validation, so a model trained on it
is scored on text it did not train on. Items are drawn by a fixed seed; contexts are short (the
README's character model has block_size 64).

- shakespeare-words (multiple choice, 4 choices, chance 0.25): the context stops inside a word;
  the true next CHOICE_CHARS characters against three runs of as many characters from elsewhere
  in the text, each also starting inside a word. Spelling alone tells them apart: an early check.
- shakespeare-lines (multiple choice, 4 choices, chance 0.25): the lines before a line break; the
  true next line against three other lines of nearly the same length from elsewhere. The hardest:
  small models score about chance.
- shakespeare-cloze (cloze, chance 0): the context stops after the first 4 letters of a word of 7
  or more; right when the greedy continuation is exactly the rest of the word.

The right choice's place among the four is drawn too, so a model that prefers no choice (every
log-likelihood equal: the first is picked) scores about chance.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

from mypt.evaluation.tasks import CLOZE, MULTIPLE_CHOICE, Item, Task

SEED = 22
ITEMS = 250  # per task: stderr about 0.03 at acc 0.5
CONTEXT_CHARS = 48
CHOICE_CHARS = 12
N_CHOICES = 4


@lru_cache(maxsize=1)
def _held_out() -> str:
    from mypt.data.builtin import TINYSHAKESPEARE, builtin_text

    text = builtin_text(TINYSHAKESPEARE)
    return text[int(len(text) * 0.9):]


def _shuffled(true: str, others: list[str], rng: random.Random) -> tuple[tuple[str, ...], int]:
    answer = rng.randrange(N_CHOICES)
    choices = others[:answer] + [true] + others[answer:]
    return tuple(choices), answer


def _inside_word(text: str, rng: random.Random) -> int:
    """A position between two letters."""
    while True:
        at = rng.randrange(CONTEXT_CHARS, len(text) - CHOICE_CHARS)
        if text[at - 1].isalpha() and text[at].isalpha():
            return at


def words_task() -> Task:
    text, rng = _held_out(), random.Random(f"{SEED}:words")
    items = []
    for _ in range(ITEMS):
        at = _inside_word(text, rng)
        others = []
        for _ in range(N_CHOICES - 1):
            o = _inside_word(text, rng)
            others.append(text[o:o + CHOICE_CHARS])
        choices, answer = _shuffled(text[at:at + CHOICE_CHARS], others, rng)
        items.append(Item(tuple(text[at - CONTEXT_CHARS:at] for _ in choices), choices, answer))
    return Task("shakespeare-words", MULTIPLE_CHOICE, tuple(items), source="builtin")


def lines_task() -> Task:
    lines = _held_out().split("\n")
    speech = [i for i in range(2, len(lines)) if 12 <= len(lines[i]) <= 28 and not lines[i].endswith(":")
              and lines[i - 1]]
    rng = random.Random(f"{SEED}:lines")
    items = []
    for i in rng.sample(speech, ITEMS):
        near = [j for j in speech if abs(len(lines[j]) - len(lines[i])) <= 2 and abs(j - i) > 50]
        others = [lines[j] + "\n" for j in rng.sample(near, N_CHOICES - 1)]
        choices, answer = _shuffled(lines[i] + "\n", others, rng)
        context = ("\n".join(lines[i - 2:i]) + "\n")[-CONTEXT_CHARS:]
        items.append(Item(tuple(context for _ in choices), choices, answer))
    return Task("shakespeare-lines", MULTIPLE_CHOICE, tuple(items), source="builtin")


def cloze_task() -> Task:
    text = _held_out()
    spots = [(m.start() + 4, m.group()[4:]) for m in re.finditer(r"(?<=[ \n])[a-z]{7,}", text)
             if m.start() >= CONTEXT_CHARS]
    rng = random.Random(f"{SEED}:cloze")
    items = [Item((text[s - CONTEXT_CHARS:s],), (rest,), 0) for s, rest in rng.sample(spots, ITEMS)]
    return Task("shakespeare-cloze", CLOZE, tuple(items), source="builtin")


def builtin_tasks() -> list[Task]:
    """The built-in task set, in a fixed order."""
    return [words_task(), lines_task(), cloze_task()]
