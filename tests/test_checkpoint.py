"""Tests for mypt.checkpoint: atomic save, best and kept copies, recovery, single-read loading, names, the lock."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_same, fix_manifest, snapshot

from mypt import checkpoint as ck
from mypt import fsutil
from mypt.errors import MyPTError

EXTRAS = {
    "metrics.jsonl": b'{"iter": 1, "loss": 3.2}\n',
    "loss.png": b"\x89PNG\r\n\x1a\nnot-really-a-png",
    "tensorboard/events.out.tfevents.1": b"\x00\x01event-bytes",
}


def _payload(iteration: int = 10, scale: float = 1.0, width: int = 8) -> dict[str, Any]:
    return {
        "model_state": {
            "wte.weight": torch.arange(width * 4, dtype=torch.float32).reshape(width, 4) * scale,
            "ln.bias": torch.full((4,), scale),
        },
        "config": {"n_layer": 2, "n_embd": 4, "vocab_size": width},
        "tokenizer": {"kind": "char", "chars": "abc\u00e9"},
        "training_state": {"iteration": iteration, "best_val_loss": 1.25},
        "optimizer_state": {
            "state": {0: {"step": torch.tensor(float(iteration)), "exp_avg": torch.zeros(4)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0]}],
        },
    }


def _save(ckpt: Path, iteration: int = 10, best: bool = False, keep: bool = False, **kw: Any) -> dict[str, Any]:
    payload = _payload(iteration, **kw)
    ck.save_checkpoint(ckpt, **payload, best=best, keep=keep)
    return payload


def _write_extras(ckpt: Path) -> None:
    for rel, data in EXTRAS.items():
        (ckpt / rel).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / rel).write_bytes(data)


def _assert_extras(ckpt: Path) -> None:
    for rel, data in EXTRAS.items():
        assert (ckpt / rel).read_bytes() == data, rel


def _hidden_entries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return tmp_path / "checkpoints" / "m"


# ----------------------------------------------------------------------------- round trip


def test_round_trip(ckpt: Path) -> None:
    payload = _save(ckpt, iteration=7)
    assert sorted(os.listdir(ckpt)) == sorted(ck.CHECKPOINT_FILES)
    assert payload["training_state"] == {"iteration": 7, "best_val_loss": 1.25}  # not mutated

    loaded = ck.load_checkpoint(ckpt, with_optimizer=True)

    assert_same(loaded.model_state, payload["model_state"], "model_state")
    assert loaded.config == payload["config"]
    assert loaded.tokenizer == payload["tokenizer"]
    assert loaded.path == ckpt and loaded.has_optimizer
    opt = loaded.optimizer_state
    assert opt is not None and opt["param_groups"] == payload["optimizer_state"]["param_groups"]
    assert torch.equal(opt["state"][0]["step"], torch.tensor(7.0))
    state = loaded.training_state
    assert state["iteration"] == 7 and state["format_version"] == ck.FORMAT_VERSION
    manifest = state["manifest"]
    assert set(manifest) == set(ck.CHECKPOINT_FILES) - {"training_state.json"}
    for name, entry in manifest.items():
        data = (ckpt / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert json.loads((ckpt / "config.json").read_text()) == payload["config"]
    assert (ckpt / "config.json").read_text().startswith('{\n  "n_layer"')  # indent=2
    assert _hidden_entries(ckpt.parent) == []


def test_each_file_is_read_once_and_optimizer_only_when_asked(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(ckpt)
    reads: list[str] = []
    real_read = ck._Folder.read
    monkeypatch.setattr(ck._Folder, "read", lambda self, name, *a: reads.append(name) or real_read(self, name, *a))
    opened: list[str] = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))

    assert ck.load_checkpoint(ckpt).optimizer_state is None
    assert sorted(reads) == ["config.json", "model.pt", "tokenizer.json", "training_state.json"]
    reads.clear()
    assert ck.load_checkpoint(ckpt, with_optimizer=True).optimizer_state is not None
    assert sorted(reads) == ["config.json", "model.pt", "optimizer.pt", "tokenizer.json", "training_state.json"]
    assert not [f for f in opened if str(ckpt) in f]  # nothing opened again by path after the check


def test_a_save_during_a_load_never_mixes_two_checkpoints(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder is swapped after training_state.json was read: the files still come from one folder."""
    _save(ckpt, iteration=1)
    real_read = ck._Folder.read
    swapped = []

    def read(self: Any, name: str, *args: Any) -> bytes:
        if name == "model.pt" and not swapped:
            swapped.append(True)
            _save(ckpt, iteration=2, scale=2.0)  # a trainer saves meanwhile
        return real_read(self, name, *args)

    monkeypatch.setattr(ck._Folder, "read", read)
    loaded = ck.load_checkpoint(ckpt, with_optimizer=True)
    iteration = loaded.training_state["iteration"]
    scale = {1: 1.0, 2: 2.0}[iteration]
    assert torch.equal(loaded.model_state["ln.bias"], torch.full((4,), scale))
    assert torch.equal(loaded.optimizer_state["state"][0]["step"], torch.tensor(float(iteration)))


