"""Checkpoint folders on disk: names, atomic saving, the best and kept copies, recovery, loading, the lock.

This module owns the layout of ``checkpoints/NAME/`` and nothing else::

    model.pt  config.json  tokenizer.json  training_state.json  optimizer.pt   the latest checkpoint
    best/      model.pt, config.json, tokenizer.json, training_state.json    the best validation loss
    iter_N/    the five files as they were at iteration N (--keep_every)
    metrics.jsonl  loss.png  tensorboard/ ...                                 the trainer's files

- :func:`save_checkpoint` writes a whole new folder beside the old one (each file made by
  ``fsutil.create_file``; best/ and iter_N/ are hard links to its files, so they cost no disk
  until later saves replace those files) and swaps the two atomically (``fsutil.swap_folder``):
  the folder always holds the complete old or the complete new checkpoint.
  ``training_state.json`` holds a sha256 ``manifest`` of the other files.
- :func:`recover` finishes or rolls back a save that was killed. Only the holder of the
  model's :func:`training_lock` may call it (train does, at start); readers never change a thing.
- :func:`load_checkpoint` reads each file once, checks those bytes against the manifest and
  parses the same bytes; ``.pt`` files only with ``torch.load(weights_only=True)``. Every file
  read (here and in recovery) must be a regular file within a size limit, checked before
  reading: a FIFO, a device or a folder in a file's place is refused, never waited on.
- :func:`folder_state` tells a trainer whether a folder takes a new model (none, or empty) or
  holds one to resume; anything else is refused, never trained over.
- A model folder that is a symbolic link (to a bigger disk) is saved into the link's target;
  the link stays.

It knows nothing of the model class, the training loop or the CLI: it deals in state dicts and
JSON dicts. Every user-fixable problem raises :class:`mypt.errors.MyPTError`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import platform
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from mypt import __version__, fsutil, weights_only
from mypt.errors import MyPTError

CHECKPOINT_FILES = ("model.pt", "config.json", "tokenizer.json", "training_state.json", "optimizer.pt")
MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, STATE_FILE, OPTIMIZER_FILE = CHECKPOINT_FILES
SAFETENSORS_FILE = weights_only.WEIGHTS_FILE  # weights-only folders: in place of model.pt
WEIGHTS_FILES = (MODEL_FILE, SAFETENSORS_FILE)
BEST_DIR = "best"
SNAPSHOT_PREFIX = "iter_"
BEST_FILES = (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE)
FORMAT_VERSION = 1
MAX_NAME_LENGTH = 100
_LOAD_ATTEMPTS = 3  # a save swapping the folder during a load makes the load start again

_NAME_RULE = (
    f"use 1-{MAX_NAME_LENGTH} characters from letters, digits, '_', '-' and '.', "
    "not starting with '.' (for example --model_name my_model)"
)
_NAME_CHARS = re.compile(r"[A-Za-z0-9_.\-]+")


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
    return sorted(e.name for e in root.iterdir() if _name_problem(e.name) is None and (e / CONFIG_FILE).is_file())


def no_model_error(names: list[str], checkpoints_dir: str | Path) -> MyPTError:
    """The one "no model named" error: names the missing models and the models that exist."""
    existing = ", ".join(list_models(checkpoints_dir)) or "none"
    return MyPTError(f"no model named {', '.join(repr(n) for n in names)} in {checkpoints_dir}/; models there: "
                     f"{existing} (check --model_name and --checkpoints_dir, or train the model first)")


def require_models(names: list[str], checkpoints_dir: str | Path) -> None:
    """Fail early, naming every model that does not exist (a model whose save was interrupted exists)."""
    missing = [n for n in names if not checkpoint_dir(checkpoints_dir, n).is_dir()
               and not _leftovers(real_folder(checkpoint_dir(checkpoints_dir, n)))]
    if missing:
        raise no_model_error(missing, checkpoints_dir)


NEW, SAVED = "new", "saved"


def folder_state(ckpt_dir: Path) -> str:
    """What a trainer finds at ckpt_dir (after recover()): NEW, no folder or an empty one, where a
    new model may be saved; or SAVED, a checkpoint with all its files, to resume (its bytes are
    checked as it loads). A folder holding anything else is never trained over as new: a
    MyPTError names the missing files and the ways out.
    """
    real = real_folder(ckpt_dir)
    if os.path.lexists(real) and not real.is_dir():
        raise MyPTError(f"{ckpt_dir} is not a folder; move it away or pick another --model_name")
    if not real.is_dir():
        stranded = sorted(e.name for e in _leftovers(real))
        if stranded:  # recover() could not put them back
            raise MyPTError(f"{ckpt_dir} is missing, but an interrupted save left {', '.join(stranded)} beside it, "
                            "holding files that could not be put back; move them away (or pick another "
                            "--model_name) and run again")
        return NEW
    held = sorted(e.name + ("/" if e.is_dir() else "") for e in real.iterdir())
    if not held:
        return NEW
    missing = missing_files(real)
    if not missing:
        return SAVED
    shown = ", ".join(held[:8]) + (f" and {len(held) - 8} more" if len(held) > 8 else "")
    raise MyPTError(f"{ckpt_dir} is not a complete checkpoint: {', '.join(missing)} missing (it holds {shown}); "
                    "training would overwrite it, so nothing was done. Restore the missing file(s) from a backup, "
                    "or move the folder away, or pick another --model_name")


def missing_files(folder: Path) -> list[str]:
    """The files a complete checkpoint in folder must have but it lacks: config.json,
    tokenizer.json, training_state.json, a weights file and whatever its manifest lists."""
    listed = _manifest_names(folder) or set()
    present = {n for n in {*CHECKPOINT_FILES, *WEIGHTS_FILES, *listed} if os.path.lexists(folder / n)}
    weights = next((n for n in WEIGHTS_FILES if n in listed | present), MODEL_FILE)
    return sorted({CONFIG_FILE, TOKENIZER_FILE, STATE_FILE, weights, *listed} - present)


def best_dir(ckpt_dir: Path) -> Path:
    """The folder of a model's best-validation weights; MyPTError if it has none yet."""
    folder = Path(ckpt_dir) / BEST_DIR
    if not os.path.lexists(folder / STATE_FILE):  # there but not a file: the load names what it is
        raise MyPTError(f"'{Path(ckpt_dir).name}' has no best checkpoint yet ({folder}/ is missing): it is "
                        "written at the first evaluation, unless training ran with --no-keep_best; "
                        "leave out --best to use the latest weights")
    return folder


