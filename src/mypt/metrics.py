"""What a run reports while it trains: the terminal, metrics.jsonl, loss.png, TensorBoard.

Knows the checkpoint folder's metric files but nothing of the loop or the model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mypt import fsutil
from mypt.errors import MyPTError

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"


class Progress:
    """A tqdm bar when stdout is a terminal, plain log lines otherwise; silent on non-main ranks."""

    def __init__(self, start: int, total: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True)
        self.last = start

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        trained = {"trained": f"{row['trained']:.0%}"} if "trained" in row else {}  # a fine-tune's
        if self.bar is not None:
            self.bar.update(row["iter"] - self.last)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_sec']:,.0f}", **trained)
        else:
            print(f"iter {row['iter']}: loss {row['loss']:.4f}, lr {row['lr']:.2e}, "
                  f"{row['tokens_per_sec']:,.0f} tokens/s"
                  + (f", {trained['trained']} of the targets trained on" if trained else ""), flush=True)
        self.last = row["iter"]

    def eval(self, iteration: int, losses: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = f"eval at iter {iteration}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_metrics(ckpt_dir: Path) -> list[dict[str, Any]]:
    path = ckpt_dir / METRICS_FILE
    if not path.exists():
        return []
    fd = fsutil.open_regular(path, str(path), "move it away (it is a log; training starts a new one)")
    with open(fd, encoding="utf-8", errors="replace") as f:
        text = f.read()
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            row = fsutil.parse_json(line, str(path), line=number)
        except MyPTError:
            continue  # a line cut by a crash (or edited past reading): the rest of the file is still good
        if isinstance(row, dict) and isinstance(row.get("iter"), int):
            rows.append(row)
    return rows


class MetricsWriter:
    """Appends eval rows to metrics.jsonl, redraws loss.png, and optionally writes TensorBoard scalars."""

    def __init__(self, ckpt_dir: Path, tensorboard: bool, resume_iter: int) -> None:
        self.ckpt_dir = ckpt_dir
        self.tensorboard = tensorboard
        self.writer = None
        self.resume_iter = resume_iter
        self.pending: list[dict[str, Any]] = []  # train rows logged before the folder exists

    def _tb(self) -> Any:
        if self.writer is None and self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.ckpt_dir / TENSORBOARD_DIR), purge_step=self.resume_iter + 1)
        return self.writer

    def train_row(self, row: dict[str, Any]) -> None:
        if not self.tensorboard:
            return
        self.pending.append(row)
        if self.ckpt_dir.exists():  # a new model's folder appears at its first save
            self._write_train_rows()

    def _write_train_rows(self) -> None:
        tb = self._tb()
        for row in self.pending:
            for key, tag in (("loss", "train/loss"), ("lr", "train/lr"),
                             ("tokens_per_sec", "train/tokens_per_sec"), ("grad_norm", "train/grad_norm")):
                tb.add_scalar(tag, row[key], row["iter"])
        self.pending.clear()
        # The writer appends to its event file by path from a background thread: flush now, so
        # nothing is written while a checkpoint save moves tensorboard/ into the new folder.
        tb.flush()

    def eval_row(self, row: dict[str, Any]) -> None:
        rows = [r for r in read_metrics(self.ckpt_dir) if r["iter"] < row["iter"]] + [row]
        fsutil.atomic_write_bytes(self.ckpt_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows).encode())
        plot_losses(rows, self.ckpt_dir / PLOT_FILE)
        if self.tensorboard:
            self._write_train_rows()
            tb = self._tb()
            tb.add_scalar("val/loss", row["val_loss"], row["iter"])
            tb.add_scalar("eval/train_loss", row["train_loss"], row["iter"])
            for key in task_keys([row]):
                tb.add_scalar(f"tasks/{key}", row[key], row["iter"])
            tb.flush()

    def close(self) -> None:
        if self.pending and self.ckpt_dir.exists():  # stopped by a signal before any eval
            self._write_train_rows()
        if self.writer is not None:
            self.writer.close()


def task_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The --eval_task scores in eval rows: "TASK/acc" (a text task's "TASK/bits_per_byte"), first seen first."""
    return list(dict.fromkeys(k for r in rows for k in r if k.endswith(("/acc", "/bits_per_byte"))))


def plot_losses(rows: list[dict[str, Any]], path: Path) -> None:
    """Train and validation loss by iteration; --eval_task accuracies on a second axis, dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    iters = [r["iter"] for r in rows]
    ax.plot(iters, [r["train_loss"] for r in rows], marker=".", label="train")
    ax.plot(iters, [r["val_loss"] for r in rows], marker=".", label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(path.parent.name)
    ax.grid(alpha=0.3)
    accs = [k for k in task_keys(rows) if k.endswith("/acc")]
    if accs:
        ax2 = ax.twinx()
        for key in accs:
            shown = [r for r in rows if key in r]
            ax2.plot([r["iter"] for r in shown], [r[key] for r in shown], marker=".", linestyle="--", label=key)
        ax2.set_ylabel("task accuracy")
        ax2.legend(loc="upper center", fontsize="small")
    ax.legend()
    try:
        fsutil.atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    finally:
        plt.close(fig)
