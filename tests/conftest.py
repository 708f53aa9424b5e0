"""Shared test fixtures: a tiny model config, the shared corpus, and CLI runners.

Tests train 2-layer, 32-64 wide models so the whole suite stays within minutes on 2 CPU cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Tests train 32-wide models: intra-op threads only fight each other on a small shared machine
# (measured up to 50x slower per iteration). Child processes inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Ctrl-C tests send SIGINT: a test run started as a background job (`cmd &` in a script) inherits
# it ignored, and so would every child; give it Python's default handler, which children get too.
signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parents[1]
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


def corpus_text(n_chars: int | None = None) -> str:
    """The first n_chars (default: all) of tinyshakespeare, the corpus the tests train on: MyPT's own shipped
    copy (`builtin:tinyshakespeare`), so a clone with nothing beside it runs the tests."""
    from mypt.data.builtin import TINYSHAKESPEARE, builtin_text

    return builtin_text(TINYSHAKESPEARE)[:n_chars]


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole of tinyshakespeare as a file (for tests that pass it as --input_file)."""
    path = tmp_path_factory.mktemp("corpus") / "tinyshakespeare.txt"
    path.write_text(corpus_text(), encoding="utf-8")
    return path


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


def fix_manifest(ckpt: Path, name: str) -> None:
    """Make the manifest in ckpt/training_state.json agree with the current bytes of ckpt/name, as
    someone tampering with the folder would: the checks past the manifest must then catch it."""
    state_path = ckpt / "training_state.json"
    state = json.loads(state_path.read_text())
    data = (ckpt / name).read_bytes()
    state["manifest"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    state_path.write_text(json.dumps(state, indent=2))


def assert_same(a: Any, b: Any, where: str) -> None:
    """a and b (tensors, or dicts / lists / tuples of them and plain values, as torch.load gives a
    saved state) are equal bit for bit, dtypes included; a difference is named by its path."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where}: largest difference {(a.double() - b.double()).abs().max().item()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def refused_import(tmp_path: Path, source: Path, breaker: Callable[[Path], None],
                   capsys: pytest.CaptureFixture) -> str:
    """Import a broken copy of the transformers folder `source`: exit 2, nothing written; the error."""
    import shutil

    from mypt.cli import run_command

    folder = tmp_path / "hf"
    shutil.copytree(source, folder)
    breaker(folder)
    ck = tmp_path / "ck"
    assert run_command("import", ["--hf_dir", str(folder), "--model_name", "x", "--checkpoints_dir", str(ck)]) == 2
    assert not (ck / "x").exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def mypt_greedy(model: Any, ids: Any, steps: int) -> Any:
    """Greedy continuation of ids (B, T) by a MyPT GPT, one full forward per token."""
    import torch

    for _ in range(steps):
        logits, _ = model(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def hf_greedy(model: Any, ids: Any, steps: int) -> Any:
    """Greedy continuation of ids (B, T) by a transformers model: exactly `steps` new tokens."""
    import torch

    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                          do_sample=False, pad_token_id=0)


def spread_checkpoint(folder: Path, fields: dict, tok: Any = None, seed: int = 0) -> Path:
    """A MyPT checkpoint at folder with random, well-spread weights (norm gains near 1, the rest of
    std 0.5, so greedy choices are far from ties: no training needed) and tok (default gpt2)."""
    import torch

    from mypt.checkpoint import save_checkpoint
    from mypt.config import ModelConfig
    from mypt.model import GPT
    from mypt.tokenizers import GPT2Tokenizer

    torch.manual_seed(seed)
    tok = tok or GPT2Tokenizer()
    cfg = ModelConfig(**{"vocab_size": tok.model_vocab_size(), **fields})
    model = GPT(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            gain = 1.0 if "norm" in n or "ln_" in n else 0.0
            p.copy_(torch.randn_like(p) * (0.3 if gain else 0.5) + gain)
    save_checkpoint(folder, model_state=model.state_dict(), config=cfg.to_dict(), tokenizer=tok.to_json(),
                    training_state={"iteration": 3}, optimizer_state={})
    return folder