def test_extras_survive_two_saves(ckpt: Path) -> None:
    _save(ckpt, iteration=1)
    _write_extras(ckpt)
    with open(ckpt / "metrics.jsonl", "ab") as log:  # the trainer keeps its log open
        _save(ckpt, iteration=2, scale=2.0)
        _save(ckpt, iteration=3, scale=3.0)
        log.write(b"after\n")
    assert (ckpt / "metrics.jsonl").read_bytes() == EXTRAS["metrics.jsonl"] + b"after\n"
    assert (ckpt / "loss.png").read_bytes() == EXTRAS["loss.png"]
    assert (ckpt / "tensorboard/events.out.tfevents.1").read_bytes() == EXTRAS["tensorboard/events.out.tfevents.1"]
    loaded = ck.load_checkpoint(ckpt)
    assert loaded.training_state["iteration"] == 3
    assert torch.equal(loaded.model_state["ln.bias"], torch.full((4,), 3.0))
    assert _hidden_entries(ckpt.parent) == []


def test_temp_files_of_a_killed_write_are_not_carried(ckpt: Path) -> None:
    _save(ckpt, iteration=1)
    _write_extras(ckpt)
    (ckpt / ".metrics.jsonl~tmp-4242").write_bytes(b"half a metrics file")  # a metrics write killed midway
    _save(ckpt, iteration=2)
    assert not (ckpt / ".metrics.jsonl~tmp-4242").exists()
    _assert_extras(ckpt)


def test_extras_survive_without_renameat2(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsutil, "_renameat2", lambda: None)  # use the rename-away fallback
    _save(ckpt, iteration=1)
    _write_extras(ckpt)
    _save(ckpt, iteration=2, best=True)
    _save(ckpt, iteration=3)
    _assert_extras(ckpt)
    assert ck.load_checkpoint(ckpt).training_state["iteration"] == 3
    assert ck.load_checkpoint(ck.best_dir(ckpt)).training_state["iteration"] == 2
    assert _hidden_entries(ckpt.parent) == []


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2 is Linux's")
def test_exchange_swaps_two_folders(tmp_path: Path) -> None:
    assert fsutil._renameat2() is not None, "this C library has no renameat2: folder swaps fall back to renames"
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("from a")
    (tmp_path / "b").mkdir()
    assert fsutil.exchange(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / "x").read_text() == "from a"
    assert os.listdir(tmp_path / "a") == []


def test_fallback_failed_rename_in_restores_old(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsutil, "_renameat2", lambda: None)
    _save(ckpt, iteration=1)
    _write_extras(ckpt)
    before = snapshot(ckpt)
    real_rename = os.rename

    def rename(src: Any, dst: Any) -> None:
        if Path(src).name.startswith(".m~tmp-") and not Path(src).name.endswith("-old") and Path(dst) == ckpt:
            assert not ckpt.exists()  # the old checkpoint is parked, not deleted
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(MyPTError, match="Input/output error.*iteration 1"):
        _save(ckpt, iteration=2)
    monkeypatch.undo()
    assert snapshot(ckpt) == before
    assert _hidden_entries(ckpt.parent) == []


