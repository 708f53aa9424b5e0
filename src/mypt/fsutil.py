"""Files, the one way MyPT touches them: atomic writes, folder swaps, hashing, checks, locks.

A file is replaced by `atomic_write` (a temp file beside the target, fsync'd, renamed over
it); a checkpoint's files are made by `create_file` in a temp folder that `swap_folder` puts in
place of the old one (renameat2's exchange where the OS has it). A failed write becomes one
`MyPTError` naming the file and the fix (`write_error`). Every path a user gives is checked for
what it is before it is opened (`check_regular_file`), and every checkpoint file is opened by
`open_regular`, so a FIFO or a device never blocks or floods a command; sizes are checked by
reading (`read_limited`, `is_empty`), since procfs files report a size of 0. Every JSON file is
read by `parse_json` / `read_json`, which name the file and refuse duplicate keys, numbers too
long to read and nesting too deep to walk. `FileLock` is an OS lock (flock)
that records the host and pid holding it; it dies with its process, on any machine that shares
the file system.

Temp files and folders are named `.NAME~tmp-PID`; `is_temp_name` recognises them, so a write
killed half way is never mistaken for data, and `is_temp_of` finds exactly those of one name
('~' is in no model name, so the temp names of two models never look alike). A temp path is
created fresh by `create_temp`: never through a link, never into a file already there.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from mypt.errors import MyPTError

HASH_CHUNK = 1 << 20
_TEMP_MARK = "~tmp-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
FIXES = {
    errno.ENOSPC: "free some disk space",
    errno.EDQUOT: "free some disk space (you are over your disk quota)",
    errno.EFBIG: "raise the file size limit (ulimit -f) or write to another disk",
    errno.EACCES: "make the folder writable (or pick another one)",
    errno.EPERM: "make the folder writable (or pick another one; is it immutable, chattr +i?)",
    errno.EROFS: "write to a writable disk",
}


# ----------------------------------------------------------------------------- errors


def os_reason(exc: OSError) -> str:
    """'model.pt: No space left on device' out of an OSError."""
    where = f"{Path(exc.filename).name}: " if isinstance(exc.filename, (str, os.PathLike)) and exc.filename else ""
    return f"{where}{exc.strerror or exc}"


def fix_for(exc: OSError) -> str:
    return FIXES.get(exc.errno or 0, "fix the problem")


def write_error(what: str, exc: OSError, intact: str = "") -> MyPTError:
    """One message for a failed write: what could not be written, why, what is intact, the fix."""
    kept = f"; {intact}" if intact else ""
    return MyPTError(f"could not write {what} ({os_reason(exc)}){kept}; {fix_for(exc)} and try again")


# ----------------------------------------------------------------------------- temp names


def temp_path(final: Path, tag: str | None = None) -> Path:
    """A hidden temp sibling of final (same folder, so same file system): .NAME~tmp-PID[-TAG]."""
    if tag is not None and not re.fullmatch(r"[a-z]+", tag):
        raise ValueError(f"temp tag {tag!r}: lower-case letters only")
    suffix = f"{os.getpid()}" if tag is None else f"{os.getpid()}-{tag}"
    return final.parent / f".{final.name}{_TEMP_MARK}{suffix}"


def is_temp_name(name: str) -> bool:
    """True for names temp_path makes: leftovers of a write that was killed."""
    return name.startswith(".") and _TEMP_MARK in name


def is_temp_of(name: str, final_name: str) -> bool:
    """True if name is exactly one temp_path makes for final_name (in any process, with any tag)."""
    return re.fullmatch(rf"\.{re.escape(final_name)}{re.escape(_TEMP_MARK)}\d+(-[a-z]+)?", name) is not None


def remove_temp(tmp: Path) -> None:
    """Remove what is at a temp path (left by a killed write of a process with the same pid):
    a link itself, never what it points to."""
    if tmp.is_symlink() or (os.path.lexists(tmp) and not tmp.is_dir()):
        tmp.unlink()
    elif tmp.is_dir():
        shutil.rmtree(tmp)


def _open_new(path: Path) -> BinaryIO:
    """Create path for writing; it must not exist (O_EXCL refuses a link there too)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    return os.fdopen(fd, "wb")


def create_temp(tmp: Path) -> BinaryIO:
    """Open the temp file tmp (from temp_path) for writing, created fresh: what was there is
    removed first, and a link planted there meanwhile is refused, never written through."""
    remove_temp(tmp)
    return _open_new(tmp)


# ----------------------------------------------------------------------------- writing


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(final: Path, fill: Callable[[BinaryIO], object], what: str | None = None) -> None:
    """Let fill() write a temp file beside final, fsync it and rename it over final.

    Readers see the old file or the whole new one, never a part. A failure leaves final as it
    was, removes the temp file and raises MyPTError naming `what` (default: the path).
    """
    final = Path(final)
    tmp = temp_path(final)
    try:
        with create_temp(tmp) as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        intact = f"{final} is as it was" if final.exists() else ""
        raise write_error(what or str(final), exc, intact) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(final: Path, data: bytes, what: str | None = None) -> None:
    atomic_write(final, lambda f: f.write(data), what)


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


