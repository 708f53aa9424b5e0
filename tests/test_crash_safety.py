"""Nothing lost: SIGKILL at many moments, Ctrl-C / SIGTERM, a full disk, two trainers at once.

The SIGKILL test kills a real training process again and again: while it starts, between
iterations, and inside every window of a checkpoint save. MYPT_TEST_SAVE_DELAY (the one test
hook, read in mypt.checkpoint) makes each step of a save pause so a kill lands inside it; the
test watches the save's temporary folder to know which step it is in. After every kill the
model folder, before anything repairs it, holds one whole checkpoint (manifest verified), the
checkpoint loads, progress never goes back, and the next kill is on a run resumed from it.
At the end the model is bitwise the same as one trained without interruption.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import assert_same, corpus_text, snapshot, tiny_arch_flags
from forked_cli import Run, run

from mypt.checkpoint import CHECKPOINT_FILES, load_checkpoint, recover, training_lock
from mypt.errors import MyPTError

TARGET, EVAL = 48, 8
NEVER = 100_000  # a --max_iters no kill-test run reaches
DELAY = 0.2
SLOW_SAVE = {"MYPT_TEST_SAVE_DELAY": str(DELAY)}
FLAGS = [*tiny_arch_flags(), "--dropout", "0.1", "--tokenizer", "char", "--input_file", "input.txt",
         "--eval_interval", str(EVAL), "--eval_iters", "2", "--log_interval", "1", "--device", "cpu",
         "--dtype", "fp32", "--lr_decay_iters", str(TARGET), "--warmup_iters", "4"]
# The files of a save in the order it writes them into its temporary folder.
WRITE_ORDER = ["model.pt", "config.json", "tokenizer.json", "optimizer.pt", "training_state.json"]


def train_flags(max_iters: int = TARGET) -> list[str]:
    return ["--model_name", "m", *FLAGS, "--max_iters", str(max_iters)]


@pytest.fixture
def work(tmp_path: Path, small_text: Path) -> Path:
    small_text.rename(tmp_path / "input.txt")
    return tmp_path


def iteration_of(folder: Path) -> int | None:
    try:
        return json.loads((folder / "training_state.json").read_text())["iteration"]
    except (OSError, ValueError, KeyError):
        return None


def save_step(ckpts: Path, pid: int) -> int | None:
    """Which step of a save process pid is in, judged from its temporary folder; None: not saving.

    0: folder made; 1-5: that many files written (WRITE_ORDER); 6: best/ written beside them;
    7: the trainer's files (metrics.jsonl, loss.png) moved into it; 8: swapped in, the temporary
    folder now holds the old checkpoint.
    """
    tmp = ckpts / f".m~tmp-{pid}"
    try:
        names = set(os.listdir(tmp))
    except FileNotFoundError:
        return None
    if "metrics.jsonl" in names:
        return 7
    for step in range(len(WRITE_ORDER), -1, -1):
        if names - {"best"} == set(WRITE_ORDER[:step]):
            break
    else:
        return None
    if step < 5:
        return step
    new, current = iteration_of(tmp), iteration_of(ckpts / "m")
    if new is None:
        return None  # training_state.json is still being written
    if current is not None and new <= current:
        return 8
    return 6 if (tmp / "best" / "training_state.json").exists() else 5


Trigger = Callable[[Run, Path], bool]


def at_once() -> Trigger:
    return lambda r, ckpts: True


def after_line(prefix: str) -> Trigger:
    return lambda r, ckpts: any(line.startswith(prefix) for line in r.stdout.splitlines())


def at_save_step(step: int) -> Trigger:
    """In that step of a save; step 0: as soon as a save has begun."""
    def trigger(r: Run, ckpts: Path) -> bool:
        now = save_step(ckpts, r.pid)
        return now is not None and (step == 0 or now == step)
    return trigger


def just_after_a_save() -> Trigger:
    """While metrics.jsonl and loss.png are written, right after a save finished."""
    seen = []

    def trigger(r: Run, ckpts: Path) -> bool:
        saving = (ckpts / f".m~tmp-{r.pid}").exists()
        seen.append(saving)
        return not saving and any(seen)
    return trigger


def after_seconds(seconds: float) -> Trigger:
    start: float | None = None

    def trigger(r: Run, ckpts: Path) -> bool:
        nonlocal start
        if start is None:
            start = time.monotonic()  # the first call comes right after the launch
        return time.monotonic() - start >= seconds
    return trigger


def verify_whole(folder: Path) -> None:
    """The folder as it is (nothing repaired yet) holds one complete checkpoint: manifest verified."""
    state = json.loads((folder / "training_state.json").read_text())
    for name in CHECKPOINT_FILES:
        assert (folder / name).is_file(), name
    for name, entry in state["manifest"].items():
        data = (folder / name).read_bytes()
        assert len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"], name


def kill_schedule() -> list[tuple[str, dict, Callable[[int], Trigger]]]:
    """(what, environment, trigger given the iteration the run resumes from)."""
    def a_few_iterations_in(n: int) -> Callable[[int], Trigger]:
        return lambda start: after_line(f"iter {start + n}:")

    points: list[tuple[str, dict, Callable[[int], Trigger]]] = [
        ("while starting up", {}, lambda start: at_once()),
        ("3 iterations in", {}, a_few_iterations_in(3)),
    ]
    first_steps = ["temp folder made", "model.pt written", "config.json written", "tokenizer.json written",
                   "optimizer.pt written", "training_state.json written", "best/ written"]
    points += [(f"first save: {what}", SLOW_SAVE, lambda start, step=step: at_save_step(step))
               for step, what in enumerate(first_steps)]
    points.append(("5 iterations in", {}, a_few_iterations_in(5)))
    later = [*first_steps[:6], None, "metrics.jsonl and loss.png moved into the new folder", "folders swapped"]
    points += [(f"later save: {what}", SLOW_SAVE, lambda start, step=step: at_save_step(step))
               for step, what in enumerate(later) if what is not None]
    points.append(("writing metrics.jsonl and loss.png after a save", SLOW_SAVE, lambda start: just_after_a_save()))
    points.append(("1 iteration in", {}, a_few_iterations_in(1)))
    rng = random.Random(5)
    points += [(f"at a random moment ({s:.2f} s)", SLOW_SAVE, lambda start, s=s: after_seconds(s))
               for s in (rng.uniform(0.05, 1.2) for _ in range(6))]
    points.append(("a save: folders swapped", SLOW_SAVE, lambda start: at_save_step(8)))
    return points


@pytest.mark.slow
def test_sigkill_at_many_moments_loses_nothing(work: Path) -> None:
    """Every kill point is hit (the runs aim far beyond where the kills stop them), then the model is
    trained on to one more save and compared with a run that was never interrupted."""
    ckpts = work / "checkpoints"
    iteration, had_metrics, killed = 0, False, []
    for label, env, make_trigger in kill_schedule():
        trigger = make_trigger(iteration)
        r = Run(*train_flags(NEVER), cwd=work, env=env)
        deadline = time.monotonic() + 90
        while not trigger(r, ckpts):
            assert r.poll() is None, f"{label}: the run ended\n{r.stdout}{r.stderr}"
            assert time.monotonic() < deadline, f"{label}: never reached\n{r.stdout}"
            time.sleep(0.005)
        r.send_signal(signal.SIGKILL)
        assert r.wait() == -signal.SIGKILL
        left = sorted(p.name.replace(str(r.pid), "PID") for p in ckpts.glob(".m.*"))
        killed.append(f"{label} (left {', '.join(left) or 'nothing'}; checkpoint at iteration {{}})")

        if (ckpts / "m").exists():
            verify_whole(ckpts / "m")  # before anything repairs it
        with training_lock(ckpts / "m"):  # what the next train.py does first
            recover(ckpts / "m")
        try:
            ckpt = load_checkpoint(ckpts / "m", with_optimizer=True)
        except MyPTError as exc:
            assert iteration == 0 and "no model named 'm'" in str(exc), f"{label}: {exc}"
            killed[-1] = killed[-1].format("none yet")
            continue
        now = ckpt.training_state["iteration"]
        assert now >= iteration and now % EVAL == 0, f"{label}: iteration {iteration} -> {now}"
        iteration = now
        killed[-1] = killed[-1].format(now)
        leftovers = [p.name for p in ckpts.iterdir() if p.name.startswith(".m.")]
        assert leftovers == [], f"{label}: {leftovers}"
        if had_metrics:
            assert (ckpts / "m" / "metrics.jsonl").is_file(), f"{label}: metrics.jsonl lost"
        had_metrics = (ckpts / "m" / "metrics.jsonl").is_file()

    print(f"\nSIGKILL points: all {len(killed)} hit and survived")
    print("\n".join(killed))
    assert len(killed) == len(kill_schedule())
    end = iteration + EVAL
    final = run(*train_flags(end), cwd=work)
    assert final.returncode == 0, final.stdout + final.stderr
    ref = run("--model_name", "ref", *FLAGS, "--max_iters", str(end), cwd=work)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    for name in ("model.pt", "optimizer.pt"):
        a = torch.load(ckpts / "ref" / name, weights_only=True)
        b = torch.load(ckpts / "m" / name, weights_only=True)
        assert_same(a, b, name)
    assert iteration_of(ckpts / "m") == end
    assert sorted(p.name for p in ckpts.iterdir()) == [".cache", "m", "ref"]


def wait_for(r: Run, prefix: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not after_line(prefix)(r, Path()):
        assert r.poll() is None, r.stdout + r.stderr
        assert time.monotonic() < deadline, r.stdout
        time.sleep(0.005)


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_the_current_iteration_and_says_how_to_resume(work: Path, signum: int, status: int) -> None:
    r = Run(*train_flags(100_000), cwd=work)
    wait_for(r, "iter 5:")
    r.send_signal(signum)
    assert r.wait() == status, r.stdout + r.stderr
    stopped = re.search(r"stopped by signal at iteration (\d+); checkpoint saved. Resume with:\n"
                        r"  python train\.py --model_name m --checkpoints_dir checkpoints\n", r.stdout)
    assert stopped, r.stdout
    assert "Traceback" not in r.stderr
    ckpts = work / "checkpoints"
    assert load_checkpoint(ckpts / "m", with_optimizer=True).training_state["iteration"] == int(stopped[1])
    assert sorted(p.name for p in ckpts.iterdir()) == [".cache", "m"]  # no lock, no temp folder


def test_second_ctrl_c_while_saving_does_not_cut_the_save(work: Path) -> None:
    r = Run(*train_flags(100_000), cwd=work, env=SLOW_SAVE)
    wait_for(r, "iter 3:")
    r.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 60
    while save_step(work / "checkpoints", r.pid) is None:
        assert r.poll() is None and time.monotonic() < deadline, r.stdout + r.stderr
        time.sleep(0.005)
    r.send_signal(signal.SIGINT)
    assert r.wait() == 130, r.stdout + r.stderr
    assert "still saving the checkpoint; please wait" in r.stderr
    stop_at = int(re.search(r"stopped by signal at iteration (\d+)", r.stdout)[1])
    verify_whole(work / "checkpoints" / "m")
    assert iteration_of(work / "checkpoints" / "m") == stop_at


def test_ctrl_c_before_training_starts_is_a_clean_exit(work: Path) -> None:
    (work / "input.txt").write_text(corpus_text(2_000_000) * 3, encoding="utf-8")  # long enough to catch
    r = Run(*train_flags(), cwd=work)
    deadline = time.monotonic() + 60
    while "preparing" not in r.stderr:  # planned; now preparing the data
        assert r.poll() is None and time.monotonic() < deadline, r.stdout + r.stderr
        time.sleep(0.005)
    r.send_signal(signal.SIGINT)
    assert r.wait() == 130, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "interrupted" in r.stderr


@pytest.mark.parametrize(("limit", "failing"), [(60_000, "model.pt"), (150_000, "optimizer.pt")])
def test_full_disk_leaves_the_previous_checkpoint(work: Path, limit: int, failing: str) -> None:
    """RLIMIT_FSIZE makes writes past `limit` bytes fail as on a full disk (model.pt is ~115 KB,
    optimizer.pt ~230 KB)."""
    first = run(*train_flags(EVAL), cwd=work)
    assert first.returncode == 0, first.stdout + first.stderr
    ckpts = work / "checkpoints"
    before = snapshot(ckpts / "m")

    r = run(*train_flags(2 * EVAL), cwd=work, fsize_limit=limit)

    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert (f"error: could not write checkpoint checkpoints/m/ ({failing}: File too large); the previous "
            f"checkpoint (iteration {EVAL}) in checkpoints/m/ is intact; raise the file size limit") in r.stderr
    assert snapshot(ckpts / "m") == before
    assert sorted(p.name for p in ckpts.iterdir()) == [".cache", "m"]
    again = run(*train_flags(2 * EVAL), cwd=work)
    assert again.returncode == 0, again.stdout + again.stderr
    assert iteration_of(ckpts / "m") == 2 * EVAL


def test_second_trainer_on_the_same_model_is_refused(work: Path) -> None:
    first = Run(*train_flags(100_000), cwd=work)
    try:
        wait_for(first, "iter 2:")
        early = run(*train_flags(), cwd=work)
        wait_for(first, f"eval at iter {EVAL}:")  # it saves every 8 iterations: a second would resume
        later = run(*train_flags(), cwd=work)
        for second in (early, later):
            assert second.returncode == 2, second.stdout + second.stderr
            assert (f"error: model 'm' is in use by process {first.pid} on host {socket.gethostname()}; wait "
                    "for it to finish or stop it (lock file checkpoints/.m.lock)") in second.stderr
            assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        assert first.wait() == 130
    assert not (work / "checkpoints" / ".m.lock").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(work: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (work / "checkpoints").mkdir()
    (work / "checkpoints" / ".m.lock").write_text(f"{dead.pid}\n")
    r = run(*train_flags(4), cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr
    assert iteration_of(work / "checkpoints" / "m") == 4
    assert not (work / "checkpoints" / ".m.lock").exists()
