"""A model folder is never lost to a mistake around it: a folder missing a file is refused, not
trained over; two models' temporary names never meet; a lock or checkpoint file that is a link,
a FIFO, a device or a folder is refused with one message (exit 2) and nothing on disk changes.

Each test runs the real scripts (train.py, generate.py, mypt ...) on a copy of a working folder
holding a tiny trained model `m`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import corpus_text, snapshot, tiny_arch_flags
from forked_cli import run

from mypt import fsutil
from mypt.cli import run_command

TRAIN = ["--tokenizer", "char", *tiny_arch_flags(), "--eval_interval", "4", "--eval_iters", "2", "--device", "cpu"]
RESUME = ["--model_name", "m", "--max_iters", "12", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder with input.txt and a model m trained 8 iterations (best/ and iter_4/ kept)."""
    work = tmp_path_factory.mktemp("trained")
    (work / "input.txt").write_text(corpus_text(20_000), encoding="utf-8")
    r = run("--model_name", "m", "--input_file", "input.txt", "--max_iters", "8", "--keep_every", "4", *TRAIN,
            cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr
    return work


@pytest.fixture
def work(trained: Path, tmp_path: Path) -> Path:
    """A copy of `trained` that a test may spoil (input paths in training_state.json follow it)."""
    work = tmp_path / "work"
    shutil.copytree(trained, work, symlinks=True)
    state = work / "checkpoints" / "m" / "training_state.json"
    state.write_text(state.read_text().replace(str(trained), str(work)))
    return work


def everything(root: Path) -> tuple[dict[str, bytes], list[str]]:
    """Every file's bytes and every path (folders, links, FIFOs too) under root, hidden ones included."""
    return snapshot(root), sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def refused(work: Path, *args: str, script: str = "train.py", timeout: float = 60) -> str:
    """Run a script that must refuse: exit 2, one error line, no traceback, nothing changed. Its stderr."""
    before = everything(work)
    r = run(*args, cwd=work, script=script, timeout=timeout)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert len([line for line in r.stderr.splitlines() if "error:" in line]) == 1, r.stderr
    assert everything(work) == before
    return r.stderr


# ----------------------------------------------------------------------------- a folder missing files


@pytest.mark.parametrize("gone", ["config.json", "model.pt", "tokenizer.json", "training_state.json",
                                  "optimizer.pt"])
def test_a_folder_missing_one_file_is_refused_not_trained_over(work: Path, gone: str) -> None:
    (work / "checkpoints" / "m" / gone).unlink()
    err = refused(work, *RESUME)
    assert f"checkpoints/m is not a complete checkpoint: {gone} missing" in err
    assert "Restore the missing file(s) from a backup, or move the folder away, or pick another --model_name" in err


@pytest.mark.parametrize("kept", ["best", "iter_4", "metrics.jsonl"])
def test_a_folder_holding_only_other_files_is_refused(work: Path, kept: str) -> None:
    folder = work / "checkpoints" / "m"
    for entry in folder.iterdir():
        if entry.name != kept:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    err = refused(work, *RESUME, "--input_file", "input.txt", *TRAIN)
    assert "config.json, model.pt, tokenizer.json, training_state.json missing" in err
    assert f"(it holds {kept}{'/' if (folder / kept).is_dir() else ''})" in err


def test_an_empty_folder_takes_a_new_model(work: Path) -> None:
    (work / "checkpoints" / "fresh").mkdir()
    r = run("--model_name", "fresh", "--input_file", "input.txt", "--max_iters", "4", *TRAIN, cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (work / "checkpoints" / "fresh" / "model.pt").is_file()


def test_inspect_names_what_an_incomplete_folder_lacks(work: Path, capsys: pytest.CaptureFixture) -> None:
    (work / "checkpoints" / "m" / "config.json").unlink()
    assert run_command("inspect", ["--model_name", "m", "--checkpoints_dir", str(work / "checkpoints")]) == 2
    err = capsys.readouterr().err
    assert "checkpoints/m is an incomplete checkpoint: config.json missing; restore" in err
    assert "no model named" not in err


# ----------------------------------------------------------------------------- temporary names


def test_a_model_whose_name_looks_like_a_temp_name_is_left_alone(work: Path) -> None:
    """Model a.tmp-1 with a save in flight (its temp folder, complete, beside it): training and
    resuming model a never takes that folder for one of its own, and a.tmp-1 recovers it later."""
    ckpts = work / "checkpoints"
    other = ckpts / "a.tmp-1"
    shutil.copytree(ckpts / "m", other)
    in_flight = fsutil.temp_path(other)  # what a save of a.tmp-1 killed before its swap leaves:
    shutil.copytree(ckpts / "m", in_flight)
    for name in ("metrics.jsonl", "loss.png"):  # the trainer's files already moved into it
        (other / name).unlink()
    before = everything(other), everything(in_flight)
    for iters in ("4", "8"):  # a new model a, then a resumed one
        r = run("--model_name", "a", "--input_file", "input.txt", "--max_iters", iters, *TRAIN, cwd=work)
        assert r.returncode == 0, r.stdout + r.stderr
        assert (everything(other), everything(in_flight)) == before
    a_before = everything(ckpts / "a")
    assert json.loads((ckpts / "a" / "training_state.json").read_text())["model_name"] == "a"
    r = run("--model_name", "a.tmp-1", "--max_iters", "12", "--device", "cpu", cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not in_flight.exists() and everything(ckpts / "a") == a_before
    assert (other / "loss.png").is_file()  # put back into a.tmp-1, where it belongs


# ----------------------------------------------------------------------------- links where MyPT makes its own files


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(work: Path) -> None:
    outside = work / "precious.txt"
    outside.write_text("not a lock\n")
    (work / "checkpoints" / ".m.lock").symlink_to(outside)
    err = refused(work, *RESUME)
    assert "the lock file checkpoints/.m.lock is not a regular file of its own (a symbolic link)" in err
    assert outside.read_text() == "not a lock\n"


@pytest.mark.parametrize("kind", ["fifo", "folder", "hard link"])
def test_a_lock_file_that_is_not_a_file_of_its_own_is_refused(work: Path, kind: str) -> None:
    lock = work / "checkpoints" / ".m.lock"
    if kind == "fifo":
        os.mkfifo(lock)
    elif kind == "folder":
        lock.mkdir()
    else:
        os.link(work / "input.txt", lock)
    err = refused(work, *RESUME)
    assert "the lock file checkpoints/.m.lock is not a regular file of its own" in err
    assert "remove it (nothing in it is needed) and run again" in err


def test_atomic_write_never_writes_through_a_link_at_its_temp_path(tmp_path: Path) -> None:
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me\n")
    final = tmp_path / "out" / "metrics.jsonl"
    final.parent.mkdir()
    fsutil.temp_path(final).symlink_to(outside)  # planted where this process will write its temp file
    fsutil.atomic_write_bytes(final, b"new\n")
    assert outside.read_text() == "keep me\n"
    assert not final.is_symlink() and final.read_bytes() == b"new\n"
    assert os.listdir(final.parent) == ["metrics.jsonl"]


# ----------------------------------------------------------------------------- checkpoint files that are not files

GENERATE = ["--model_name", "m", "--max_new_tokens", "4", "--seed", "1", "--device", "cpu"]


def spoil(path: Path, kind: str) -> None:
    """Put something that is not a regular file where path was."""
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()


KINDS = {"fifo": "is a FIFO (named pipe), not a regular file", "dev-zero": "is a device or socket, not a regular file",
         "folder": "is a directory, not a regular file"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["model.pt", "config.json", "tokenizer.json", "training_state.json", "best/model.pt"])
def test_generate_refuses_a_checkpoint_file_that_is_not_a_file(work: Path, name: str, kind: str) -> None:
    spoil(work / "checkpoints" / "m" / name, kind)
    best = ["--best"] if name.startswith("best/") else []
    err = refused(work, *GENERATE, *best, script="generate.py", timeout=30)  # a FIFO read would hang: it must not
    assert f"checkpoints/m/{name}: {KINDS[kind]}; put the real file in its place" in err


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["optimizer.pt", "training_state.json", "model.pt"])
def test_resume_refuses_a_checkpoint_file_that_is_not_a_file(work: Path, name: str, kind: str) -> None:
    spoil(work / "checkpoints" / "m" / name, kind)
    err = refused(work, *RESUME, timeout=30)
    assert f"checkpoints/m/{name}: {KINDS[kind]}; put the real file in its place" in err


def test_resume_refuses_a_metrics_log_that_is_not_a_file_before_training(work: Path) -> None:
    spoil(work / "checkpoints" / "m" / "metrics.jsonl", "fifo")  # read at each evaluation: it would hang there
    err = refused(work, *RESUME, timeout=60)
    assert f"checkpoints/m/metrics.jsonl: {KINDS['fifo']}; move it away" in err


@pytest.mark.parametrize("name", ["training_state.json", "model.pt"])
def test_recovery_reads_a_kept_copy_holding_a_fifo_without_waiting(work: Path, name: str) -> None:
    """A killed save's leftover holds a kept copy (iter_100/) the folder lacks, with a FIFO in it:
    recovery finds the copy incomplete (it does not wait on the FIFO), drops it, and training resumes."""
    ckpts = work / "checkpoints"
    leftover = fsutil.temp_path(ckpts / "m")
    shutil.copytree(ckpts / "m" / "iter_4", leftover / "iter_100")
    shutil.copytree(ckpts / "m" / "iter_4", leftover, dirs_exist_ok=True)
    spoil(leftover / "iter_100" / name, "fifo")
    r = run(*RESUME, cwd=work, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not leftover.exists() and not (ckpts / "m" / "iter_100").exists()
    assert json.loads((ckpts / "m" / "training_state.json").read_text())["iteration"] == 12


# ----------------------------------------------------------------------------- a file only training reads


def test_generate_eval_and_export_need_no_optimizer_file(work: Path, capsys: pytest.CaptureFixture) -> None:
    (work / "checkpoints" / "m" / "optimizer.pt").unlink()
    r = run(*GENERATE, "--prompt", "ROMEO:", cwd=work, script="generate.py")
    assert r.returncode == 0 and r.stdout.startswith("ROMEO:"), r.stdout + r.stderr
    ckpts = ["--model_name", "m", "--checkpoints_dir", str(work / "checkpoints")]
    assert run_command("eval", [*ckpts, "--input_file", str(work / "input.txt"), "--device", "cpu"]) == 0
    out = work / "exported"
    assert run_command("export", [*ckpts, "--format", "safetensors", "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    assert "error" not in capsys.readouterr().err