def create_file(path: Path, fill: Callable[[BinaryIO], object]) -> tuple[int, str]:
    """Create path (in a temp folder that is swapped in whole: checkpoint saves), let fill() write
    it and fsync it; (size, sha256) of what was written.

    path must not exist, and a link there is not followed. A failed write raises its OSError
    (naming path), also when fill (torch.save) hid it inside another exception.
    """
    try:
        with _open_new(path) as f:
            writer = _HashingWriter(f)
            try:
                fill(writer)
            except Exception as exc:
                if writer.error is not None and not isinstance(exc, OSError):
                    raise writer.error from exc
                raise
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise
    return writer.size, writer.digest.hexdigest()


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


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
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
        _renameat2_fn = fn
    return _renameat2_fn or None


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths on one file system; False if this OS / file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def swap_folder(new: Path, final: Path, old: Path) -> Path | None:
    """Put folder new in place of final; return the folder now holding final's old content.

    With renameat2 the swap is one atomic step and the old content ends up at new's path.
    Without it, final is renamed to old first, then new to final (a crash in between leaves
    final missing and both folders whole: the caller's recovery puts one back). Raises only if
    nothing changed.
    """
    if not os.path.lexists(final):
        os.rename(new, final)
        return None
    if exchange(new, final):
        return new
    os.rename(final, old)
    try:
        os.rename(new, final)
    except BaseException:
        os.rename(old, final)
        raise
    return old


@contextmanager
def new_folder(out: Path, flag: str = "--out") -> Iterator[Path]:
    """A temp folder beside out that becomes out (renamed, fsync'd) once the body has filled it.

    out must not exist yet, or be an empty folder. On any failure nothing appears at out.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MyPTError(f"{flag} {out} already exists and is not an empty folder; remove it or pick another {flag}")
    tmp = temp_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_temp(tmp)
        tmp.mkdir()
        yield tmp
        fsync_dir(tmp)
        if out.is_dir():
            out.rmdir()  # the empty folder the check above allowed
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except OSError as exc:
        raise write_error(f"{out}/", exc, "nothing was written there") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- reading


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_kind(mode: int) -> str | None:
    """None for a regular file; else what it is: 'a directory', 'a FIFO (named pipe)', 'a device or socket'."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    return "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a device or socket"


def check_regular_file(path: str | Path, what: str, max_bytes: int | None = None) -> Path:
    """path if it names a regular file (links followed); else MyPTError naming `what`.

    A FIFO, socket or device would block or never end when read: refused before it is opened.
    With max_bytes, a file whose size says it is larger is refused too. A size of 0 proves
    nothing (procfs and sysfs files report 0 and have content): read_limited decides by reading.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MyPTError(f"{what}: no such file") from None
    except OSError as exc:
        raise MyPTError(f"{what}: cannot be read ({exc.strerror or exc}); check the path and its permissions") from None
    if stat.S_ISDIR(st.st_mode):
        raise MyPTError(f"{what}: is a directory, not a file; pass a file")
    kind = file_kind(st.st_mode)
    if kind is not None:
        raise MyPTError(f"{what}: is {kind}, not a regular file; save its content to a file and pass that")
    if max_bytes is not None and st.st_size > max_bytes:
        raise _too_big(what, max_bytes)
    return path


def open_regular(path: str | Path, what: str, fix: str, *, dir_fd: int | None = None) -> int:
    """A read-only descriptor of path (relative to dir_fd if given), which must be a regular file
    (links followed); else MyPTError "{what}: is a FIFO (named pipe), not a regular file; {fix}".

    Checked before and after opening, and opened without blocking: a FIFO or device put in a
    file's place is refused, never waited on or read without end. OSErrors (missing, no
    permission) come through for the caller to name.
    """
    kind = file_kind(os.stat(path, dir_fd=dir_fd).st_mode)
    fd = -1
    if kind is None:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        kind = file_kind(os.fstat(fd).st_mode)
    if kind is not None:
        if fd >= 0:
            os.close(fd)
        raise MyPTError(f"{what}: is {kind}, not a regular file; {fix}")
    return fd


def _too_big(what: str, max_bytes: int) -> MyPTError:
    return MyPTError(f"{what}: is larger than {max_bytes:,} bytes, the most MyPT reads of such a file; "
                     "pass a smaller file")


def read_limited(path: str | Path, what: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most max_bytes, checked by reading (not by its reported
    size, which procfs files give as 0); every problem is a MyPTError naming `what`."""
    check_regular_file(path, what, max_bytes)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise MyPTError(f"{what}: cannot be read ({exc.strerror or exc}); check the path and its permissions") from None
    if len(data) > max_bytes:
        raise _too_big(what, max_bytes)
    return data


def is_empty(path: str | Path, what: str) -> bool:
    """True if a regular file has no bytes, found by reading one (procfs files report size 0)."""
    try:
        with open(path, "rb") as f:
            return not f.read(1)
    except OSError as exc:
        raise MyPTError(f"{what}: cannot be read ({exc.strerror or exc}); check the path and its permissions") from None


# ----------------------------------------------------------------------------- JSON