def snapshot_name(iteration: int) -> str:
    return f"{SNAPSHOT_PREFIX}{iteration}"


def _is_kept_copy(name: str) -> bool:
    return name == BEST_DIR or (name.startswith(SNAPSHOT_PREFIX) and name[len(SNAPSHOT_PREFIX):].isdigit())


def real_folder(ckpt_dir: Path) -> Path:
    """The folder saves go to: ckpt_dir, or the target of ckpt_dir when it is a symbolic link."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_symlink():
        return ckpt_dir
    target = ckpt_dir.resolve()
    if not target.is_dir():
        raise MyPTError(f"{ckpt_dir} is a link to {target}, which is not a folder; create that folder "
                        "(or remove the link) and run again")
    return target


# ----------------------------------------------------------------------------- the lock


def training_lock(ckpt_dir: Path) -> fsutil.FileLock:
    """The lock a process holds while it trains (or writes) model ckpt_dir: one at a time.

    An OS lock on ``.NAME.lock`` beside the (real) folder, held for the whole run and released
    by the kernel when the process dies, on any machine sharing the disk.
    """
    real = real_folder(ckpt_dir)
    return fsutil.FileLock(real.parent / f".{real.name}.lock", f"model '{Path(ckpt_dir).name}'")


# ----------------------------------------------------------------------------- writing


def versions() -> dict[str, str]:
    """The software versions a saved training_state.json records."""
    return {"mypt": __version__, "torch": torch.__version__, "python": platform.python_version()}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _test_pause() -> None:
    """Test hook: sleep $MYPT_TEST_SAVE_DELAY seconds after each step of a save (unset: never).

    tests/test_crash_safety.py SIGKILLs a training process inside every window of a save.
    The variable is read here and nowhere else.
    """
    delay = os.environ.get("MYPT_TEST_SAVE_DELAY")
    if delay:
        time.sleep(float(delay))


Content = bytes | Callable[[BinaryIO], object]


def _write_file(path: Path, content: Content) -> dict[str, Any]:
    """Create path with content (bytes, or a function writing a file), fsync'd; its manifest entry."""
    fill = content if callable(content) else (lambda f: f.write(content))
    size, sha256 = fsutil.create_file(path, fill)
    _test_pause()
    return {"size": size, "sha256": sha256}


