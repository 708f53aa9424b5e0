"""Shared test fixtures: a tiny model config, the shared corpus, and CLI runners.

Tests train 2-layer, 32-64 wide models so the whole suite stays within minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests train 32-wide models: intra-op threads only fight each other on a small shared machine
# (measured up to 50x slower per iteration). Child processes inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TINY_ARCH = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 4,
             "dropout": 0.0, "bias": False}


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The test process itself uses one intra-op thread as well (see OMP_NUM_THREADS above)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def require(module: str, extra: str = "test") -> object:
    """Import a package a test needs; missing, the test fails (never skips) naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"{module} is not installed: these tests need the '{extra}' extra (pip install -e \".[{extra}]\")",
                    pytrace=False)


def corpus_text(n_chars: int) -> str:
    """The first n_chars of tinyshakespeare: the one corpus the tests train on, here as in CI.

    It lies in ../shared/data (CI has a read-only copy); without it the tests fail, never fall
    back to another text, so a local run and CI always see the same data.
    """
    src = SHARED_DATA / "tinyshakespeare.txt"
    if not src.is_file():
        pytest.fail(f"{src} is missing: the tests train on it (CI has it; never commit a copy)", pytrace=False)
    return src.read_text(encoding="utf-8")[:n_chars]


@pytest.fixture
def shakespeare() -> Path:
    corpus_text(1)
    return SHARED_DATA / "tinyshakespeare.txt"


@pytest.fixture
def small_text(tmp_path: Path) -> Path:
    """About 60 KB of real English text: the start of tinyshakespeare."""
    path = tmp_path / "input.txt"
    path.write_text(corpus_text(60_000), encoding="utf-8")
    return path


@pytest.fixture
def tiny_config_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_test.json"
    path.write_text(json.dumps({"name": "GPT-Test", "vocab_size": 50304, **TINY_ARCH}), encoding="utf-8")
    return path


def tiny_arch_flags() -> list[str]:
    flags = []
    for key, value in TINY_ARCH.items():
        flags += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def run_cli(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None,
            script: str = "train.py") -> subprocess.CompletedProcess:
    """Run one of the repository's scripts (train.py, generate.py, scripts/...) as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder with its bytes: to prove a command changed nothing."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