MAX_JSON_DEPTH = 100  # lists and objects inside each other; MyPT's own files nest 4 deep
MAX_JSON_BYTES = 1 << 30  # a bpe tokenizer.json of the largest vocabulary is about 250 MB


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _too_deep(value: Any, limit: int) -> bool:
    """True if value nests lists and objects more than `limit` deep (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def parse_json(text: str | bytes, source: str, line: int | None = None) -> Any:
    """Parse JSON text: the one JSON reader for every file a user can hand MyPT.

    Malformed JSON, a key repeated in one object, a number of more than 4300 digits and nesting
    deeper than MAX_JSON_DEPTH are each one MyPTError naming source (and `line`, for a line of a
    JSON-lines file). What it returns is safe to walk recursively.
    """
    where = source if line is None else f"{source} line {line}"
    deep = f"{where}: lists and objects are nested more than {MAX_JSON_DEPTH} deep; MyPT reads no JSON this deep"
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise MyPTError(f"{where}: the key '{e.key}' appears twice in one object; keep one of them") from None
    except json.JSONDecodeError as e:
        if line is not None:
            raise MyPTError(f"{where} is not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                            "JSON object (fix or remove the line)") from None
        raise MyPTError(f"{where}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise MyPTError(deep) from None
    except ValueError as e:  # an integer of more than sys.get_int_max_str_digits() digits
        raise MyPTError(f"{where}: holds a number MyPT cannot read ({str(e).split(':')[0]}); "
                        "write a number of sensible size") from None
    if isinstance(value, (dict, list)) and _too_deep(value, MAX_JSON_DEPTH):
        raise MyPTError(deep)
    return value


def read_json(path: Path, what: str = "file") -> Any:
    """Parse a JSON file, checked to be a regular UTF-8 file; every problem names the path."""
    path = Path(path)
    data = read_limited(path, str(path), MAX_JSON_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MyPTError(f"{path}: cannot be read as a UTF-8 JSON {what} ({e})") from None
    return parse_json(text, str(path))


# ----------------------------------------------------------------------------- locks


class LockHeld(MyPTError):
    """The lock is held by another process; the message names its host and pid."""


class FileLock:
    """An exclusive OS lock (flock) on `path`, held until release() or the process ends.

    The file records "host pid" of its holder, for the message another process gets. The holder
    deletes it while still holding the lock, and a process that takes a lock checks that the path
    still names the file it locked (else it tries again): so two processes never hold locks on
    two different files of one name, and no lock file is left behind.
    flock works across machines on NFS (Linux emulates it with POSIX locks there) and on local
    disks; it is released by the kernel when the holder dies, so there are no stale locks.
    """

    def __init__(self, path: Path, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock (making its folder if needed) or raise LockHeld (never waits); an OSError
        becomes a MyPTError."""
        if self._fd is not None:
            return
        try:
            self._fd = self._take()
        except OSError as exc:
            raise write_error(f"the lock file {self.path}", exc) from None

    def _open(self) -> int:
        """The lock file, opened (created if missing) without following a link or blocking; a
        path that is not a regular file of its own (a link, a FIFO, a hard link to another
        file) is refused before anything is written to it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise
            fd, kind = -1, {errno.ELOOP: "a symbolic link", errno.EISDIR: "a directory"}.get(exc.errno, "a socket")
        else:
            st = os.fstat(fd)
            kind = file_kind(st.st_mode) or ("a file with other names: hard links" if st.st_nlink > 1 else None)
        if kind is not None:
            if fd >= 0:
                os.close(fd)
            raise MyPTError(f"the lock file {self.path} is not a regular file of its own ({kind}); MyPT makes "
                            "this file itself: remove it (nothing in it is needed) and run again")
        return fd

    def _take(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
                os.close(fd)
                who = f"process {holder[1]} on host {holder[0]}" if len(holder) >= 2 else "another process"
                raise LockHeld(f"{self.what} is in use by {who}; wait for it to finish or stop it "
                               f"(lock file {self.path})") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the file was replaced while we waited: lock the one at the path now
        try:
            os.ftruncate(fd, 0)
            data, done = f"{socket.gethostname()} {os.getpid()}\n".encode(), 0
            while done < len(data):  # a short write (a file size limit) ends in an error on the next one
                done += os.pwrite(fd, data[done:], done)
        except BaseException:
            self._fd = fd
            self.release()  # deletes the lock file it could not fill
            raise
        return fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if os.lstat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)  # before unlocking: see the class docstring
        except OSError:
            pass  # already gone, or a read-only folder: the lock file stays, harmless
        os.close(self._fd)  # closing releases the flock
        self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_shipped(name: str, sha256: str) -> bytes:
    """A file shipped in mypt/assets, checked against its sha256 (a damaged install: reinstall)."""
    import importlib.resources

    resource = importlib.resources.files("mypt") / "assets" / name
    try:
        data = resource.read_bytes()
    except OSError as exc:
        raise MyPTError(f"cannot read the shipped file {resource} ({os_reason(exc)}); reinstall mypt") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise MyPTError(f"the shipped file {resource} is damaged (sha256 {digest}, expected {sha256}); "
                        "reinstall mypt")
    return data
