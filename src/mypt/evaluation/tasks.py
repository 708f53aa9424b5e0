"""Task files: what `mypt eval --task FILE` reads, as items of contexts, continuations and an answer.

A file whose name ends in `.jsonl` holds one task item per line (blank lines skipped); any other
file is a text task, measured in bits per byte and per character. Each line is read through the
first row of this table whose marking field it has; every line of a file must be of one kind.

| format     | marked by   | context                            | choices (appended as is)     | answer          |
|------------|-------------|------------------------------------|------------------------------|-----------------|
| MyPT       | `choices`   | `context`                          | `choices`                    | `answer` (index)|
| HellaSwag  | `endings`   | `ctx`                              | " " + each of `endings`      | `label`         |
| ARC        | `answerKey` | "Question: " + `question` + "\\nAnswer:" | " " + each `choices.text` | `choices.label` |
| PIQA       | `goal`      | "Question: " + `goal` + "\\nAnswer:" | " " + `sol1`, " " + `sol2` | `label` (0, 1) |
| Winogrande | `option1`   | `sentence` to its `_`, + each option | " " + the rest, stripped   | `answer` ("1", "2") |
| cloze      | `target`    | `context`                          | `target` (one continuation)  | -               |
| last word  | `text`      | `text` up to its last space        | " " + its last word          | -               |

Multiple choice scores each choice by the log-probability of its tokens given its context; the
choice is appended with no separator, so a task that wants a space puts it in the data (the table's
" " is lm-eval's default `target_delimiter` for those tasks). Winogrande is scored as lm-eval does
("partial scoring"): each option completes the sentence up to the blank, and both are scored on
the same rest of the sentence. ARC's question may also be AI2's object `{"stem", "choices"}`.
HellaSwag's `ctx` is used as it is (lm-eval also prepends `activity_label` and strips bracketed
tags). A label may be a number or a string of digits. A cloze item is right when the greedy
continuation is exactly its target (LAMBADA style).

Few-shot: K other items of the same file, drawn by a fixed seed per item, each written out with
its right answer and followed by a blank line, come before the item's context.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mypt.errors import MyPTError
from mypt.fsutil import check_regular_file, parse_json

MULTIPLE_CHOICE, CLOZE, TEXT = "multiple_choice", "cloze", "text"
FEWSHOT_SEPARATOR = "\n\n"
MAX_TASK_BYTES = 1 << 31


@dataclass(frozen=True)
class Item:
    """One question: choice i is the text choices[i] appended to contexts[i]; `answer` the right one."""

    contexts: tuple[str, ...]
    choices: tuple[str, ...]
    answer: int
    line: int = 0  # in its file (0: made, not read)

    @property
    def example(self) -> str:
        """The item written out with its right answer (a few-shot example)."""
        return self.contexts[self.answer] + self.choices[self.answer]


@dataclass(frozen=True)
class Task:
    """A named list of items of one kind (multiple_choice or cloze), or a text (kind text)."""

    name: str
    kind: str
    items: tuple[Item, ...] = ()
    text: str = ""
    source: str = ""  # the file as given, or how the task was made

    @property
    def chance(self) -> float:
        """The random baseline: the mean over items of 1 / number of choices (0 for a cloze)."""
        if self.kind != MULTIPLE_CHOICE or not self.items:
            return 0.0
        return sum(1 / len(item.choices) for item in self.items) / len(self.items)


def _field(row: dict[str, Any], key: str, where: str) -> Any:
    if key not in row:
        raise MyPTError(f"{where}: the field '{key}' is missing (see `mypt eval --help` for the task formats)")
    return row[key]


def _text(row: dict[str, Any], key: str, where: str) -> str:
    value = _field(row, key, where)
    if not isinstance(value, str):
        raise MyPTError(f"{where}: '{key}' must be a string, not {type(value).__name__}")
    return value


def _texts(value: Any, key: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MyPTError(f"{where}: '{key}' must be a list of strings")
    if not value:
        raise MyPTError(f"{where}: '{key}' is an empty list; an item needs at least one choice")
    return value


def _index(value: Any, n: int, key: str, where: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise MyPTError(f"{where}: '{key}' must be the index of the right choice (a whole number)")
    if not 0 <= value < n:
        raise MyPTError(f"{where}: '{key}' is {value}, out of range for {n} choices (0 to {n - 1})")
    return value


def _shared(context: str, choices: list[str], answer: int) -> Item:
    return Item(tuple(context for _ in choices), tuple(choices), answer)


def _mypt(row: dict[str, Any], where: str) -> Item:
    context = _text(row, "context", where)
    choices = _texts(_field(row, "choices", where), "choices", where)
    return _shared(context, choices, _index(_field(row, "answer", where), len(choices), "answer", where))


def _hellaswag(row: dict[str, Any], where: str) -> Item:
    endings = _texts(_field(row, "endings", where), "endings", where)
    answer = _index(_field(row, "label", where), len(endings), "label", where)
    return _shared(_text(row, "ctx", where), [" " + e for e in endings], answer)


def _arc(row: dict[str, Any], where: str) -> Item:
    question, choices = _field(row, "question", where), row.get("choices")
    if isinstance(question, dict):  # AI2's own files: {"question": {"stem": ..., "choices": [{text, label}]}}
        choices = {"text": [c.get("text") for c in question.get("choices", []) if isinstance(c, dict)],
                   "label": [c.get("label") for c in question.get("choices", []) if isinstance(c, dict)]}
        question = _text(question, "stem", f"{where}: 'question'")
    if not isinstance(question, str):
        raise MyPTError(f"{where}: 'question' must be a string")
    if not isinstance(choices, dict):
        raise MyPTError(f"{where}: the field 'choices' must be an object with 'text' and 'label' lists")
    texts = _texts(choices.get("text"), "choices.text", where)
    labels = choices.get("label")
    if not isinstance(labels, list) or len(labels) != len(texts):
        raise MyPTError(f"{where}: 'choices.label' must be a list as long as 'choices.text'")
    key = _field(row, "answerKey", where)
    if key not in labels:
        raise MyPTError(f"{where}: 'answerKey' {json.dumps(key)} is not one of choices.label {labels}")
    return _shared(f"Question: {question}\nAnswer:", [" " + t for t in texts], labels.index(key))


def _piqa(row: dict[str, Any], where: str) -> Item:
    sols = [_text(row, "sol1", where), _text(row, "sol2", where)]
    answer = _index(_field(row, "label", where), 2, "label", where)
    return _shared(f"Question: {_text(row, 'goal', where)}\nAnswer:", [" " + s for s in sols], answer)


def _winogrande(row: dict[str, Any], where: str) -> Item:
    sentence = _text(row, "sentence", where)
    if "_" not in sentence:
        raise MyPTError(f"{where}: 'sentence' has no '_' blank for the options to fill")
    options = [_text(row, "option1", where), _text(row, "option2", where)]
    answer = _index(_field(row, "answer", where), 3, "answer", where)
    if answer == 0:
        raise MyPTError(f"{where}: 'answer' must be \"1\" or \"2\" (the option that fills the blank)")
    blank = sentence.index("_")
    rest = " " + sentence[blank + 1:].strip()
    return Item(tuple(sentence[:blank] + o for o in options), (rest, rest), answer - 1)


def _cloze(row: dict[str, Any], where: str) -> Item:
    target = _text(row, "target", where)
    if not target:
        raise MyPTError(f"{where}: 'target' is empty; a cloze item needs text to predict")
    return Item((_text(row, "context", where),), (target,), 0)


def _last_word(row: dict[str, Any], where: str) -> Item:
    text = _text(row, "text", where)
    if " " not in text.strip():
        raise MyPTError(f"{where}: 'text' needs at least two words: its last word is the target")
    context, word = text.rsplit(" ", 1)
    return Item((context,), (" " + word,), 0)


# (marking field, format name, kind, reader): the first row whose field a line has reads it
FORMATS: tuple[tuple[str, str, str, Callable[[dict[str, Any], str], Item]], ...] = (
    ("endings", "HellaSwag", MULTIPLE_CHOICE, _hellaswag),
    ("answerKey", "ARC", MULTIPLE_CHOICE, _arc),
    ("goal", "PIQA", MULTIPLE_CHOICE, _piqa),
    ("option1", "Winogrande", MULTIPLE_CHOICE, _winogrande),
    ("choices", "MyPT", MULTIPLE_CHOICE, _mypt),
    ("target", "cloze", CLOZE, _cloze),
    ("text", "last word", CLOZE, _last_word),
)


def read_item(row: Any, where: str) -> tuple[str, Item]:
    """(kind, item) of one parsed line."""
    if not isinstance(row, dict):
        raise MyPTError(f"{where}: each line must be a JSON object, e.g. "
                        '{"context": "...", "choices": ["...", "..."], "answer": 0}')
    for key, _name, kind, reader in FORMATS:
        if key in row:
            return kind, reader(row, where)
    if "context" in row:
        raise MyPTError(f"{where}: the field 'choices' is missing (with 'answer': multiple choice), "
                        "or 'target' (a cloze)")
    raise MyPTError(f"{where}: none of the known task fields: 'context' + 'choices' + 'answer', 'context' + "
                    "'target', 'text', or those of HellaSwag, ARC, PIQA, Winogrande (see `mypt eval --help`)")


def read_task(path: str) -> Task:
    """The task in file `path` (see the module docstring)."""
    what = f"--task {path}"
    check_regular_file(path, what, MAX_TASK_BYTES)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise MyPTError(f"{what}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise MyPTError(f"{what}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    name = Path(path).name.removesuffix(".jsonl")
    if not path.endswith(".jsonl"):
        if not text:
            raise MyPTError(f"{what} is empty: there is nothing to evaluate")
        return Task(name, TEXT, text=text, source=path)
    kind, items = None, []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        line_kind, item = read_item(parse_json(line, path, line=number), where)
        if kind is not None and line_kind != kind:
            raise MyPTError(f"{where}: a {line_kind.replace('_', ' ')} item in a file of {kind.replace('_', ' ')} "
                            "items; keep one kind of task per file")
        kind = line_kind
        items.append(replace(item, line=number))
    if not items:
        raise MyPTError(f"{what} holds no items (one JSON object a line)")
    return Task(name, kind, tuple(items), source=path)


def load_tasks(spec: str) -> list[Task]:
    """The tasks `--task spec` names: `builtin` (the built-in set) or a file."""
    if spec == "builtin":
        from mypt.evaluation.builtin import builtin_tasks

        return builtin_tasks()
    return [read_task(spec)]


def limit(task: Task, n: int | None) -> Task:
    """The task's first n items (all with None); a text task is kept whole."""
    return task if n is None or task.kind == TEXT else replace(task, items=task.items[:n])


