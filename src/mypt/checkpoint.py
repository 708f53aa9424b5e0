"""Checkpoint folders on disk: naming, atomic saving, crash recovery, safe loading, locking.

This module owns the layout of ``checkpoints/NAME/`` and nothing else. A checkpoint folder
holds the five files in :data:`CHECKPOINT_FILES`; it may also hold entries the trainer writes
(``metrics.jsonl``, ``loss.png``, ``tensorboard/`` ...), which every save carries over.

- :func:`save_checkpoint` writes a whole new folder next to the old one and swaps the two
  atomically, so the folder always holds either the complete old or the complete new
  checkpoint. ``training_state.json`` gets a ``format_version`` and a sha256 ``manifest``.
- :func:`recover` finishes or rolls back a save that was interrupted (process killed).
- :func:`load_checkpoint` checks the folder, the manifest and the format version, and loads
  ``.pt`` files only with ``torch.load(weights_only=True)``, so a planted pickle never runs.
- :class:`TrainingLock` keeps two processes from training the same model at once.
- :func:`write_weights_only` writes a pickle-free folder for inference (``model.safetensors``
  in place of ``model.pt``, no ``optimizer.pt``); :func:`load_checkpoint` reads it too.

It knows nothing of the model class, the training loop or the CLI: it deals in state dicts
and JSON dicts. Every user-fixable problem raises :class:`mypt.errors.MyPTError`.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mypt.errors import MyPTError

if TYPE_CHECKING:
    from typing_extensions import Self

CHECKPOINT_FILES = (
    "model.pt",
    "config.json",
    "tokenizer.json",
    "training_state.json",
    "optimizer.pt",
)
FORMAT_VERSION = 1
MAX_NAME_LENGTH = 100

MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, STATE_FILE, OPTIMIZER_FILE = CHECKPOINT_FILES
SAFETENSORS_FILE = "model.safetensors"  # weights-only folders: in place of model.pt
WEIGHTS_ONLY_FILES = (SAFETENSORS_FILE, CONFIG_FILE, TOKENIZER_FILE, STATE_FILE)
_ALIASES_KEY = "mypt_aliases"  # safetensors metadata: names stored once, e.g. a tied head

_NAME_RULE = (
    f"use 1-{MAX_NAME_LENGTH} characters from letters, digits, '_', '-' and '.', "
    "not starting with '.' (for example --model_name my_model)"
)
_NAME_CHARS = re.compile(r"[A-Za-z0-9_.\-]+")
_ITERATION_KEYS = ("iteration", "iter", "iter_num", "step")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_HASH_CHUNK = 1 << 20
_FIXES = {
    errno.ENOSPC: "free some disk space",
    errno.EDQUOT: "free some disk space (you are over your disk quota)",
    errno.EFBIG: "raise the file size limit (ulimit -f) or save to another disk",
    errno.EACCES: "make the checkpoints folder writable",
    errno.EPERM: "make the checkpoints folder writable",
    errno.EROFS: "save to a writable disk",
}

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- names


def validate_model_name(name: str) -> str:
    """Return ``name`` if it is a safe checkpoint folder name, else raise MyPTError."""
    problem = _name_problem(name)
    if problem is not None:
        raise MyPTError(f"--model_name {name!r} is not allowed: {problem}; {_NAME_RULE}")
    return name


def _name_problem(name: object) -> str | None:
    if not isinstance(name, str):
        return "it is not text"
    if not name:
        return "it is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"it is {len(name)} characters long (the limit is {MAX_NAME_LENGTH})"
    if any(ch < " " or ch == "\x7f" for ch in name):
        return "it contains control characters"
    if "/" in name or "\\" in name or os.path.isabs(name):
        return "it contains a path separator, so it would point outside the checkpoints folder"
    if name.startswith("."):
        return "it starts with '.'"
    if not _NAME_CHARS.fullmatch(name):
        bad = "".join(sorted({ch for ch in name if not _NAME_CHARS.fullmatch(ch)}))
        return f"it contains the character(s) {bad!r}"
    return None


def checkpoint_dir(checkpoints_dir: str | Path, name: str) -> Path:
    """The folder of model ``name`` inside ``checkpoints_dir`` (the name is validated)."""
    return Path(checkpoints_dir) / validate_model_name(name)


def list_models(checkpoints_dir: str | Path) -> list[str]:
    """Sorted names of the checkpoint folders (those holding config.json) in checkpoints_dir."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    return sorted(
        entry.name
        for entry in root.iterdir()
        if _name_problem(entry.name) is None and (entry / CONFIG_FILE).is_file()
    )


