"""A model's results on tasks: accuracy with its standard error, the random baseline, the centered
score; as a table, JSON lines and a bar chart.

- acc: multiple choice, the share of items whose highest-log-likelihood choice is the answer; a
  cloze, the share whose greedy continuation is exactly the target.
- acc_norm: the same with each choice's log-likelihood divided by its length in UTF-8 bytes.
- stderr: the standard error of acc's mean, sqrt(acc (1 - acc) / (n - 1)), as lm-eval reports it.
- chance: the mean over items of 1 / number of choices (0 for a cloze); centered: (acc - chance) / (1 - chance).
- A text task has bits per byte and bits per character instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mypt.evaluation.scoring import ItemResult, encode_choices, score_items, text_nats
from mypt.evaluation.tasks import MULTIPLE_CHOICE, TEXT, Task
from mypt.model import GPT
from mypt.tokenizers import Tokenizer


def _stderr(values: list[float]) -> float | None:
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


@dataclass
class TaskResult:
    model: str
    task: str
    kind: str
    n: int
    chance: float = 0.0
    items: list[ItemResult] = field(default_factory=list)
    bits_per_byte: float | None = None
    bits_per_char: float | None = None

    def _mean(self, key: str) -> float | None:
        return sum(getattr(i, key) for i in self.items) / self.n if self.items else None

    @property
    def acc(self) -> float | None:
        return self._mean("acc")

    @property
    def acc_norm(self) -> float | None:
        return self._mean("acc_norm") if self.kind == MULTIPLE_CHOICE else None

    @property
    def stderr(self) -> float | None:
        return _stderr([i.acc for i in self.items]) if self.items else None

    @property
    def centered(self) -> float | None:
        return None if self.acc is None else (self.acc - self.chance) / (1 - self.chance)

    @property
    def logprob(self) -> float | None:
        """Mean log-likelihood of the right continuation (nats)."""
        return sum(i.logprobs[i.answer] for i in self.items) / self.n if self.items else None

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "task": self.task, "kind": self.kind, "n": self.n, "acc": self.acc,
                "acc_norm": self.acc_norm, "stderr": self.stderr,
                "acc_norm_stderr": _stderr([i.acc_norm for i in self.items]) if self.acc_norm is not None else None,
                "chance": self.chance if self.kind != TEXT else None, "centered": self.centered,
                "logprob": self.logprob, "bits_per_byte": self.bits_per_byte, "bits_per_char": self.bits_per_char}


def evaluate_task(model: GPT, tok: Tokenizer, task: Task, device: torch.device, dtype: str,
                  model_name: str = "") -> TaskResult:
    """Score model (in eval mode) on task; a text task through mypt.api's text evaluation."""
    if task.kind == TEXT:
        n_tokens, nats = text_nats(model, tok, task.text, device, dtype, f"--task {task.source}")
        n_bytes, n_chars = len(task.text.encode("utf-8")), len(task.text)
        return TaskResult(model_name, task.name, task.kind, n_tokens, bits_per_byte=nats / math.log(2) / n_bytes,
                          bits_per_char=nats / math.log(2) / n_chars)
    items = score_items(model, tok, task.items, device, dtype, f"--task {task.source}")
    return TaskResult(model_name, task.name, task.kind, len(items), task.chance, items)


def task_scores(model: GPT, tok: Tokenizer, tasks: list[Task], device: torch.device, dtype: str) -> dict[str, float]:
    """Each task's acc ("NAME/acc"; a text task's "NAME/bits_per_byte"), the model put in eval mode meanwhile:
    the numbers a training run logs beside its validation loss."""
    was_training = model.training
    model.eval()
    try:
        out = {}
        for task in tasks:
            r = evaluate_task(model, tok, task, device, dtype)
            if r.acc is None:
                out[f"{task.name}/bits_per_byte"] = r.bits_per_byte
            else:
                out[f"{task.name}/acc"] = r.acc
    finally:
        model.train(was_training)
    return out


def check_tasks(tok: Tokenizer, tasks: list[Task]) -> None:
    """Encode every item (a text task's text) once, so a task the tokenizer cannot read stops a run before it trains."""
    for task in tasks:
        if task.kind == TEXT:
            tok.encode(task.text, f"--eval_task {task.source}")
            continue
        for item in task.items:
            where = f"--eval_task {task.source}" + (f" line {item.line}" if item.line else "")
            encode_choices(tok, item.contexts, item.choices, where)


def _cell(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


COLUMNS = ("model", "task", "n", "acc", "stderr", "acc_norm", "chance", "centered", "bits/byte")
WIDTHS = (20, 22, 6, 7, 7, 8, 7, 8, 9)


def _row(cells: tuple[str, ...]) -> str:
    first = [f"{c:<{w}}" for c, w in zip(cells[:2], WIDTHS[:2], strict=True)]
    return "  ".join(first + [f"{c:>{w}}" for c, w in zip(cells[2:], WIDTHS[2:], strict=True)])


def table_header() -> list[str]:
    return [_row(COLUMNS), _row(tuple("-" * w for w in WIDTHS))]


def table_row(r: TaskResult) -> str:
    return _row((r.model, r.task, f"{r.n:,}", _cell(r.acc), _cell(r.stderr), _cell(r.acc_norm),
                 _cell(r.chance if r.kind != TEXT else None), _cell(r.centered), _cell(r.bits_per_byte)))


def average_row(model: str, results: list[TaskResult]) -> str | None:
    """The mean over a model's scored tasks (text tasks aside) of acc, acc_norm, chance and centered."""
    scored = [r for r in results if r.acc is not None]
    if len(scored) < 2:
        return None

    def mean(values: list[float | None]) -> float | None:
        kept = [v for v in values if v is not None]
        return sum(kept) / len(kept) if kept else None

    return _row((model, "average", f"{sum(r.n for r in scored):,}", _cell(mean([r.acc for r in scored])), "-",
                 _cell(mean([r.acc_norm for r in scored])), _cell(mean([r.chance for r in scored])),
                 _cell(mean([r.centered for r in scored])), "-"))


def plot_results(results: list[TaskResult], path: Path) -> None:
    """A bar chart of acc per task, a bar per model, with ±stderr error bars and each task's chance as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mypt import fsutil

    scored = [r for r in results if r.acc is not None]
    tasks = list(dict.fromkeys(r.task for r in scored))
    models = list(dict.fromkeys(r.model for r in scored))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(tasks) * max(1, len(models)) + 2), 4))
    width = 0.8 / max(1, len(models))
    for m, model in enumerate(models):
        mine = {r.task: r for r in scored if r.model == model}
        xs = [t + (m - (len(models) - 1) / 2) * width for t, task in enumerate(tasks) if task in mine]
        rows = [mine[task] for task in tasks if task in mine]
        ax.bar(xs, [r.acc for r in rows], width, yerr=[r.stderr or 0.0 for r in rows], capsize=3, label=model)
    for t, task in enumerate(tasks):
        chance = next(r.chance for r in scored if r.task == task)
        ax.hlines(chance, t - 0.45, t + 0.45, colors="gray", linestyles="dashed")
    ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    ax.set_ylabel("accuracy (dashed: chance)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fsutil.atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"), what=f"--plot {path}")
    finally:
        plt.close(fig)