def torch_content(obj: Any) -> Content:
    return lambda f: torch.save(obj, f)


def write_folder(folder: Path, files: dict[str, Content], training_state: dict[str, Any]) -> dict[str, Any]:
    """Create folder with files, then training_state.json holding their manifest; fsync all.

    The manifest is written last, so a folder whose manifest verifies is complete. Returns it.
    """
    folder.mkdir(exist_ok=True)
    manifest = {name: _write_file(folder / name, content) for name, content in files.items()}
    _write_state(folder, training_state, manifest)
    return manifest


def _write_state(folder: Path, training_state: dict[str, Any], manifest: dict[str, Any]) -> None:
    state = {**training_state, "format_version": FORMAT_VERSION, "manifest": manifest}
    _write_file(folder / STATE_FILE, fsutil.json_bytes(state))
    fsutil.fsync_dir(folder)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copyfile(src, dst)
        with open(dst, "rb") as f:
            os.fsync(f.fileno())


def _kept_copy(tmp: Path, name: str, files: tuple[str, ...], manifest: dict[str, Any],
               training_state: dict[str, Any]) -> None:
    """tmp/name/ holding files (hard links to tmp's) and a training_state.json of their own."""
    sub = tmp / name
    sub.mkdir()
    for f in files:
        _link_or_copy(tmp / f, sub / f)
    _write_state(sub, training_state, {f: manifest[f] for f in files})
    _test_pause()


def _carried_entries(old: Path, written: set[str]) -> list[str]:
    """Entries of the old folder to carry into the new one: the trainer's files, and the kept
    copies this save does not replace. Never the checkpoint files or a killed write's temp files."""
    managed = set(CHECKPOINT_FILES) | set(WEIGHTS_FILES) | written | (_manifest_names(old) or set())
    return sorted(e.name for e in old.iterdir() if e.name not in managed and not fsutil.is_temp_name(e.name))


def _save_failed_message(ckpt_dir: Path, exc: OSError) -> str:
    if (ckpt_dir / STATE_FILE).is_file():
        iteration = _iteration_of(ckpt_dir)
        at = f" (iteration {iteration})" if iteration is not None else ""
        intact = f"the previous checkpoint{at} in {ckpt_dir}/ is intact"
    else:
        intact = "nothing was saved (there was no previous checkpoint)"
    return str(fsutil.write_error(f"checkpoint {ckpt_dir}/", exc, intact))


def save_checkpoint(
    ckpt_dir: Path,
    *,
    model_state: dict[str, torch.Tensor],
    config: dict[str, Any],
    tokenizer: dict[str, Any],
    training_state: dict[str, Any],
    optimizer_state: dict[str, Any] | None,
    best: bool = False,
    keep: bool = False,
) -> None:
    """Atomically replace the checkpoint in ckpt_dir, keeping the trainer's files and kept copies.

    best: this is the best validation loss so far, so best/ becomes these weights. keep: also
    keep this checkpoint as iter_N/ (N = training_state["iteration"]). optimizer_state None
    writes no optimizer.pt (an imported model). At every instant ckpt_dir holds the whole
    previous checkpoint or the whole new one; on a write failure the previous one is untouched
    and MyPTError says why. The caller holds training_lock(ckpt_dir).
    """
    ckpt_dir = Path(ckpt_dir)
    validate_model_name(ckpt_dir.name)
    real = real_folder(ckpt_dir)
    if os.path.lexists(real) and not real.is_dir():
        raise MyPTError(f"{ckpt_dir} is not a folder; move it away or pick another --model_name")
    files: dict[str, Content] = {
        MODEL_FILE: torch_content(model_state),
        CONFIG_FILE: fsutil.json_bytes(config),
        TOKENIZER_FILE: fsutil.json_bytes(tokenizer),
    }
    if optimizer_state is not None:
        files[OPTIMIZER_FILE] = torch_content(optimizer_state)
    json.dumps(training_state)  # fail early (TypeError) if it is not JSON
    tmp = fsutil.temp_path(real)
    moved: list[str] = []
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        fsutil.remove_temp(tmp)  # this pid's own leftover (a reused pid); a link there itself, not its target
        manifest = write_folder(tmp, files, training_state)
        written = set()
        if best:
            _kept_copy(tmp, BEST_DIR, BEST_FILES, manifest, training_state)
            written.add(BEST_DIR)
        if keep:
            name = snapshot_name(training_state["iteration"])
            _kept_copy(tmp, name, tuple(files), manifest, training_state)
            written.add(name)
        if real.is_dir():
            for name in _carried_entries(real, written):
                os.rename(real / name, tmp / name)
                moved.append(name)
            fsutil.fsync_dir(tmp)
        _test_pause()
        old = fsutil.swap_folder(tmp, real, fsutil.temp_path(real, "old"))
    except BaseException as exc:
        if _move_back(moved, tmp, real):
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise MyPTError(_save_failed_message(real, exc)) from exc
        raise
    _fsync_quietly(real.parent)
    if old is not None:
        _test_pause()
        shutil.rmtree(old, ignore_errors=True)
        _fsync_quietly(real.parent)


