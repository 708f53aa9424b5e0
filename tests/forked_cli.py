"""Run train.py / generate.py as real child processes forked from a warm interpreter.

`python train.py` spends 2-3 s importing torch before it reads its first flag; on two shared
CPU cores that would stretch the crash-safety and bad-input catalogues (dozens of runs) to
minutes. Instead one server process imports torch and mypt once, then forks a child per
command. The child runs exactly what the scripts run (`mypt.cli.run_command`) in its own
working directory and environment, writes its own stdout / stderr files, has its own exit
status, and can be signalled or SIGKILLed like any process; `fsize_limit` gives it a file size
limit (RLIMIT_FSIZE), as `ulimit -f` would. test_resume's Ctrl-C test starts `python train.py`
itself, so the script and a fresh interpreter are covered too.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A 32-wide model gains nothing from intra-op threads, and on a loaded 2-core machine OpenMP
# threads spinning against each other make an iteration up to 50 times slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

_SERVER = r"""
import json, os, resource, signal, sys, traceback
import torch, torch._dynamo, matplotlib  # torch.optim imports torch._dynamo on first use (3 s)
matplotlib.use("Agg")
import matplotlib.pyplot
import mypt.cli, mypt.cli.train, mypt.train_run, mypt.api
from mypt.cli import run_command


def child(req):
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if req["fsize_limit"] is not None:  # a full disk, as `ulimit -f` makes one
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize_limit"], req["fsize_limit"]))
    sys.argv = [req["script"], *req["args"]]
    code = 1
    try:
        code = run_command(req["command"], req["args"], prog="python " + req["script"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "spawn":
        pid = os.fork()
        if pid == 0:
            child(req)
        reply = {"pid": pid}
    else:
        done, status = os.waitpid(req["pid"], os.WNOHANG)
        reply = {"returncode": os.waitstatus_to_exitcode(status) if done else None}
    print(json.dumps(reply), flush=True)
"""

_server: subprocess.Popen | None = None
_live: set[int] = set()
_logs: Path | None = None  # where runs write stdout/stderr: outside every working directory


def _request(req: dict) -> dict:
    global _server
    if _server is None or _server.poll() is not None:
        env = {**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1"}
        _server = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        atexit.register(_shutdown)
    assert _server.stdin is not None and _server.stdout is not None
    _server.stdin.write(json.dumps(req) + "\n")
    _server.stdin.flush()
    line = _server.stdout.readline()
    if not line:
        raise RuntimeError("the fork server died; run the test with -s to see its traceback")
    return json.loads(line)


def _shutdown() -> None:
    for pid in list(_live):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if _server is not None and _server.poll() is None:
        assert _server.stdin is not None
        _server.stdin.close()
        _server.wait(timeout=30)
    if _logs is not None:
        shutil.rmtree(_logs, ignore_errors=True)


class Run:
    """One forked run of a script: like subprocess.Popen, with stdout/stderr kept in files."""

    def __init__(self, *args: str, cwd: Path, env: dict | None = None, script: str = "train.py",
                 fsize_limit: int | None = None) -> None:
        global _logs
        if _logs is None:
            _logs = Path(tempfile.mkdtemp(prefix="mypt-runs-"))
        self.stdout_path = _logs / f"run-{time.monotonic_ns()}.out"
        self.stderr_path = self.stdout_path.with_suffix(".err")
        command = Path(script).stem
        reply = _request({"op": "spawn", "command": command, "script": script, "args": list(args),
                          "cwd": str(cwd), "env": {**os.environ, **(env or {})},
                          "stdout": str(self.stdout_path), "stderr": str(self.stderr_path),
                          "fsize_limit": fsize_limit})
        self.pid: int = reply["pid"]
        self.returncode: int | None = None
        _live.add(self.pid)

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = _request({"op": "poll", "pid": self.pid})["returncode"]
            if self.returncode is not None:
                _live.discard(self.pid)
        return self.returncode

    def wait(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"run {self.pid} still running after {timeout} s:\n{self.stdout}")
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> int:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        return self.wait()

    @property
    def stdout(self) -> str:
        return _read(self.stdout_path)

    @property
    def stderr(self) -> str:
        return _read(self.stderr_path)


def _read(path: Path) -> str:
    """What a run wrote so far ("" before the child has opened the file)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def run(*args: str, cwd: Path, env: dict | None = None, script: str = "train.py",
        timeout: float = 120, fsize_limit: int | None = None) -> Run:
    """Run a script to completion; the finished Run has returncode, stdout and stderr."""
    r = Run(*args, cwd=cwd, env=env, script=script, fsize_limit=fsize_limit)
    r.wait(timeout)
    return r