def with_fewshot(task: Task, k: int, seed: int, pool: tuple[Item, ...] | None = None) -> Task:
    """Each item's contexts preceded by k other items of `pool` (default: the task's own) with their answers.

    The examples of item i are drawn by random.Random(f"{seed}:{i}"): the same on every run and machine.
    """
    if k == 0 or task.kind == TEXT:
        return task
    pool = task.items if pool is None else pool
    if k >= len(pool):
        raise MyPTError(f"--num_fewshot {k}: {task.name} has {len(pool)} items, so at most {len(pool) - 1} "
                        "others can be examples")
    items = []
    for i, item in enumerate(task.items):
        others = [j for j in range(len(pool)) if pool[j] is not item]
        shots = random.Random(f"{seed}:{i}").sample(others, k)
        prefix = "".join(pool[j].example + FEWSHOT_SEPARATOR for j in shots)
        items.append(replace(item, contexts=tuple(prefix + c for c in item.contexts)))
    return replace(task, items=tuple(items))


def prepare(task: Task, num_fewshot: int = 0, n: int | None = None, seed: int = 1234) -> Task:
    """The task as evaluated: its first n items, each with num_fewshot examples drawn from all its items."""
    return with_fewshot(limit(task, n), num_fewshot, seed, pool=task.items)


def lm_eval_yaml(name: str, data: Path | str) -> str:
    """An lm-evaluation-harness task (YAML) that reads a MyPT multiple-choice file as it is: the
    choice appended to the context with no separator (`target_delimiter: ""`), as `mypt eval
    --task` scores it, with acc and acc_norm."""
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {Path(data).resolve()}\n"
            "test_split: test\noutput_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
            'doc_to_target: answer\ntarget_delimiter: ""\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