def test_without_optimizer_state_no_optimizer_file(ckpt: Path) -> None:
    payload = _payload(0)
    ck.save_checkpoint(ckpt, **{**payload, "optimizer_state": None})
    assert "optimizer.pt" not in os.listdir(ckpt)
    loaded = ck.load_checkpoint(ckpt, with_optimizer=True)
    assert loaded.optimizer_state is None and not loaded.has_optimizer
    _save(ckpt, iteration=1)  # the next save writes one
    assert ck.load_checkpoint(ckpt, with_optimizer=True).has_optimizer


# ----------------------------------------------------------------------------- best and kept copies


def test_best_is_kept_beside_the_latest_and_costs_no_copy(ckpt: Path) -> None:
    _save(ckpt, iteration=10, best=True)
    assert sorted(os.listdir(ckpt / "best")) == ["config.json", "model.pt", "tokenizer.json", "training_state.json"]
    assert os.stat(ckpt / "best" / "model.pt").st_ino == os.stat(ckpt / "model.pt").st_ino  # a hard link
    _save(ckpt, iteration=20, scale=2.0)  # validation got worse: best/ stays at iteration 10
    _save(ckpt, iteration=30, scale=3.0)
    best = ck.load_checkpoint(ck.best_dir(ckpt))
    assert best.training_state["iteration"] == 10 and not best.has_optimizer
    assert torch.equal(best.model_state["ln.bias"], torch.full((4,), 1.0))
    assert ck.load_checkpoint(ckpt).training_state["iteration"] == 30
    _save(ckpt, iteration=40, scale=4.0, best=True)
    assert ck.load_checkpoint(ck.best_dir(ckpt)).training_state["iteration"] == 40
    assert _hidden_entries(ckpt.parent) == []


def test_no_best_yet_is_one_clear_error(ckpt: Path) -> None:
    _save(ckpt)
    with pytest.raises(MyPTError, match="'m' has no best checkpoint yet.*--no-keep_best.*leave out --best"):
        ck.best_dir(ckpt)


def test_keep_every_keeps_whole_checkpoints(ckpt: Path) -> None:
    _save(ckpt, iteration=100, keep=True)
    _save(ckpt, iteration=150)
    _save(ckpt, iteration=200, scale=2.0, keep=True)
    assert sorted(e for e in os.listdir(ckpt) if e.startswith("iter_")) == ["iter_100", "iter_200"]
    old = ck.load_checkpoint(ckpt / "iter_100", with_optimizer=True)
    assert old.training_state["iteration"] == 100 and old.has_optimizer
    assert torch.equal(old.model_state["ln.bias"], torch.full((4,), 1.0))


# ----------------------------------------------------------------------------- a linked model folder


def test_a_model_folder_that_is_a_link_is_saved_into_its_target(tmp_path: Path) -> None:
    """checkpoints/m -> /bigdisk/m: saves go to the target's disk; the link stays a link."""
    target = tmp_path / "bigdisk" / "m"
    target.mkdir(parents=True)
    link = tmp_path / "checkpoints" / "m"
    link.parent.mkdir()
    link.symlink_to(target)
    _save(link, iteration=1)
    _write_extras(link)
    _save(link, iteration=2, best=True)
    _save(link, iteration=3)
    assert link.is_symlink() and link.resolve() == target
    assert ck.load_checkpoint(link).training_state["iteration"] == 3
    _assert_extras(target)
    assert (target / "best" / "model.pt").exists()
    assert _hidden_entries(link.parent) == [] and _hidden_entries(target.parent) == []


def test_a_dangling_link_is_one_clear_error(tmp_path: Path) -> None:
    link = tmp_path / "m"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(MyPTError, match="is a link to .*gone, which is not a folder; create that folder"):
        _save(link)


# ----------------------------------------------------------------------------- atomicity


