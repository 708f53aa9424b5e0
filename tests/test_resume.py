"""Exact resume: training N iterations straight equals training N/2, stopping, and resuming to N.

Compared: the loss printed at every iteration, the eval losses in metrics.jsonl and
training_state.json (full precision), and every tensor of model.pt and optimizer.pt (bitwise,
torch.equal). --lr_decay_iters is fixed so the schedule does not depend on where a run stops.
On CPU, fp32 and bf16 autocast both resume bitwise, with and without dropout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_same, tiny_arch_flags
from forked_cli import ONE_THREAD, run

from mypt import dist

N = 16
SCHEDULE = ["--lr_decay_iters", "40", "--warmup_iters", "4", "--learning_rate", "3e-3"]


def flags(input_file: Path, dropout: float, dtype: str) -> list[str]:
    return [*tiny_arch_flags(), "--dropout", str(dropout), "--dtype", dtype, "--tokenizer", "char",
            "--input_file", str(input_file), "--eval_interval", "8", "--eval_iters", "2",
            "--log_interval", "1", "--device", "cpu", *SCHEDULE]


def train(cwd: Path, name: str, max_iters: int, *args: str) -> str:
    r = run("--model_name", name, "--max_iters", str(max_iters), *args, cwd=cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def logged_losses(*outputs: str) -> dict[int, str]:
    """{iteration: loss as printed} from the progress lines of one or more runs."""
    losses: dict[int, str] = {}
    for out in outputs:
        for it, loss in re.findall(r"^iter (\d+): loss ([\d.]+)", out, re.M):
            assert int(it) not in losses, f"iteration {it} trained twice"
            losses[int(it)] = loss
    return losses


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Same weights, optimizer state, eval losses and progress, bit for bit."""
    for name in ("model.pt", "optimizer.pt"):
        sa = torch.load(a / name, weights_only=True)
        sb = torch.load(b / name, weights_only=True)
        assert_same(sa, sb, name)
    ta, tb = (json.loads((p / "training_state.json").read_text()) for p in (a, b))
    for key in ("iteration", "tokens_seen", "best_val_loss", "last_val_loss", "last_train_loss"):
        assert ta[key] == tb[key], key
    ma, mb = ((p / "metrics.jsonl").read_text().splitlines() for p in (a, b))
    evals = [[(r["iter"], r["train_loss"], r["val_loss"]) for r in map(json.loads, m)] for m in (ma, mb)]
    assert evals[0] == evals[1]


VARIANTS = [pytest.param(0.2, "fp32", id="fp32-dropout"), pytest.param(0.2, "bf16", id="bf16-dropout")]


def trains_in(dtype: str, cwd: Path, small_text: Path) -> bool:
    """Whether this CPU trains in dtype; a CPU without fast bf16 must refuse --dtype bf16 with one
    message before writing anything (then there is no bf16 run to resume)."""
    if dtype != "bf16" or dist.cpu_has_fast_bf16():
        return True
    r = run("--model_name", "refused", "--max_iters", "2", *flags(small_text, 0.0, dtype), cwd=cwd)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--dtype bf16: cpu on this machine has no fast bfloat16 support; use --dtype fp32" in r.stderr
    assert not (cwd / "checkpoints" / "refused").exists()
    return False


@pytest.mark.parametrize(("dropout", "dtype"), VARIANTS)
def test_half_then_resume_equals_straight_run(tmp_path: Path, small_text: Path, dropout: float,
                                              dtype: str) -> None:
    if not trains_in(dtype, tmp_path, small_text):
        return
    f = flags(small_text, dropout, dtype)
    straight = train(tmp_path, "straight", N, *f)
    first = train(tmp_path, "halves", N // 2, *f)
    second = train(tmp_path, "halves", N, *f)
    assert f"resuming 'halves' from iteration {N // 2}" in second

    expected = logged_losses(straight)
    assert sorted(expected) == list(range(1, N + 1))
    assert logged_losses(first, second) == expected
    ckpts = tmp_path / "checkpoints"
    assert_same_checkpoint(ckpts / "straight", ckpts / "halves")


MODERN = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "intermediate_size": 48, "qk_norm": True,
          "n_kv_head": 1, "tie_embeddings": False, "zero_init": True}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_muon_and_modern_architecture_resume_bit_for_bit(tmp_path: Path, small_text: Path, dtype: str) -> None:
    """Muon's momentum and AdamW's moments in optimizer.pt carry a resumed run on exactly."""
    if not trains_in(dtype, tmp_path, small_text):
        return
    config = tmp_path / "modern.json"
    arch = dict(zip(tiny_arch_flags()[::2], tiny_arch_flags()[1::2], strict=True))
    fields = {k[2:]: json.loads(v) for k, v in arch.items()}
    config.write_text(json.dumps({**fields, "vocab_size": 65, **MODERN, "dropout": 0.1}))
    f = [*flags(small_text, 0.1, dtype)[len(tiny_arch_flags()):], "--config_file", str(config),
         "--optimizer", "muon", "--muon_lr", "0.03"]
    straight = train(tmp_path, "straight", N, *f)
    train(tmp_path, "halves", N // 2, *f)
    second = train(tmp_path, "halves", N, *f)
    assert f"resuming 'halves' from iteration {N // 2}" in second
    ckpts = tmp_path / "checkpoints"
    assert_same_checkpoint(ckpts / "straight", ckpts / "halves")
    saved = torch.load(ckpts / "halves" / "optimizer.pt", weights_only=True)["optimizer"]
    kinds = [g["kind"] for g in saved["param_groups"]]
    assert kinds == ["muon", "adamw", "adamw"]
    assert any("momentum_buffer" in s for s in saved["state"].values())
    assert logged_losses(straight)[N] != logged_losses(train(tmp_path, "adamw", N, *f[:-4]))[N]


def test_resume_after_sigint_equals_straight_run(tmp_path: Path, small_text: Path) -> None:
    """A real Ctrl-C at an arbitrary moment: the stopped and resumed run still matches exactly."""
    f = flags(small_text, 0.0, "fp32")
    cmd = [sys.executable, str(REPO / "train.py"), "--model_name", "stopped", "--max_iters", "100000", *f]
    env = {**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("iter 6:") or time.monotonic() > deadline:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    stopped = "".join(lines) + out
    assert proc.returncode == 130, stopped + err
    stop_at = int(re.search(r"stopped by signal at iteration (\d+); checkpoint saved", stopped)[1])
    assert stop_at >= 6
    end = stop_at + 7
    resumed = train(tmp_path, "stopped", end, *f)
    assert f"resuming 'stopped' from iteration {stop_at}" in resumed
    straight = train(tmp_path, "straight", end, *f)

    expected = logged_losses(straight)
    assert sorted(expected) == list(range(1, end + 1))
    assert logged_losses(stopped, resumed) == expected
    ckpts = tmp_path / "checkpoints"
    for name in ("model.pt", "optimizer.pt"):
        a = torch.load(ckpts / "straight" / name, weights_only=True)
        assert_same(a, torch.load(ckpts / "stopped" / name, weights_only=True), name)