def _move_back(moved: list[str], tmp: Path, ckpt_dir: Path) -> bool:
    """Undo moving the trainer's entries into tmp; True if every entry went back."""
    ok = True
    for name in moved:
        try:
            os.rename(tmp / name, ckpt_dir / name)
        except OSError:
            ok = False
    return ok


def _fsync_quietly(path: Path) -> None:
    try:
        fsutil.fsync_dir(path)
    except OSError:
        pass  # the data is written; only its durability across a power cut is less certain


# ----------------------------------------------------------------------------- recovery


def _leftovers(real: Path) -> list[Path]:
    """Temp folders that saves of this model left behind (killed saves); never another model's."""
    if not real.parent.is_dir():
        return []
    return [e for e in real.parent.iterdir()
            if fsutil.is_temp_of(e.name, real.name) and e.is_dir() and not e.is_symlink()]


def _saved_state(folder: Path) -> dict[str, Any] | None:
    """folder's training_state.json, read as a load reads it; None if it is missing or unusable
    (for recovery and messages: a load names the problem)."""
    try:
        opened = _Folder(folder)
    except OSError:
        return None
    try:
        return _json_object(folder / STATE_FILE, opened.read(STATE_FILE))
    except (OSError, MyPTError):
        return None
    finally:
        opened.close()


def _manifest_names(folder: Path) -> set[str] | None:
    """Names listed in folder's manifest; None if training_state.json is unreadable."""
    state = _saved_state(folder)
    if state is None:
        return None
    manifest = state.get("manifest")
    return set(manifest) if isinstance(manifest, dict) else set()


def _iteration_of(folder: Path) -> int | None:
    value = (_saved_state(folder) or {}).get("iteration")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _is_complete(folder: Path) -> bool:
    try:
        _load_once(folder, with_optimizer=True, weights=True, map_location="cpu", verify_only=True)
    except (MyPTError, OSError):
        return False
    return True


def recover(ckpt_dir: Path) -> None:
    """Finish or roll back killed saves of ckpt_dir. Only call it holding training_lock(ckpt_dir).

    If the folder is missing (a save killed between its two renames), the newest complete
    leftover takes its place. From the other leftovers, the trainer's files and complete kept
    copies (best/, iter_N/) that the folder lacks go back into it; then the leftovers are deleted.
    """
    real = real_folder(ckpt_dir)
    stale = _leftovers(real)
    if not stale:
        return
    if not os.path.lexists(real):
        complete = [f for f in stale if _is_complete(f)]
        if complete:
            newest = max(complete, key=lambda f: (f / STATE_FILE).stat().st_mtime_ns)
            os.rename(newest, real)
            stale.remove(newest)
    for folder in stale:
        _salvage(folder, real)
    _fsync_quietly(real.parent)