def _fail_on_optimizer(monkeypatch: pytest.MonkeyPatch, payload: dict[str, Any]) -> None:
    real_save = torch.save

    def failing_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if obj is payload["optimizer_state"]:
            f.write(b"partial bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)


def _fail_on_swap(monkeypatch: pytest.MonkeyPatch, payload: dict[str, Any]) -> None:
    def failing_swap(tmp: Path, ckpt_dir: Path, old: Path) -> Path | None:
        assert (tmp / "metrics.jsonl").exists()  # extras were already moved into tmp
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(ckpt_dir))

    monkeypatch.setattr(fsutil, "swap_folder", failing_swap)


@pytest.mark.parametrize("fail", [_fail_on_optimizer, _fail_on_swap], ids=["write", "swap"])
def test_failed_save_leaves_previous_checkpoint(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch, fail: Any
) -> None:
    _save(ckpt, iteration=10)
    _write_extras(ckpt)
    before = snapshot(ckpt)
    payload = _payload(11, scale=5.0)
    fail(monkeypatch, payload)

    with pytest.raises(MyPTError) as info:
        ck.save_checkpoint(ckpt, **payload, best=True)

    msg = str(info.value)
    assert "could not write checkpoint" in msg and str(ckpt) in msg and "Traceback" not in msg
    assert "previous checkpoint (iteration 10)" in msg and "intact" in msg
    if fail is _fail_on_optimizer:
        assert "optimizer.pt" in msg and "No space left on device" in msg
        assert "free some disk space" in msg
    assert snapshot(ckpt) == before
    assert _hidden_entries(ckpt.parent) == []
    monkeypatch.undo()
    assert ck.load_checkpoint(ckpt, with_optimizer=True).training_state["iteration"] == 10