# ----------------------------------------------------------------------------- small helpers


def _temp_path(ckpt_dir: Path, pid: int) -> Path:
    return ckpt_dir.parent / f".{ckpt_dir.name}.tmp-{pid}"


def _old_path(ckpt_dir: Path, pid: int) -> Path:
    return ckpt_dir.parent / f".{ckpt_dir.name}.old-{pid}"


def _lock_path(ckpt_dir: Path) -> Path:
    return ckpt_dir.parent / f".{ckpt_dir.name}.lock"


def _leftovers(ckpt_dir: Path) -> list[tuple[Path, int]]:
    """Temp / old folders that saves of this checkpoint left behind, with their owner pid."""
    parent = ckpt_dir.parent
    if not parent.is_dir():
        return []
    prefixes = (f".{ckpt_dir.name}.tmp-", f".{ckpt_dir.name}.old-")
    found = []
    for entry in parent.iterdir():
        for prefix in prefixes:
            suffix = entry.name[len(prefix) :]
            if entry.name.startswith(prefix) and suffix.isdigit() and entry.is_dir():
                found.append((entry, int(suffix)))
    return found


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except (OverflowError, ValueError, OSError):
        return False
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir_quietly(path: Path) -> None:
    try:
        _fsync_dir(path)
    except OSError as exc:
        log.warning("could not fsync %s: %s", path, exc)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _json_bytes(obj: dict[str, Any], what: str) -> bytes:
    if not isinstance(obj, dict):
        raise TypeError(f"{what} must be a dict, got {type(obj).__name__}")
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