def _salvage(folder: Path, real: Path) -> None:
    """Move what only a leftover folder holds back into real, then delete the leftover."""
    listed = _manifest_names(folder) or set()
    ours = set(CHECKPOINT_FILES) | set(WEIGHTS_FILES) | listed
    strays = [e for e in sorted(folder.iterdir()) if e.name not in ours and not fsutil.is_temp_name(e.name)]
    if not real.is_dir():
        if not [e for e in strays if not _is_kept_copy(e.name)]:
            shutil.rmtree(folder, ignore_errors=True)  # a first save killed midway: nothing else in it
        return  # else the trainer's files are in it and there is nowhere to put them back: leave it
    keep = False
    for entry in strays:
        name = entry.name
        if os.path.lexists(real / name) or (_is_kept_copy(name) and not _is_complete(entry)):
            keep = keep or not _is_kept_copy(name)  # a trainer file the folder has too: leave both
            continue
        try:
            os.rename(entry, real / name)
        except OSError:
            keep = True
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------- loading


@dataclass
class Checkpoint:
    """A loaded checkpoint folder. training_state is training_state.json as stored (with manifest).

    model_state is empty when loaded without weights; optimizer_state is None when not asked
    for or when the folder has none (an imported model, a weights-only folder).
    """

    config: dict[str, Any]
    tokenizer: dict[str, Any]
    training_state: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    path: Path
    weights_file: str = MODEL_FILE
    has_optimizer: bool = True


def _interrupted(ckpt_dir: Path) -> MyPTError:
    return MyPTError(f"the last save of '{ckpt_dir.name}' was interrupted before it finished (a leftover "
                     f".{ckpt_dir.name}~tmp-* folder is beside {ckpt_dir}); nothing is lost: run "
                     f"`python train.py --model_name {ckpt_dir.name}` (with the same --checkpoints_dir) "
                     "to restore it, then run this command again")


def folder_problem(ckpt_dir: Path) -> MyPTError:
    """Why there is no model folder at ckpt_dir: not a folder, an interrupted save, or no such model."""
    if os.path.lexists(ckpt_dir) and not ckpt_dir.is_dir():
        return MyPTError(f"{ckpt_dir} is not a folder; move it away or pick another --model_name")
    if _leftovers(real_folder(ckpt_dir)):
        return _interrupted(ckpt_dir)
    return no_model_error([ckpt_dir.name], ckpt_dir.parent)