def test_first_save_failure_leaves_nothing(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = _payload(1)
    _fail_on_optimizer(monkeypatch, payload)
    with pytest.raises(MyPTError, match="nothing was saved"):
        ck.save_checkpoint(ckpt, **payload)
    assert os.listdir(ckpt.parent) == []


def test_torch_save_hiding_an_os_error_is_still_reported(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.save turns a failed write into a RuntimeError; the OSError must come through."""
    _save(ckpt, iteration=3)
    real_write = fsutil._HashingWriter.write

    def write(self: Any, data: Any) -> int:
        if memoryview(data).nbytes > 1000:
            self.error = OSError(errno.EFBIG, os.strerror(errno.EFBIG))
            raise self.error
        return real_write(self, data)

    monkeypatch.setattr(fsutil._HashingWriter, "write", write)
    with pytest.raises(MyPTError, match="File too large.*iteration 3.*ulimit -f"):
        _save(ckpt, iteration=4, width=1000)
    monkeypatch.undo()
    assert ck.load_checkpoint(ckpt).training_state["iteration"] == 3


@pytest.mark.slow
def test_file_size_limit_in_subprocess(ckpt: Path) -> None:
    _save(ckpt, iteration=5)
    _write_extras(ckpt)
    before = snapshot(ckpt)
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        import torch
        from mypt.checkpoint import save_checkpoint
        from mypt.errors import MyPTError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            save_checkpoint(
                {str(ckpt)!r},
                model_state={{"w": torch.zeros(200_000)}},
                config={{}}, tokenizer={{}}, training_state={{"iteration": 6}},
                optimizer_state={{}},
            )
        except MyPTError as exc:
            print(exc, file=sys.stderr)
            sys.exit(3)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 3, proc.stderr
    assert "could not write checkpoint" in proc.stderr
    assert "model.pt: File too large" in proc.stderr
    assert "previous checkpoint (iteration 5)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(ckpt) == before
    assert _hidden_entries(ckpt.parent) == []
    assert ck.load_checkpoint(ckpt, with_optimizer=True).training_state["iteration"] == 5


# ----------------------------------------------------------------------------- recover (the lock holder only)


def _make_checkpoint_at(folder: Path, iteration: int, **kw: Any) -> None:
    """A complete checkpoint at an arbitrary path (e.g. a hidden temp folder)."""
    scratch = folder.parent / f"scratch{iteration}"
    _save(scratch, iteration=iteration, **kw)
    os.rename(scratch, folder)


def test_recover_temp_complete_and_original_missing(ckpt: Path) -> None:
    tmp = ckpt.parent / ".m~tmp-999"
    ckpt.parent.mkdir(parents=True)
    _make_checkpoint_at(tmp, iteration=20)
    _write_extras(tmp)  # the save had already moved the extras in

    with pytest.raises(MyPTError, match="last save of 'm' was interrupted.*nothing is lost.*train.py --model_name m"):
        ck.load_checkpoint(ckpt)  # a reader repairs nothing
    assert _hidden_entries(ckpt.parent) == [".m~tmp-999"]
    with ck.training_lock(ckpt):
        ck.recover(ckpt)

    assert ck.load_checkpoint(ckpt).training_state["iteration"] == 20
    _assert_extras(ckpt)
    assert _hidden_entries(ckpt.parent) == []


def test_recover_fallback_crash_picks_newest(ckpt: Path) -> None:
    """Killed between 'rename old away' and 'rename new in': old and new both complete."""
    ckpt.parent.mkdir(parents=True)
    old = ckpt.parent / ".m~tmp-7-old"
    new = ckpt.parent / ".m~tmp-7"
    _make_checkpoint_at(old, iteration=1, best=True)
    _make_checkpoint_at(new, iteration=2)
    os.utime(old / "training_state.json", ns=(1_000_000_000, 1_000_000_000))
    _write_extras(new)

    ck.recover(ckpt)

    assert ck.load_checkpoint(ckpt).training_state["iteration"] == 2
    assert ck.load_checkpoint(ck.best_dir(ckpt)).training_state["iteration"] == 1  # the only best: back in
    _assert_extras(ckpt)
    assert _hidden_entries(ckpt.parent) == []


def test_recover_half_written_temp_with_original_present(ckpt: Path) -> None:
    _save(ckpt, iteration=30, best=True)
    _write_extras(ckpt)
    tmp = ckpt.parent / ".m~tmp-31"
    tmp.mkdir()
    (tmp / "model.pt").write_bytes(b"PK\x03\x04 half")
    (tmp / "best").mkdir()
    (tmp / "best" / "model.pt").write_bytes(b"half a best")

    ck.recover(ckpt)

    assert ck.load_checkpoint(ckpt).training_state["iteration"] == 30
    assert ck.load_checkpoint(ck.best_dir(ckpt)).training_state["iteration"] == 30  # not the half one
    _assert_extras(ckpt)
    assert _hidden_entries(ckpt.parent) == []


def test_recover_extras_and_best_stranded_in_temp(ckpt: Path) -> None:
    """Killed after moving the extras and the old best/ into the complete temp folder, before the swap."""
    _save(ckpt, iteration=40, best=True)
    tmp = ckpt.parent / ".m~tmp-41"
    _make_checkpoint_at(tmp, iteration=41)
    _write_extras(tmp)
    os.rename(ckpt / "best", tmp / "best")

    ck.recover(ckpt)

    assert ck.load_checkpoint(ckpt).training_state["iteration"] == 40
    assert ck.load_checkpoint(ck.best_dir(ckpt)).training_state["iteration"] == 40
    _assert_extras(ckpt)
    assert _hidden_entries(ckpt.parent) == []


def test_recover_incomplete_temp_is_not_restored(ckpt: Path) -> None:
    ckpt.parent.mkdir(parents=True)
    tmp = ckpt.parent / ".m~tmp-5"
    _make_checkpoint_at(tmp, iteration=1)
    with open(tmp / "optimizer.pt", "r+b") as f:
        f.truncate(10)
    ck.recover(ckpt)
    assert not ckpt.exists()  # a first save killed midway: there is nothing to restore
    assert _hidden_entries(ckpt.parent) == []


def test_recover_keeps_a_leftover_holding_the_trainers_files(ckpt: Path) -> None:
    ckpt.parent.mkdir(parents=True)
    tmp = ckpt.parent / ".m~tmp-6"
    _make_checkpoint_at(tmp, iteration=1)
    (tmp / "optimizer.pt").write_bytes(b"cut short")
    _write_extras(tmp)
    ck.recover(ckpt)
    assert not ckpt.exists() and _hidden_entries(ckpt.parent) == [".m~tmp-6"]  # nowhere to put them: kept


def test_recover_is_a_no_op_without_anything(tmp_path: Path) -> None:
    ck.recover(tmp_path / "nowhere" / "m")
    ck.recover(tmp_path / "m")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- load errors


def test_missing_model_lists_models(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    with pytest.raises(MyPTError, match=r"no model named 'x' in .*models there: none"):
        ck.load_checkpoint(root / "x")
    for name in ("b", "a"):
        _save(root / name)
    (root / "notes").mkdir()  # no config.json: not a model
    with pytest.raises(MyPTError, match=r"no model named 'x' in .*models there: a, b \("):
        ck.load_checkpoint(root / "x")
    with pytest.raises(MyPTError, match=r"no model named 'x', 'y' in .*models there: a, b \("):
        ck.require_models(["a", "x", "y"], root)


@pytest.mark.parametrize("missing", ck.CHECKPOINT_FILES)
def test_missing_file_is_named(ckpt: Path, missing: str) -> None:
    _save(ckpt)
    (ckpt / missing).unlink()
    with pytest.raises(MyPTError, match=f"incomplete: {missing} missing"):
        ck.load_checkpoint(ckpt, with_optimizer=True)


def test_a_missing_optimizer_is_needed_only_to_resume(ckpt: Path) -> None:
    payload = _save(ckpt)
    (ckpt / "optimizer.pt").unlink()
    loaded = ck.load_checkpoint(ckpt)  # generate, eval, export: they never read it
    assert all(torch.equal(loaded.model_state[k], v) for k, v in payload["model_state"].items())
    assert not loaded.has_optimizer
    with pytest.raises(MyPTError, match=r"incomplete: optimizer\.pt missing \(listed in its manifest\)"):
        ck.load_checkpoint(ckpt, with_optimizer=True)


def test_truncated_model_is_named(ckpt: Path) -> None:
    _save(ckpt)
    data = (ckpt / "model.pt").read_bytes()
    (ckpt / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(MyPTError, match=r"model\.pt does not match its manifest \(truncated"):
        ck.load_checkpoint(ckpt)
    fix_manifest(ckpt, "model.pt")
    with pytest.raises(MyPTError, match=r"model\.pt is truncated or corrupt") as info:
        ck.load_checkpoint(ckpt)
    assert "Traceback" not in str(info.value)


@pytest.mark.parametrize("name", ["model.pt", "config.json"])
def test_a_file_too_big_for_any_checkpoint_is_refused_unread(ckpt: Path, name: str) -> None:
    """A (sparse) file past the size limit is refused before a byte is read, even with a manifest
    claiming that size: a machine's memory for weights, MAX_JSON_BYTES for JSON."""
    _save(ckpt)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = fsutil.MAX_JSON_BYTES if name.endswith(".json") else memory
    os.truncate(ckpt / name, limit + 1)
    state = json.loads((ckpt / "training_state.json").read_text())
    state["manifest"][name]["size"] = limit + 1
    (ckpt / "training_state.json").write_text(json.dumps(state))
    with pytest.raises(MyPTError, match=rf"{name} is {limit + 1:,} bytes, more than .*: it is not a checkpoint file"):
        ck.load_checkpoint(ckpt)


def test_modified_file_fails_sha256(ckpt: Path) -> None:
    _save(ckpt)
    path = ckpt / "config.json"
    path.write_text(path.read_text().replace('"n_layer": 2', '"n_layer": 3'))
    with pytest.raises(MyPTError, match=r"config\.json does not match its manifest.*sha256"):
        ck.load_checkpoint(ckpt)


def test_optimizer_checked_by_size_only_unless_loaded(ckpt: Path) -> None:
    _save(ckpt)
    path = ckpt / "optimizer.pt"
    data = bytearray(path.read_bytes())
    data[-30] ^= 0xFF
    path.write_bytes(bytes(data))
    ck.load_checkpoint(ckpt)  # same size: fine when optimizer.pt is not loaded
    with pytest.raises(MyPTError, match=r"optimizer\.pt does not match its manifest"):
        ck.load_checkpoint(ckpt, with_optimizer=True)
    path.write_bytes(bytes(data[:-5]))
    with pytest.raises(MyPTError, match=r"optimizer\.pt does not match its manifest"):
        ck.load_checkpoint(ckpt)


def test_newer_format_version(ckpt: Path) -> None:
    _save(ckpt)
    path = ckpt / "training_state.json"
    state = json.loads(path.read_text())
    state["format_version"] = ck.FORMAT_VERSION + 1
    path.write_text(json.dumps(state))
    with pytest.raises(MyPTError, match=r"training_state\.json was made by a newer MyPT.*upgrade"):
        ck.load_checkpoint(ckpt)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "training_state.json"])