def _read_json_quietly(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _manifest_names(folder: Path) -> set[str] | None:
    """Names listed in folder's manifest; None if training_state.json is unreadable."""
    state = _read_json_quietly(folder / STATE_FILE)
    if state is None:
        return None
    manifest = state.get("manifest")
    return set(manifest) if isinstance(manifest, dict) else set()


def _iteration_of(ckpt_dir: Path) -> int | None:
    state = _read_json_quietly(ckpt_dir / STATE_FILE) or {}
    for key in _ITERATION_KEYS:
        value = state.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _test_pause() -> None:
    """Test hook: sleep $MYPT_TEST_SAVE_DELAY seconds after each step of a save (unset: never).

    A save pauses after each file it writes, before the swap and after it, so that
    tests/test_crash_safety.py can SIGKILL a training process inside every window of a save.
    The variable is read here and nowhere else.
    """
    delay = os.environ.get("MYPT_TEST_SAVE_DELAY")
    if delay:
        time.sleep(float(delay))


# ----------------------------------------------------------------------------- writing


class _HashingWriter:
    """File-like wrapper that hashes what passes through and remembers the first OSError.

    torch.save turns a failed write (disk full, file too large) into an opaque RuntimeError;
    keeping the OSError lets the caller report the real reason.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.size = 0
        self.digest = hashlib.sha256()
        self.error: OSError | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        try:
            self._f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise
        self.digest.update(data)
        n = memoryview(data).nbytes
        self.size += n
        return n

    def flush(self) -> None:
        self._f.flush()


def _write_file(path: Path, fill: Callable[[_HashingWriter], None]) -> dict[str, Any]:
    """Create path, let fill write it, fsync it; return its manifest entry."""
    try:
        with open(path, "xb") as f:
            writer = _HashingWriter(f)
            try:
                fill(writer)
            except Exception as exc:
                if writer.error is not None and not isinstance(exc, OSError):
                    raise writer.error from exc  # torch.save hid the OSError
                raise
            f.flush()
            os.fsync(f.fileno())
            _test_pause()
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise
    return {"size": writer.size, "sha256": writer.digest.hexdigest()}


def _write_bytes(path: Path, data: bytes) -> dict[str, Any]:
    return _write_file(path, lambda w: w.write(data))


def _write_torch(path: Path, obj: Any) -> dict[str, Any]:
    return _write_file(path, lambda w: torch.save(obj, w))


def _write_new_folder(
    tmp: Path,
    *,
    model_state: dict[str, Any],
    json_files: dict[str, bytes],
    training_state: dict[str, Any],
    optimizer_state: dict[str, Any],
    extra_files: dict[str, bytes],
) -> None:
    """Write every file of the new checkpoint into tmp; training_state.json (manifest) last."""
    tmp.mkdir()
    manifest = {MODEL_FILE: _write_torch(tmp / MODEL_FILE, model_state)}
    for name, data in json_files.items():
        manifest[name] = _write_bytes(tmp / name, data)
    manifest[OPTIMIZER_FILE] = _write_torch(tmp / OPTIMIZER_FILE, optimizer_state)
    for name, data in extra_files.items():
        manifest[name] = _write_bytes(tmp / name, data)
    state = {**training_state, "format_version": FORMAT_VERSION, "manifest": manifest}
    _write_bytes(tmp / STATE_FILE, _json_bytes(state, "training_state"))
    _fsync_dir(tmp)


def _carried_entries(old: Path, new_names: set[str]) -> list[str]:
    """Entries of the old folder the trainer wrote (not written by save), to carry over."""
    managed = set(CHECKPOINT_FILES) | new_names | (_manifest_names(old) or set())
    return sorted(entry.name for entry in old.iterdir() if entry.name not in managed)


def _move_entries(names: list[str], src: Path, dst: Path, moved: list[str]) -> None:
    for name in names:
        os.rename(src / name, dst / name)
        moved.append(name)


def _move_entries_back(moved: list[str], tmp: Path, ckpt_dir: Path) -> bool:
    """Undo _move_entries; True if every entry went back."""
    ok = True
    for name in moved:
        try:
            os.rename(tmp / name, ckpt_dir / name)
        except OSError as exc:
            ok = False
            log.error("could not move %s back into %s: %s", tmp / name, ckpt_dir, exc)
    return ok


_renameat2_fn: Any = None


def _renameat2() -> Callable[..., int] | None:
    """libc's renameat2, or None where it does not exist (non-Linux, old glibc)."""
    global _renameat2_fn
    if _renameat2_fn is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):
            fn = False
        else:
            fn.argtypes = [
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_uint,
            ]
            fn.restype = ctypes.c_int
        _renameat2_fn = fn
    return _renameat2_fn or None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two folders; False if this OS / file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _swap_in(tmp: Path, ckpt_dir: Path) -> Path | None:
    """Put tmp in place of ckpt_dir; return the folder now holding the old checkpoint.

    Raises only if nothing changed.
    """
    if not os.path.lexists(ckpt_dir):
        os.rename(tmp, ckpt_dir)
        return None
    if _exchange(tmp, ckpt_dir):
        return tmp
    old = _old_path(ckpt_dir, os.getpid())
    os.rename(ckpt_dir, old)
    try:
        os.rename(tmp, ckpt_dir)
    except BaseException:
        os.rename(old, ckpt_dir)
        raise
    return old


def _save_failed_message(ckpt_dir: Path, exc: OSError) -> str:
    where = f"{Path(exc.filename).name}: " if exc.filename else ""
    reason = f"{where}{exc.strerror or exc}"
    if (ckpt_dir / STATE_FILE).is_file():
        iteration = _iteration_of(ckpt_dir)
        at = f" (iteration {iteration})" if iteration is not None else ""
        previous = f"the previous checkpoint{at} in {ckpt_dir}/ is intact"
    else:
        previous = "nothing was saved (there was no previous checkpoint)"
    fix = _FIXES.get(exc.errno or 0, "fix the problem")
    return f"could not write checkpoint {ckpt_dir}/ ({reason}); {previous}; {fix} and save again"


def _check_save_inputs(
    model_state: dict[str, Any], optimizer_state: dict[str, Any], extra_files: dict[str, bytes]
) -> None:
    if not isinstance(model_state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model_state.items()
    ):
        raise TypeError("model_state must be a dict of str -> torch.Tensor")
    if not isinstance(optimizer_state, dict):
        raise TypeError("optimizer_state must be a dict")
    for name, data in extra_files.items():
        if _name_problem(name) is not None or name in CHECKPOINT_FILES:
            raise ValueError(f"extra_files: {name!r} is not a plain, non-reserved file name")
        if not isinstance(data, bytes):
            raise TypeError(f"extra_files[{name!r}] must be bytes")