class _Folder:
    """A checkpoint folder opened once: every file is read relative to the same folder, so a save
    swapping in a new folder meanwhile cannot mix the files of two checkpoints."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        self.inode = os.fstat(self.fd).st_ino

    def replaced(self) -> bool:
        """Whether a save has swapped another folder in at this path since it was opened."""
        try:
            return os.stat(self.path).st_ino != self.inode
        except FileNotFoundError:
            return True

    def close(self) -> None:
        os.close(self.fd)

    def has(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True

    def size(self, name: str) -> int:
        """The size of name, which must be a regular file (links followed)."""
        st = os.stat(name, dir_fd=self.fd)
        kind = fsutil.file_kind(st.st_mode)
        if kind is not None:
            raise MyPTError(f"{self.path / name}: is {kind}, not a regular file; {_PUT_BACK}")
        return st.st_size

    def read(self, name: str, expected: int | None = None) -> bytes:
        """The bytes of name: a regular file (links followed; a FIFO or device is refused, never
        waited on), within its size limit and of size `expected` (its manifest's) if given,
        both checked before a byte is read."""
        path = self.path / name
        fd = fsutil.open_regular(name, str(path), _PUT_BACK, dir_fd=self.fd)
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(fd).st_size
            _check_size(path, size, expected)
            data = f.read(size + 1)
        if len(data) != size:
            raise _broken(path, f"changed while it was read ({len(data)} bytes, then {size})", "run the command again")
        return data


_PUT_BACK = "put the real file in its place (restore it from a backup)"


def _broken(path: Path, what: str, fix: str = "restore it from a backup or train the model again") -> MyPTError:
    return MyPTError(f"{path} {what}; {fix}")


def _size_limit(name: str) -> tuple[int, str]:
    """The most bytes a checkpoint file of this name can hold, and what that limit is."""
    if name.endswith(".json"):
        return fsutil.MAX_JSON_BYTES, "the limit for a checkpoint's JSON file"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory, which it must fit in"
    except (ValueError, OSError):
        return sys.maxsize, "no limit"


def _check_size(path: Path, size: int, expected: int | None) -> None:
    limit, what = _size_limit(path.name)
    if size > limit:
        raise _broken(path, f"is {size:,} bytes, more than {what} ({limit:,} bytes): it is not a checkpoint file",
                      "restore it from a backup")
    if expected is not None and size != expected:
        raise _broken(path, f"does not match its manifest (truncated or modified: {size} bytes, expected {expected})")


def _checked(folder: _Folder, name: str, manifest: dict[str, Any] | None) -> bytes:
    """The bytes of folder/name, read once and checked against its manifest entry."""
    entry = None if manifest is None else manifest.get(name)
    data = folder.read(name, None if entry is None else entry["size"])
    if entry is not None and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise _broken(folder.path / name, "does not match its manifest (truncated or modified: sha256 differs)")
    return data


def _manifest_of(path: Path, state: dict[str, Any]) -> dict[str, Any] | None:
    """The validated manifest (None for a hand-made folder without one)."""
    manifest = state.get("manifest")
    if manifest is None:
        return None
    ok = isinstance(manifest, dict) and all(
        isinstance(n, str) and _name_problem(n) is None and isinstance(e, dict)
        and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
        for n, e in manifest.items())
    if not ok:
        raise _broken(path / STATE_FILE, "has a malformed manifest", "restore the file from a backup")
    return manifest


def _check_format_version(path: Path, state: dict[str, Any]) -> None:
    version = state.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _broken(path, f"has an invalid format_version {version!r}", "restore it from a backup")
    if version > FORMAT_VERSION:
        raise MyPTError(f"{path} was made by a newer MyPT (checkpoint format {version}; this MyPT reads up to "
                        f"{FORMAT_VERSION}); upgrade MyPT to load it")


def _json_object(path: Path, data: bytes) -> dict[str, Any]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _broken(path, "is not UTF-8 text", "restore it from a backup") from None
    obj = fsutil.parse_json(text, str(path))
    if not isinstance(obj, dict):
        raise _broken(path, "must hold a JSON object ({...})", "restore it from a backup")
    return obj


def _unpickler_reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines()[1:]]
    lines = [line.split("WeightsUnpickler error:")[-1].strip() for line in lines]
    keep = [line for line in lines if line and not line.startswith("Check the documentation")]
    return " ".join(keep) or type(exc).__name__


def _torch_load(path: Path, data: bytes, map_location: str | torch.device | None) -> Any:
    """torch.load(weights_only=True) of bytes; any failure becomes a MyPTError naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise MyPTError(
            f"{path} holds objects other than tensors and plain data ({_unpickler_reason(exc)}); it was refused "
            "because loading it could run code. Use only checkpoints from a source you trust, or train the "
            "model again") from None
    except Exception as exc:  # noqa: BLE001 - torch reports damaged files as many types
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise _broken(path, f"is truncated or corrupt and could not be loaded ({first})") from None


def _model_state(path: Path, data: bytes, map_location: str | torch.device | None) -> dict[str, torch.Tensor]:
    if path.name == SAFETENSORS_FILE:
        return weights_only.state_from_bytes(data, path, map_location)
    state = _torch_load(path, data, map_location)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise _broken(path, "does not hold a model state_dict (names -> tensors)")
    return state


def _files_of(folder: _Folder, manifest: dict[str, Any] | None, with_optimizer: bool) -> tuple[str, bool]:
    """(the weights file, whether there is an optimizer.pt); MyPTError if a needed file is missing.

    optimizer.pt is needed only to resume training (with_optimizer) and only if the manifest
    lists it: generate, eval and export never read it, so they load a folder without it.
    """
    names = set(manifest) if manifest is not None else {n for n in CHECKPOINT_FILES + WEIGHTS_FILES if folder.has(n)}
    weights = next((n for n in WEIGHTS_FILES if n in names), MODEL_FILE)
    needed = names if with_optimizer else names - {OPTIMIZER_FILE}
    missing = [n for n in sorted(needed | {weights, CONFIG_FILE, TOKENIZER_FILE}) if not folder.has(n)]
    if missing:
        listed = " (listed in its manifest)" if manifest is not None else ""
        raise _broken(folder.path, f"is incomplete: {', '.join(missing)} missing{listed}",
                      "restore the file(s) from a backup or train the model again")
    return weights, OPTIMIZER_FILE in names and folder.has(OPTIMIZER_FILE)


class _Replaced(Exception):
    """The folder was swapped while it was read: read the new one from the start."""


def _load_once(path: Path, *, with_optimizer: bool, weights: bool, map_location: str | torch.device | None,
               verify_only: bool = False) -> Checkpoint:
    try:
        folder = _Folder(path)
    except OSError as exc:
        raise _broken(path, f"cannot be read ({fsutil.os_reason(exc)})", "check the folder's permissions") from None
    try:
        return _load_from(folder, with_optimizer=with_optimizer, weights=weights, map_location=map_location,
                          verify_only=verify_only)
    except (OSError, MyPTError) as exc:
        if folder.replaced():
            raise _Replaced from exc
        if isinstance(exc, FileNotFoundError):
            raise _broken(path, f"is incomplete: {Path(exc.filename or '?').name} missing") from None
        if isinstance(exc, OSError):
            raise _broken(path, f"cannot be read ({fsutil.os_reason(exc)})", "check its files' permissions") from None
        raise
    finally:
        folder.close()


def _load_from(folder: _Folder, *, with_optimizer: bool, weights: bool, map_location: str | torch.device | None,
               verify_only: bool) -> Checkpoint:
    path = folder.path
    if not folder.has(STATE_FILE):
        raise _broken(path, f"is incomplete: {STATE_FILE} missing", "restore it from a backup")
    state = _json_object(path / STATE_FILE, folder.read(STATE_FILE))
    _check_format_version(path / STATE_FILE, state)
    manifest = _manifest_of(path, state)
    weights_name, has_optimizer = _files_of(folder, manifest, with_optimizer)
    wanted = {CONFIG_FILE, TOKENIZER_FILE} | ({weights_name} if weights else set())
    if with_optimizer and has_optimizer:
        wanted.add(OPTIMIZER_FILE)
    data = {name: _checked(folder, name, manifest) for name in sorted(wanted)}
    for name in set(manifest or ()) - wanted:  # not loaded: their sizes at least must match, if they are there
        if folder.has(name) and folder.size(name) != manifest[name]["size"]:
            raise _broken(path / name, "does not match its manifest (truncated or modified: size differs)")
    config = _json_object(path / CONFIG_FILE, data[CONFIG_FILE])
    tokenizer = _json_object(path / TOKENIZER_FILE, data[TOKENIZER_FILE])
    if verify_only:
        return Checkpoint(config, tokenizer, state, {}, None, path, weights_name, has_optimizer)
    model_state = _model_state(path / weights_name, data.pop(weights_name), map_location) if weights else {}
    optimizer = None
    if OPTIMIZER_FILE in data:
        optimizer = _torch_load(path / OPTIMIZER_FILE, data.pop(OPTIMIZER_FILE), map_location)
        if not isinstance(optimizer, dict):
            raise _broken(path / OPTIMIZER_FILE, "does not hold an optimizer state dict")
    return Checkpoint(config, tokenizer, state, model_state, optimizer, path, weights_name, has_optimizer)


def load_checkpoint(ckpt_dir: Path, *, with_optimizer: bool = False, weights: bool = True,
                    map_location: str | torch.device | None = "cpu") -> Checkpoint:
    """Load the checkpoint folder ckpt_dir (also best/ or iter_N/); never changes anything on disk.

    Each file is read once: its bytes are checked against the manifest (size and sha256) and
    then parsed. optimizer.pt is only deserialised with with_optimizer; the weights only with
    weights. Every problem with the folder raises MyPTError naming the file.
    """
    ckpt_dir = Path(ckpt_dir)
    for _ in range(_LOAD_ATTEMPTS - 1):
        if not ckpt_dir.is_dir():
            raise folder_problem(ckpt_dir)
        try:
            return _load_once(ckpt_dir, with_optimizer=with_optimizer, weights=weights, map_location=map_location)
        except _Replaced:
            continue  # a save replaced the folder meanwhile: read the new one
    if not ckpt_dir.is_dir():
        raise folder_problem(ckpt_dir)
    try:
        return _load_once(ckpt_dir, with_optimizer=with_optimizer, weights=weights, map_location=map_location)
    except _Replaced as exc:
        raise _broken(ckpt_dir, "kept changing while it was read (a trainer saving very often?)",
                      "run the command again") from exc.__cause__