def test_malformed_json_is_named_with_position(ckpt: Path, name: str) -> None:
    _save(ckpt)
    (ckpt / name).write_text('{\n  "a": 1,\n  "b" 2\n}\n')
    if name != "training_state.json":
        fix_manifest(ckpt, name)
    with pytest.raises(MyPTError, match=rf"{name}: malformed JSON at line 3, column 7"):
        ck.load_checkpoint(ckpt)


def test_duplicate_json_key_is_named(ckpt: Path) -> None:
    _save(ckpt)
    (ckpt / "config.json").write_text('{"n_layer": 2, "n_embd": 4, "n_layer": 3}')
    fix_manifest(ckpt, "config.json")
    with pytest.raises(MyPTError, match=r"config\.json: the key 'n_layer' appears twice"):
        ck.load_checkpoint(ckpt)


class _Evil:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.sentinel}",))


@pytest.mark.parametrize("target", ["model.pt", "optimizer.pt"])
@pytest.mark.parametrize("flavor", ["torch_zip", "plain_pickle"])
def test_malicious_pickle_never_runs(ckpt: Path, tmp_path: Path, target: str, flavor: str) -> None:
    _save(ckpt)
    sentinel = tmp_path / "SENTINEL"
    evil = {"wte.weight": _Evil(sentinel)}
    if flavor == "torch_zip":
        torch.save(evil, ckpt / target, _use_new_zipfile_serialization=True)
    else:
        (ckpt / target).write_bytes(pickle.dumps(evil, protocol=2))
    fix_manifest(ckpt, target)  # so the refusal must come from weights_only

    with pytest.raises(MyPTError) as info:
        ck.load_checkpoint(ckpt, with_optimizer=True)

    msg = str(info.value)
    assert target in msg and "holds objects other than tensors" in msg
    assert "system" in msg  # torch's weights_only reason: the blocked os.system global
    assert "does not match its manifest" not in msg
    assert not sentinel.exists()