def save_checkpoint(
    ckpt_dir: Path,
    *,
    model_state: dict[str, Any],
    config: dict[str, Any],
    tokenizer: dict[str, Any],
    training_state: dict[str, Any],
    optimizer_state: dict[str, Any],
    extra_files: dict[str, bytes] | None = None,
) -> None:
    """Atomically replace the checkpoint in ckpt_dir, keeping the entries the trainer wrote.

    At every instant ckpt_dir holds the whole previous checkpoint or the whole new one. On a
    write failure the previous checkpoint is untouched and MyPTError says why.
    """
    ckpt_dir = Path(ckpt_dir)
    validate_model_name(ckpt_dir.name)
    if os.path.lexists(ckpt_dir) and not ckpt_dir.is_dir():
        raise MyPTError(f"{ckpt_dir} is not a folder; move it away or pick another --model_name")
    extras = dict(extra_files or {})
    _check_save_inputs(model_state, optimizer_state, extras)
    json_files = {
        CONFIG_FILE: _json_bytes(config, "config"),
        TOKENIZER_FILE: _json_bytes(tokenizer, "tokenizer"),
    }
    _json_bytes(training_state, "training_state")  # fail early if it is not JSON-serialisable
    pid = os.getpid()
    tmp = _temp_path(ckpt_dir, pid)
    moved: list[str] = []
    try:
        ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
        recover(ckpt_dir)
        _salvage(tmp, ckpt_dir)
        _salvage(_old_path(ckpt_dir, pid), ckpt_dir)
        _write_new_folder(
            tmp,
            model_state=model_state,
            json_files=json_files,
            training_state=training_state,
            optimizer_state=optimizer_state,
            extra_files=extras,
        )
        if ckpt_dir.is_dir():
            carried = _carried_entries(ckpt_dir, set(extras))
            _move_entries(carried, ckpt_dir, tmp, moved)
            _fsync_dir(tmp)
        _test_pause()
        old = _swap_in(tmp, ckpt_dir)
    except BaseException as exc:
        if _move_entries_back(moved, tmp, ckpt_dir):
            _remove_tree(tmp)
        if isinstance(exc, OSError):
            raise MyPTError(_save_failed_message(ckpt_dir, exc)) from exc
        raise
    _fsync_dir_quietly(ckpt_dir.parent)
    if old is not None:
        _test_pause()
        _remove_tree(old)
        _fsync_dir_quietly(ckpt_dir.parent)


