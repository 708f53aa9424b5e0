"""--tensorboard: scalars under checkpoints/NAME/tensorboard/, read back with EventAccumulator.

The event files live inside the checkpoint folder, so every save moves them into the new folder;
they must survive several saves and a resume, and no row may be lost before the first save.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import require, run_cli, tiny_arch_flags
from forked_cli import ONE_THREAD

require("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from mypt.metrics import MetricsWriter  # noqa: E402

TRAIN_TAGS = ("train/loss", "train/lr", "train/tokens_per_sec", "train/grad_norm")
FLAGS = ["--model_name", "m", "--tokenizer", "char", "--eval_interval", "10", "--eval_iters", "2",
         "--log_interval", "5", "--warmup_iters", "5"]


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_survive_saves_and_a_resume(tmp_path, small_text):
    first = run_cli(*tiny_arch_flags(), *FLAGS, "--input_file", str(small_text), "--max_iters", "20",
                    "--tensorboard", cwd=tmp_path, env=ONE_THREAD)
    assert first.returncode == 0, first.stdout + first.stderr
    folder = tmp_path / "checkpoints" / "m"
    resumed = run_cli("--model_name", "m", "--max_iters", "30", cwd=tmp_path, env=ONE_THREAD)  # flag is saved
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    logdir = folder / "tensorboard"
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 2  # one per run, both kept
    found = scalars(logdir)
    for tag in TRAIN_TAGS:
        assert [step for step, _ in found[tag]] == [5, 10, 15, 20, 25, 30], tag
        assert all(math.isfinite(value) for _, value in found[tag]), tag
    assert all(value > 0 for _, value in found["train/tokens_per_sec"] + found["train/lr"])
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in found["val/loss"]] == [row["iter"] for row in metrics] == [10, 20, 30]
    for (_, value), row in zip(found["val/loss"], metrics, strict=True):
        assert value == pytest.approx(row["val_loss"], rel=1e-6)
    assert not list(tmp_path.joinpath("checkpoints").glob(".m.*")), "a save left a folder behind"


def test_rows_logged_before_the_first_save_are_kept(tmp_path):
    folder = tmp_path / "m"
    writer = MetricsWriter(folder, tensorboard=True, resume_iter=0)
    row = {"loss": 2.5, "lr": 1e-3, "tokens_per_sec": 1000.0, "grad_norm": 0.5}
    writer.train_row({**row, "iter": 5})
    assert not folder.exists(), "the writer must not create the checkpoint folder"
    folder.mkdir()  # what the first save does
    writer.eval_row({"iter": 10, "train_loss": 2.4, "val_loss": 2.6, "lr": 1e-3, "tokens_per_sec": 1.0,
                     "elapsed": 1.0})
    writer.train_row({**row, "iter": 15})
    writer.close()
    found = scalars(folder / "tensorboard")
    assert [step for step, _ in found["train/loss"]] == [5, 15]
    assert found["val/loss"] == [(10, pytest.approx(2.6))]