def test_model_file_that_is_not_a_state_dict(ckpt: Path) -> None:
    _save(ckpt)
    torch.save([torch.ones(2)], ckpt / "model.pt")
    fix_manifest(ckpt, "model.pt")
    with pytest.raises(MyPTError, match=r"model\.pt does not hold a model state_dict"):
        ck.load_checkpoint(ckpt)


def test_save_over_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m").write_text("not a folder")
    with pytest.raises(MyPTError, match="is not a folder"):
        _save(tmp_path / "m")
    assert (tmp_path / "m").read_text() == "not a folder"


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name",
    ["../x", "/abs", "a/b", "a\\b", "", "x" * 101, "a\nb", "a\x00b", ".hidden", "..", ".", "a b", "naïve", "a:b",
     "~x"],
)
def test_bad_model_names(name: str) -> None:
    with pytest.raises(MyPTError, match="--model_name") as info:
        ck.validate_model_name(name)
    assert "letters, digits, '_', '-' and '.'" in str(info.value)


@pytest.mark.parametrize("name", ["m", "my_model-2", "gpt2.small", "A" * 100, "a..b"])
def test_good_model_names(name: str) -> None:
    assert ck.validate_model_name(name) == name


@pytest.mark.parametrize("other", ["a.tmp-1", "a.tmp-1-old", "a.tmp-", "a.1", "a-old", "a.lock", "aa", "a..tmp-2"])
def test_temp_names_of_two_models_never_meet(tmp_path: Path, other: str) -> None:
    """Model a's leftovers are exactly its own temp folders: never those of a model whose name
    starts with a's (a.tmp-1 is a valid model name), and no temp name is a model name."""
    for tag in (None, "old"):
        theirs = fsutil.temp_path(tmp_path / other, tag).name
        ours = fsutil.temp_path(tmp_path / "a", tag).name
        assert fsutil.is_temp_of(ours, "a") and fsutil.is_temp_of(theirs, other)
        assert not fsutil.is_temp_of(theirs, "a") and not fsutil.is_temp_of(ours, other)
        assert ck._name_problem(theirs) is not None and ck._name_problem(theirs[1:]) is not None
        (tmp_path / theirs).mkdir()
    assert ck._leftovers(tmp_path / "a") == []