def _dedup_shared(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store (each storage once; safetensors refuses shared ones) and name aliases."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, tensor in state.items():
        storage = tensor.untyped_storage().data_ptr()
        key = (storage, tensor.storage_offset(), tensor.shape, tensor.stride(), tensor.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor.detach().contiguous()
    return unique, aliases


def write_weights_only(
    folder: Path,
    *,
    model_state: dict[str, torch.Tensor],
    config: dict[str, Any],
    tokenizer: dict[str, Any],
    training_state: dict[str, Any],
) -> None:
    """Write a weights-only checkpoint (:data:`WEIGHTS_ONLY_FILES`) into the empty folder.

    It holds no pickle: load_checkpoint reads it for inference, but training cannot resume
    from it (there is no optimizer state). Atomic publishing is the caller's job.
    """
    _check_save_inputs(model_state, {}, {})
    unique, aliases = _dedup_shared(model_state)
    path = folder / SAFETENSORS_FILE
    save_file(unique, str(path), metadata={"format": "pt", _ALIASES_KEY: json.dumps(aliases)})
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    manifest = {SAFETENSORS_FILE: {"size": path.stat().st_size, "sha256": _sha256(path)}}
    for name, obj in ((CONFIG_FILE, config), (TOKENIZER_FILE, tokenizer)):
        manifest[name] = _write_bytes(folder / name, _json_bytes(obj, name))
    os.chmod(path, (folder / CONFIG_FILE).stat().st_mode & 0o777)  # safetensors made it 0600
    state = {**training_state, "format_version": FORMAT_VERSION, "manifest": manifest}
    _write_bytes(folder / STATE_FILE, _json_bytes(state, "training_state"))
    _fsync_dir(folder)


# ----------------------------------------------------------------------------- recovery


def _salvage(folder: Path, ckpt_dir: Path) -> None:
    """Move the trainer's entries in a leftover folder back to ckpt_dir, then delete it.

    Entries moved into a temp folder are those not named in its manifest (they are only
    moved after the manifest is on disk). The folder is kept if any of them cannot go back.
    """
    if not folder.is_dir():
        return
    listed = _manifest_names(folder)
    strays = [] if listed is None else _carried_entries(folder, listed)
    if strays and not ckpt_dir.is_dir():
        return
    keep = False
    for name in strays:
        if os.path.lexists(ckpt_dir / name):
            keep = True  # ckpt_dir already has a newer one; leave this copy for the user
            continue
        try:
            os.rename(folder / name, ckpt_dir / name)
        except OSError as exc:
            keep = True
            log.error("could not move %s back into %s: %s", folder / name, ckpt_dir, exc)
    if not keep:
        _remove_tree(folder)


def _is_complete(folder: Path) -> bool:
    if not all((folder / name).is_file() for name in CHECKPOINT_FILES):
        return False
    state = _read_json_quietly(folder / STATE_FILE)
    if state is None or not isinstance(state.get("manifest"), dict):
        return False
    try:
        _verify_manifest(folder, state, hashed=None)
    except MyPTError:
        return False
    return True


def _saved_at(folder: Path) -> int:
    return (folder / STATE_FILE).stat().st_mtime_ns


def recover(ckpt_dir: Path) -> None:
    """Finish or roll back a save of ckpt_dir that was interrupted; safe to call any time.

    Only leftovers of dead processes are touched. If ckpt_dir is missing, the newest complete
    leftover (manifest verifies) is put in its place; stray trainer entries go back into
    ckpt_dir; the leftover folders are deleted.
    """
    ckpt_dir = Path(ckpt_dir)
    stale = [folder for folder, pid in _leftovers(ckpt_dir) if not _pid_alive(pid)]
    if not stale:
        return
    if not os.path.lexists(ckpt_dir):
        complete = [folder for folder in stale if _is_complete(folder)]
        if complete:
            best = max(complete, key=_saved_at)
            try:
                os.rename(best, ckpt_dir)
            except OSError as exc:
                raise MyPTError(
                    f"could not restore the interrupted checkpoint {best} to {ckpt_dir} "
                    f"({exc.strerror or exc}); rename that folder to {ckpt_dir.name} by hand"
                ) from exc
            stale.remove(best)
    for folder in stale:
        _salvage(folder, ckpt_dir)
    _fsync_dir_quietly(ckpt_dir.parent)


# ----------------------------------------------------------------------------- loading


@dataclass
class Checkpoint:
    """A loaded checkpoint. training_state is training_state.json as stored (with manifest)."""

    config: dict[str, Any]
    tokenizer: dict[str, Any]
    training_state: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    path: Path


def _require_folder(ckpt_dir: Path) -> None:
    if ckpt_dir.is_dir():
        return
    if ckpt_dir.exists():
        raise MyPTError(f"{ckpt_dir} is not a folder; move it away or pick another --model_name")
    models = ", ".join(list_models(ckpt_dir.parent)) or "none"
    raise MyPTError(
        f"no model named '{ckpt_dir.name}' in {ckpt_dir.parent}/; models there: {models} "
        "(check --model_name, or train the model first)"
    )


def weights_file(ckpt_dir: Path) -> str:
    """The name of the file a checkpoint folder keeps its weights in."""
    return SAFETENSORS_FILE if _weights_only(ckpt_dir) else MODEL_FILE


def _weights_only(ckpt_dir: Path) -> bool:
    """A folder written by write_weights_only: model.safetensors and no model.pt."""
    return not (ckpt_dir / MODEL_FILE).exists() and (ckpt_dir / SAFETENSORS_FILE).is_file()


def _require_files(ckpt_dir: Path, names: tuple[str, ...], with_optimizer: bool) -> None:
    if with_optimizer and _weights_only(ckpt_dir) and not (ckpt_dir / OPTIMIZER_FILE).is_file():
        raise MyPTError(
            f"{ckpt_dir}/ holds only weights (model.safetensors, no optimizer.pt): it can "
            "generate but training cannot resume from it; resume from the original checkpoint"
        )
    missing = [name for name in names if not (ckpt_dir / name).is_file()]
    if missing:
        raise MyPTError(
            f"checkpoint folder {ckpt_dir}/ is incomplete: {', '.join(missing)} missing; "
            "restore the file(s) from a backup or train the model again"
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MyPTError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "fix the file or restore it from a backup"
        ) from None
    except UnicodeDecodeError:
        raise MyPTError(f"{path} is not UTF-8 text; restore it from a backup") from None
    except OSError as exc:
        raise MyPTError(f"cannot read {path} ({exc.strerror or exc}); check the file") from None
    if not isinstance(data, dict):
        raise MyPTError(f"{path} must hold a JSON object ({{...}}); restore it from a backup")
    return data


def _check_format_version(path: Path, state: dict[str, Any]) -> None:
    version = state.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise MyPTError(
            f"{path} has an invalid format_version {version!r}; restore it from a backup"
        )
    if version > FORMAT_VERSION:
        raise MyPTError(
            f"{path} was made by a newer MyPT (checkpoint format {version}; this MyPT reads "
            f"up to {FORMAT_VERSION}); upgrade MyPT (pip install -U mypt) to load it"
        )


def _manifest_entry(ckpt_dir: Path, name: object, entry: object) -> tuple[int, str]:
    ok = (
        isinstance(name, str)
        and _name_problem(name) is None
        and isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("sha256"), str)
    )
    if not ok:
        raise MyPTError(
            f"{ckpt_dir / STATE_FILE} has a malformed manifest entry {name!r}; "
            "restore the file from a backup"
        )
    assert isinstance(entry, dict)
    return entry["size"], entry["sha256"]


def _verify_manifest(
    ckpt_dir: Path,
    state: dict[str, Any],
    hashed: set[str] | None,
    required: tuple[str, ...] = CHECKPOINT_FILES,
) -> None:
    """Check every manifest entry's size, and sha256 for names in hashed (None: all)."""
    manifest = state.get("manifest")
    if manifest is None:
        return  # written by hand or by a MyPT without manifests: nothing to check against
    if not isinstance(manifest, dict):
        raise MyPTError(f"{ckpt_dir / STATE_FILE} has a malformed manifest; restore it")
    for name in required:
        if name != STATE_FILE and name not in manifest:
            raise MyPTError(
                f"{ckpt_dir / STATE_FILE}'s manifest has no entry for {name}; "
                "restore the file from a backup"
            )
    for name, entry in manifest.items():
        size, sha = _manifest_entry(ckpt_dir, name, entry)
        _verify_file(ckpt_dir / name, size, sha if hashed is None or name in hashed else None)


def _verify_file(path: Path, size: int, sha256: str | None) -> None:
    if not path.is_file():
        raise MyPTError(
            f"checkpoint folder {path.parent}/ is incomplete: {path.name} (listed in its "
            "manifest) is missing; restore it from a backup or train the model again"
        )
    actual = path.stat().st_size
    if actual != size:
        detail = f"{actual} bytes, expected {size}"
    elif sha256 is not None and _sha256(path) != sha256:
        detail = "sha256 differs"
    else:
        return
    raise MyPTError(
        f"{path} does not match its manifest (truncated or modified: {detail}); "
        "restore it from a backup or train the model again"
    )


def _unpickler_reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines()[1:]]
    lines = [line.split("WeightsUnpickler error:")[-1].strip() for line in lines]
    keep = [line for line in lines if line and not line.startswith("Check the documentation")]
    return " ".join(keep) or type(exc).__name__


