"""Tests for mypt.checkpoint: atomic save, recovery, safe loading, names, the training lock."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from mypt import checkpoint as ck
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


def _save(ckpt: Path, iteration: int = 10, **kw: Any) -> dict[str, Any]:
    payload = _payload(iteration, **kw)
    ck.save_checkpoint(ckpt, **payload)
    return payload


def _write_extras(ckpt: Path) -> None:
    for rel, data in EXTRAS.items():
        (ckpt / rel).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / rel).write_bytes(data)


def _assert_extras(ckpt: Path) -> None:
    for rel, data in EXTRAS.items():
        assert (ckpt / rel).read_bytes() == data, rel


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _hidden_entries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _fix_manifest(ckpt: Path, name: str) -> None:
    """Make the manifest agree with the current bytes of ckpt/name."""
    state_path = ckpt / "training_state.json"
    state = json.loads(state_path.read_text())
    data = (ckpt / name).read_bytes()
    state["manifest"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    state_path.write_text(json.dumps(state, indent=2))


def _assert_tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


@pytest.fixture(scope="session")
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return tmp_path / "checkpoints" / "m"


# ----------------------------------------------------------------------------- round trip


def test_round_trip(ckpt: Path) -> None:
    payload = _save(ckpt, iteration=7)
    assert sorted(os.listdir(ckpt)) == sorted(ck.CHECKPOINT_FILES)
    assert payload["training_state"] == {"iteration": 7, "best_val_loss": 1.25}  # not mutated

    loaded = ck.load_checkpoint(ckpt, with_optimizer=True)

    _assert_tensors_equal(loaded.model_state, payload["model_state"])
    assert loaded.config == payload["config"]
    assert loaded.tokenizer == payload["tokenizer"]
    assert loaded.path == ckpt
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


def test_load_without_optimizer_does_not_deserialize_it(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _save(ckpt)
    loaded_paths: list[str] = []
    real_load = torch.load

    def spy(f: Any, *args: Any, **kwargs: Any) -> Any:
        loaded_paths.append(Path(f).name)
        assert kwargs.get("weights_only") is True
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded = ck.load_checkpoint(ckpt)
    assert loaded.optimizer_state is None
    assert loaded_paths == ["model.pt"]
    ck.load_checkpoint(ckpt, with_optimizer=True)
    assert loaded_paths == ["model.pt", "model.pt", "optimizer.pt"]


def test_extras_survive_two_saves(ckpt: Path) -> None:
    _save(ckpt, iteration=1)
    _write_extras(ckpt)
    with open(ckpt / "metrics.jsonl", "ab") as log:  # the trainer keeps its log open
        _save(ckpt, iteration=2, scale=2.0)
        _save(ckpt, iteration=3, scale=3.0)
        log.write(b"after\n")
    assert (ckpt / "metrics.jsonl").read_bytes() == EXTRAS["metrics.jsonl"] + b"after\n"
    assert (ckpt / "loss.png").read_bytes() == EXTRAS["loss.png"]
    assert (ckpt / "tensorboard/events.out.tfevents.1").read_bytes() == EXTRAS[
        "tensorboard/events.out.tfevents.1"
    ]
    loaded = ck.load_checkpoint(ckpt)
    assert loaded.training_state["iteration"] == 3
    assert torch.equal(loaded.model_state["ln.bias"], torch.full((4,), 3.0))
    assert _hidden_entries(ckpt.parent) == []


def test_extras_survive_without_renameat2(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ck, "_renameat2", lambda: None)  # use the rename-away fallback
    _save(ckpt, iteration=1)
    _write_extras(ckpt)
    _save(ckpt, iteration=2)
    _save(ckpt, iteration=3)
    _assert_extras(ckpt)
    assert ck.load_checkpoint(ckpt).training_state["iteration"] == 3
    assert _hidden_entries(ckpt.parent) == []


@pytest.mark.skipif(ck._renameat2() is None, reason="no renameat2 here")
def test_exchange_swaps_two_folders(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("from a")
    (tmp_path / "b").mkdir()
    assert ck._exchange(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / "x").read_text() == "from a"
    assert os.listdir(tmp_path / "a") == []


def test_fallback_failed_rename_in_restores_old(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ck, "_renameat2", lambda: None)
    _save(ckpt, iteration=1)
    _write_extras(ckpt)
    before = _snapshot(ckpt)
    real_rename = os.rename

    def rename(src: Any, dst: Any) -> None:
        if Path(src).name.startswith(".m.tmp-") and Path(dst) == ckpt:
            assert not ckpt.exists()  # the old checkpoint is parked, not deleted
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(MyPTError, match="Input/output error.*iteration 1"):
        _save(ckpt, iteration=2)
    monkeypatch.undo()
    assert _snapshot(ckpt) == before
    assert _hidden_entries(ckpt.parent) == []


def test_extra_files_are_in_manifest_and_replaced(ckpt: Path) -> None:
    ck.save_checkpoint(ckpt, **_payload(1), extra_files={"model.safetensors": b"v1"})
    manifest = ck.load_checkpoint(ckpt).training_state["manifest"]
    assert manifest["model.safetensors"] == {"size": 2, "sha256": hashlib.sha256(b"v1").hexdigest()}
    ck.save_checkpoint(ckpt, **_payload(2), extra_files={"model.safetensors": b"v2!"})
    assert (ckpt / "model.safetensors").read_bytes() == b"v2!"
    # a save without it drops the saved copy: it would no longer match model.pt
    _save(ckpt, iteration=3)
    assert not (ckpt / "model.safetensors").exists()
    # but a file the trainer wrote itself (not via extra_files) is carried over
    (ckpt / "model.safetensors").write_bytes(b"mine")
    _save(ckpt, iteration=4)
    assert (ckpt / "model.safetensors").read_bytes() == b"mine"


def test_save_rejects_reserved_extra_file_name(ckpt: Path) -> None:
    with pytest.raises(ValueError, match="model.pt"):
        ck.save_checkpoint(ckpt, **_payload(), extra_files={"model.pt": b"x"})
    assert not ckpt.parent.exists() or _hidden_entries(ckpt.parent) == []


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
    def failing_swap(tmp: Path, ckpt_dir: Path) -> Path | None:
        assert (tmp / "metrics.jsonl").exists()  # extras were already moved into tmp
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(ckpt_dir))

    monkeypatch.setattr(ck, "_swap_in", failing_swap)


@pytest.mark.parametrize("fail", [_fail_on_optimizer, _fail_on_swap], ids=["write", "swap"])
def test_failed_save_leaves_previous_checkpoint(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch, fail: Any
) -> None:
    _save(ckpt, iteration=10)
    _write_extras(ckpt)
    before = _snapshot(ckpt)
    payload = _payload(11, scale=5.0)
    fail(monkeypatch, payload)

    with pytest.raises(MyPTError) as info:
        ck.save_checkpoint(ckpt, **payload)

    msg = str(info.value)
    assert "could not write checkpoint" in msg and str(ckpt) in msg
    assert "previous checkpoint (iteration 10)" in msg and "intact" in msg
    if fail is _fail_on_optimizer:
        assert "optimizer.pt" in msg and "No space left on device" in msg
        assert "free some disk space" in msg
    assert _snapshot(ckpt) == before
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
    real_write = ck._HashingWriter.write

    def write(self: Any, data: Any) -> int:
        if memoryview(data).nbytes > 1000:
            self.error = OSError(errno.EFBIG, os.strerror(errno.EFBIG))
            raise self.error
        return real_write(self, data)

    monkeypatch.setattr(ck._HashingWriter, "write", write)
    with pytest.raises(MyPTError, match="File too large.*iteration 3.*ulimit -f"):
        ck.save_checkpoint(ckpt, **_payload(4, width=1000))
    monkeypatch.undo()
    assert ck.load_checkpoint(ckpt).training_state["iteration"] == 3


@pytest.mark.slow
def test_file_size_limit_in_subprocess(ckpt: Path) -> None:
    _save(ckpt, iteration=5)
    _write_extras(ckpt)
    before = _snapshot(ckpt)
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
    assert _snapshot(ckpt) == before
    assert _hidden_entries(ckpt.parent) == []
    assert ck.load_checkpoint(ckpt, with_optimizer=True).training_state["iteration"] == 5


# ----------------------------------------------------------------------------- recover


def _make_checkpoint_at(folder: Path, iteration: int) -> None:
    """A complete checkpoint at an arbitrary path (e.g. a hidden temp folder)."""
    scratch = folder.parent / f"scratch{iteration}"
    _save(scratch, iteration=iteration)
    os.rename(scratch, folder)


def test_recover_temp_complete_and_original_missing(ckpt: Path, dead_pid: int) -> None:
    tmp = ckpt.parent / f".m.tmp-{dead_pid}"
    ckpt.parent.mkdir(parents=True)
    _make_checkpoint_at(tmp, iteration=20)
    _write_extras(tmp)  # the save had already moved the extras in

    loaded = ck.load_checkpoint(ckpt)

    assert loaded.training_state["iteration"] == 20
    _assert_extras(ckpt)
    assert _hidden_entries(ckpt.parent) == []


def test_recover_fallback_crash_picks_newest(ckpt: Path, dead_pid: int) -> None:
    """Killed between 'rename old away' and 'rename new in': old and new both complete."""
    ckpt.parent.mkdir(parents=True)
    old = ckpt.parent / f".m.old-{dead_pid}"
    new = ckpt.parent / f".m.tmp-{dead_pid}"
    _make_checkpoint_at(old, iteration=1)
    _make_checkpoint_at(new, iteration=2)
    os.utime(old / "training_state.json", ns=(1_000_000_000, 1_000_000_000))
    _write_extras(new)

    assert ck.load_checkpoint(ckpt).training_state["iteration"] == 2
    _assert_extras(ckpt)
    assert _hidden_entries(ckpt.parent) == []


def test_recover_half_written_temp_with_original_present(ckpt: Path, dead_pid: int) -> None:
    _save(ckpt, iteration=30)
    _write_extras(ckpt)
    tmp = ckpt.parent / f".m.tmp-{dead_pid}"
    tmp.mkdir()
    (tmp / "model.pt").write_bytes(b"PK\x03\x04 half")
    (tmp / "model.safetensors").write_bytes(b"half-written extra file")

    loaded = ck.load_checkpoint(ckpt)

    assert loaded.training_state["iteration"] == 30
    assert not (ckpt / "model.safetensors").exists()  # not mistaken for a trainer file
    _assert_extras(ckpt)
    assert _hidden_entries(ckpt.parent) == []


def test_recover_extras_stranded_in_temp(ckpt: Path, dead_pid: int) -> None:
    """Killed after moving the extras into the complete temp folder, before the swap."""
    _save(ckpt, iteration=40)
    tmp = ckpt.parent / f".m.tmp-{dead_pid}"
    _make_checkpoint_at(tmp, iteration=41)
    _write_extras(tmp)

    ck.recover(ckpt)

    assert ck.load_checkpoint(ckpt).training_state["iteration"] == 40
    _assert_extras(ckpt)
    assert _hidden_entries(ckpt.parent) == []


def test_recover_incomplete_temp_is_not_restored(ckpt: Path, dead_pid: int) -> None:
    ckpt.parent.mkdir(parents=True)
    tmp = ckpt.parent / f".m.tmp-{dead_pid}"
    _make_checkpoint_at(tmp, iteration=1)
    with open(tmp / "optimizer.pt", "r+b") as f:
        f.truncate(10)
    with pytest.raises(MyPTError, match="no model named 'm'"):
        ck.load_checkpoint(ckpt)
    assert _hidden_entries(ckpt.parent) == []


def test_recover_leaves_live_process_alone(ckpt: Path) -> None:
    _save(ckpt, iteration=1)
    live = ckpt.parent / f".m.tmp-{os.getppid()}"
    live.mkdir()
    (live / "model.pt").write_bytes(b"being written")
    ck.recover(ckpt)
    assert (live / "model.pt").exists()


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


@pytest.mark.parametrize("missing", ck.CHECKPOINT_FILES)
def test_missing_file_is_named(ckpt: Path, missing: str) -> None:
    _save(ckpt)
    (ckpt / missing).unlink()
    with pytest.raises(MyPTError, match=f"incomplete: {missing} missing"):
        ck.load_checkpoint(ckpt)


def test_truncated_model_is_named(ckpt: Path) -> None:
    _save(ckpt)
    data = (ckpt / "model.pt").read_bytes()
    (ckpt / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(MyPTError, match=r"model\.pt does not match its manifest \(truncated"):
        ck.load_checkpoint(ckpt)
    with pytest.raises(MyPTError, match=r"model\.pt is truncated or corrupt") as info:
        ck.load_checkpoint(ckpt, verify=False)
    assert "Traceback" not in str(info.value)


def test_modified_file_fails_sha256(ckpt: Path) -> None:
    _save(ckpt)
    path = ckpt / "config.json"
    path.write_text(path.read_text().replace('"n_layer": 2', '"n_layer": 3'))
    with pytest.raises(MyPTError, match=r"config\.json does not match its manifest.*sha256"):
        ck.load_checkpoint(ckpt)
    assert ck.load_checkpoint(ckpt, verify=False).config["n_layer"] == 3


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
    with pytest.raises(MyPTError, match=rf"{name} is not valid JSON \(line 3, column 7"):
        ck.load_checkpoint(ckpt, verify=False)


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
    _fix_manifest(ckpt, target)  # so the refusal must come from weights_only

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
    _fix_manifest(ckpt, "model.pt")
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
    [
        "../x",
        "/abs",
        "a/b",
        "a\\b",
        "",
        "x" * 101,
        "a\nb",
        "a\x00b",
        ".hidden",
        "..",
        ".",
        "a b",
        "naïve",
        "a:b",
        "~x",
    ],
)
def test_bad_model_names(name: str) -> None:
    with pytest.raises(MyPTError, match="--model_name") as info:
        ck.validate_model_name(name)
    assert "letters, digits, '_', '-' and '.'" in str(info.value)


@pytest.mark.parametrize("name", ["m", "my_model-2", "gpt2.small", "A" * 100, "a..b"])
def test_good_model_names(name: str) -> None:
    assert ck.validate_model_name(name) == name


def test_checkpoint_dir_and_list_models(tmp_path: Path) -> None:
    assert ck.checkpoint_dir(tmp_path, "abc") == tmp_path / "abc"
    assert ck.checkpoint_dir(str(tmp_path), "abc") == tmp_path / "abc"
    with pytest.raises(MyPTError, match="--model_name"):
        ck.checkpoint_dir(tmp_path, "../escape")
    assert ck.list_models(tmp_path / "missing") == []
    for name in ("zeta", "alpha", ".alpha.tmp-123", ".hidden", "no_config"):
        (tmp_path / name).mkdir()
        if name != "no_config":
            (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "file.json").write_text("{}")
    assert ck.list_models(tmp_path) == ["alpha", "zeta"]


# ----------------------------------------------------------------------------- lock


def test_lock_blocks_second_trainer_and_is_removed(ckpt: Path) -> None:
    lock_file = ckpt.parent / ".m.lock"
    with ck.TrainingLock(ckpt) as lock:
        assert lock.took_over_from is None
        assert lock_file.read_text().strip() == str(os.getpid())
        busy = f"being trained by process {os.getpid()}; wait"
        with pytest.raises(MyPTError, match=busy), ck.TrainingLock(ckpt):
            pass
        assert lock_file.exists()  # the failed attempt did not remove the holder's lock
    assert not lock_file.exists()


def test_lock_removed_when_body_raises(ckpt: Path) -> None:
    with pytest.raises(KeyError), ck.TrainingLock(ckpt):
        raise KeyError("boom")
    assert not (ckpt.parent / ".m.lock").exists()


@pytest.mark.parametrize("content", ["dead", "garbage\x00", ""])
def test_stale_lock_is_taken_over(
    ckpt: Path, dead_pid: int, content: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt.parent.mkdir(parents=True)
    lock_file = ckpt.parent / ".m.lock"
    lock_file.write_text(f"{dead_pid}\n" if content == "dead" else content)
    with ck.TrainingLock(ckpt) as lock:
        assert lock.took_over_from == (dead_pid if content == "dead" else -1)
        assert lock_file.read_text().strip() == str(os.getpid())
    assert not lock_file.exists()
    assert capsys.readouterr() == ("", "")