def test_checkpoint_dir_and_list_models(tmp_path: Path) -> None:
    assert ck.checkpoint_dir(tmp_path, "abc") == tmp_path / "abc"
    assert ck.checkpoint_dir(str(tmp_path), "abc") == tmp_path / "abc"
    with pytest.raises(MyPTError, match="--model_name"):
        ck.checkpoint_dir(tmp_path, "../escape")
    assert ck.list_models(tmp_path / "missing") == []
    for name in ("zeta", "alpha", ".alpha~tmp-123", ".hidden", "no_config"):
        (tmp_path / name).mkdir()
        if name != "no_config":
            (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "file.json").write_text("{}")
    assert ck.list_models(tmp_path) == ["alpha", "zeta"]


# ----------------------------------------------------------------------------- lock

HOLD_LOCK = """
import sys, time
from pathlib import Path
from mypt.checkpoint import training_lock
lock = training_lock(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def _holder(ckpt: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(ckpt)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_lock_held_by_another_process_names_its_host_and_pid(ckpt: Path) -> None:
    ckpt.parent.mkdir(parents=True)
    holder = _holder(ckpt)
    try:
        with pytest.raises(fsutil.LockHeld) as info, ck.training_lock(ckpt):
            pass
        msg = str(info.value)
        assert f"model 'm' is in use by process {holder.pid} on host {socket.gethostname()}" in msg
        assert "wait for it to finish or stop it" in msg and ".m.lock" in msg
    finally:
        holder.kill()
        holder.wait()
    with ck.training_lock(ckpt) as lock:  # the kernel released a killed holder's lock: no stale locks
        assert lock.held
    assert not (ckpt.parent / ".m.lock").exists()  # removed by its last holder


def test_a_lock_file_left_behind_is_not_a_lock(ckpt: Path) -> None:
    ckpt.parent.mkdir(parents=True)
    (ckpt.parent / ".m.lock").write_text("otherhost 12345\n")  # written by a machine that died holding it
    with ck.training_lock(ckpt) as lock:
        assert lock.held
        assert (ckpt.parent / ".m.lock").read_text().split()[1] == str(os.getpid())


def test_lock_released_when_body_raises(ckpt: Path) -> None:
    ckpt.parent.mkdir(parents=True)
    with pytest.raises(KeyError), ck.training_lock(ckpt):
        raise KeyError("boom")
    assert not (ckpt.parent / ".m.lock").exists()


def test_unwritable_checkpoints_folder_is_one_clear_error(ckpt: Path) -> None:
    if os.geteuid() == 0:
        blocked = ckpt.parent / "file_not_folder"
        blocked.parent.mkdir(parents=True)
        blocked.write_text("x")
        lock = fsutil.FileLock(blocked / ".m.lock", "model 'm'")  # ENOTDIR even for root
    else:
        ckpt.parent.mkdir(parents=True)
        ckpt.parent.chmod(0o500)
        lock = ck.training_lock(ckpt)
    with pytest.raises(MyPTError, match=r"could not write the lock file .*\.m\.lock \(.*\); .* and try again"):
        lock.acquire()