def _torch_load(path: Path, map_location: str | torch.device | None) -> Any:
    """torch.load with weights_only=True; any failure becomes a MyPTError naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise MyPTError(
            f"{path} holds objects other than tensors and plain data "
            f"({_unpickler_reason(exc)}); it was refused because loading it could run code. "
            "Use only checkpoints from a source you trust, or train the model again"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch reports damaged files as many types
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise MyPTError(
            f"{path} is truncated or corrupt and could not be loaded ({first}); "
            "restore it from a backup or train the model again"
        ) from None


def _load_model_state(path: Path, map_location: str | torch.device | None) -> dict[str, Any]:
    state = _torch_load(path, map_location)
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise MyPTError(
            f"{path} does not hold a model state_dict (names -> tensors); "
            "restore it from a backup or train the model again"
        )
    return state


def _load_safetensors(path: Path, map_location: str | torch.device | None) -> dict[str, Any]:
    """A state dict from model.safetensors (never pickle), with its aliased names restored."""
    try:
        with safe_open(str(path), framework="pt", device=str(map_location or "cpu")) as f:
            state = {name: f.get_tensor(name) for name in f.keys()}
            aliases = json.loads((f.metadata() or {}).get(_ALIASES_KEY, "{}"))
    except Exception as exc:  # noqa: BLE001 - safetensors reports damaged files as many types
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise MyPTError(
            f"{path} is truncated or corrupt and could not be loaded ({first}); "
            "restore it from a backup or export the model again"
        ) from None
    for name, source in aliases.items() if isinstance(aliases, dict) else ():
        if source not in state:
            raise MyPTError(f"{path}: {name} refers to {source}, which is missing; export it again")
        state[name] = state[source]
    return state


def _load_optimizer_state(path: Path, map_location: str | torch.device | None) -> dict[str, Any]:
    state = _torch_load(path, map_location)
    if not isinstance(state, dict):
        raise MyPTError(
            f"{path} does not hold an optimizer state dict; "
            "restore it from a backup or train the model again"
        )
    return state


def load_checkpoint(
    ckpt_dir: Path,
    *,
    map_location: str | torch.device | None = "cpu",
    with_optimizer: bool = False,
    verify: bool = True,
) -> Checkpoint:
    """Load the checkpoint in ckpt_dir; every problem with the folder raises MyPTError.

    With verify, the manifest is checked: sizes of all files, sha256 of the files loaded.
    optimizer.pt is only deserialised when with_optimizer is True. A weights-only folder
    (model.safetensors in place of model.pt, no optimizer.pt) loads without with_optimizer.
    """
    ckpt_dir = Path(ckpt_dir)
    recover(ckpt_dir)
    _require_folder(ckpt_dir)
    weights_only = _weights_only(ckpt_dir)
    required = WEIGHTS_ONLY_FILES if weights_only else CHECKPOINT_FILES
    weights = SAFETENSORS_FILE if weights_only else MODEL_FILE
    _require_files(ckpt_dir, required, with_optimizer)
    training_state = _read_json(ckpt_dir / STATE_FILE)
    _check_format_version(ckpt_dir / STATE_FILE, training_state)
    if verify:
        hashed = {weights, CONFIG_FILE, TOKENIZER_FILE}
        if with_optimizer:
            hashed.add(OPTIMIZER_FILE)
        _verify_manifest(ckpt_dir, training_state, hashed, required)
    config = _read_json(ckpt_dir / CONFIG_FILE)
    tokenizer = _read_json(ckpt_dir / TOKENIZER_FILE)
    if weights_only:
        model_state = _load_safetensors(ckpt_dir / weights, map_location)
    else:
        model_state = _load_model_state(ckpt_dir / weights, map_location)
    optimizer_state = (
        _load_optimizer_state(ckpt_dir / OPTIMIZER_FILE, map_location) if with_optimizer else None
    )
    return Checkpoint(
        config=config,
        tokenizer=tokenizer,
        training_state=training_state,
        model_state=model_state,
        optimizer_state=optimizer_state,
        path=ckpt_dir,
    )


# ----------------------------------------------------------------------------- locking


@contextmanager
def _folder_mutex(folder: Path) -> Iterator[None]:
    """flock on the folder, so lock checks and take-overs by MyPT processes do not interleave."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # file system without flock: O_EXCL alone still guards plain creation
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _read_lock_pid(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def _create_lock_file(path: Path) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


class TrainingLock:
    """Context manager: only one process trains model ckpt_dir at a time.

    The lock is the sibling file ``.NAME.lock`` holding the owner's pid. A lock whose owner is
    dead, or whose content is unreadable, is taken over; ``took_over_from`` then holds the old
    pid (or -1 for an unreadable lock file).
    """

    def __init__(self, ckpt_dir: Path) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.path = _lock_path(self.ckpt_dir)
        self.took_over_from: int | None = None
        self._held = False

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _folder_mutex(self.path.parent):
            try:
                _create_lock_file(self.path)
            except FileExistsError:
                self._take_over()
        self._held = True

    def _take_over(self) -> None:
        owner = _read_lock_pid(self.path)
        if owner is not None and _pid_alive(owner):
            raise MyPTError(
                f"model '{self.ckpt_dir.name}' is being trained by process {owner}; "
                f"wait for it or stop it (lock file {self.path})"
            )
        log.info("taking over stale lock %s (owner pid %s is gone)", self.path, owner)
        self.took_over_from = owner if owner is not None else -1
        self.path.unlink(missing_ok=True)
        _create_lock_file(self.path)

    @property
    def held(self) -> bool:
        return self._held

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        with _folder_mutex(self.path.parent):
            if _read_lock_pid(self.path) == os.getpid():
                self.path.unlink(missing_ok=True)
