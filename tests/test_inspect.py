"""scripts/inspect_model.py / mypt inspect: what a checkpoint folder holds, without loading it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY_ARCH, corpus_text, run_cli, tiny_arch_flags
from forked_cli import ONE_THREAD

from mypt.checkpoint import save_checkpoint
from mypt.cli import run_command
from mypt.config import ModelConfig
from mypt.estimate import count_params, human_bytes


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A working folder with input.txt and checkpoints/m, a char model trained for 10 iterations."""
    cwd = tmp_path_factory.mktemp("inspect")
    text = corpus_text(20_000)
    (cwd / "input.txt").write_text(text, encoding="utf-8")
    result = run_cli(*tiny_arch_flags(), "--model_name", "m", "--tokenizer", "char", "--input_file", "input.txt",
                     "--max_iters", "10", "--eval_interval", "5", "--eval_iters", "2", cwd=cwd, env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    return cwd


@pytest.fixture
def workdir(trained, tmp_path, monkeypatch) -> Path:
    """A private copy of the trained folder, as the current directory."""
    work = tmp_path / "work"
    shutil.copytree(trained, work)
    monkeypatch.chdir(work)
    return work


def inspect(capsys, *args: str) -> tuple[int, str, str]:
    code = run_command("inspect", ["--model_name", "m", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_script_reports_config_training_files_and_curve(trained):
    result = run_cli("--model_name", "m", cwd=trained, script="scripts/inspect_model.py")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    folder = trained / "checkpoints" / "m"
    config = json.loads((folder / "config.json").read_text())
    state = json.loads((folder / "training_state.json").read_text())
    n_params = count_params(ModelConfig.from_dict(config, "config"))
    n_chars = len(json.loads((folder / "tokenizer.json").read_text())["chars"])
    for line in (
        "Layers        : 2", "Heads         : 2", "Embedding     : 32", "Block size    : 32",
        f"Vocab size    : {config['vocab_size']}", "Bias          : False",
        f"Parameters    : {n_params:,} ({n_params / 1e6:.2f}M)",
        f"Tokenizer     : char, {n_chars + 5:,} tokens (end-of-text {n_chars}, chat tokens {n_chars + 1}-"
        f"{n_chars + 4}; char-",
        "Iteration     : 10",
        f"Best val loss : {state['best_val_loss']:.4f}",
        f"Last val loss : {state['last_val_loss']:.4f}",
        f"Input file    : {trained / 'input.txt'} (present; --verify compares its content with the sha256 "
        "recorded at training)",
        "Loss curve: checkpoints/m/loss.png",
    ):
        assert line in out, line
    for name in ("model.pt", "optimizer.pt", "config.json", "tokenizer.json", "training_state.json",
                 "metrics.jsonl", "loss.png"):
        size = human_bytes((folder / name).stat().st_size)
        assert any(row.split()[:1] == [name] and row.rstrip().endswith(size) for row in out.splitlines()), name


def test_input_file_changed_or_missing(trained, workdir, capsys):
    state = workdir / "checkpoints" / "m" / "training_state.json"  # as if trained here (paths are absolute)
    state.write_text(state.read_text().replace(str(trained), str(workdir)))
    code, out, _ = inspect(capsys, "--verify")
    assert code == 0 and "input.txt (unchanged: matches the sha256 recorded at training)" in out
    (workdir / "input.txt").write_text("other text", encoding="utf-8")
    code, out, _ = inspect(capsys)
    assert code == 0 and "input.txt (present; --verify compares" in out  # not read without --verify
    code, out, _ = inspect(capsys, "--verify")
    assert code == 0 and "input.txt (CHANGED since training: resuming needs --allow_data_change)" in out
    (workdir / "input.txt").unlink()
    code, out, _ = inspect(capsys)
    assert code == 0 and "input.txt (MISSING here: resuming needs --input_file)" in out


def test_verify_checks_the_manifest(workdir, capsys):
    path = workdir / "checkpoints" / "m" / "optimizer.pt"
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF
    path.write_bytes(bytes(data))
    code, out, _ = inspect(capsys)
    assert code == 0 and "DIFFERS" not in out  # same size: only --verify reads the bytes
    code, out, _ = inspect(capsys, "--verify")
    assert "SHA256 DIFFERS from the manifest" in next(r for r in out.splitlines() if "optimizer.pt" in r)
    assert "sha256 ok" in next(r for r in out.splitlines() if "model.pt" in r)
    path.write_bytes(bytes(data[:100]))
    (workdir / "checkpoints" / "m" / "tokenizer.json").unlink()
    code, out, _ = inspect(capsys)
    assert "SIZE DIFFERS from the manifest" in next(r for r in out.splitlines() if "optimizer.pt" in r)
    assert "tokenizer.json is missing" in out
    assert any(r.split() == ["tokenizer.json", "MISSING"] for r in out.splitlines())


def test_unknown_model_lists_the_models(workdir, capsys):
    code, _, err = inspect(capsys, "--model_name", "nope")
    assert code == 2 and "no model named 'nope'" in err and "models there: m" in err


def test_model_without_input_file_and_weights_only_folder(workdir, capsys):
    cfg = ModelConfig(**TINY_ARCH, vocab_size=50304)
    from mypt.model import GPT

    save_checkpoint(workdir / "checkpoints" / "imp", model_state=GPT(cfg).state_dict(), config=cfg.to_dict(),
                    tokenizer={"kind": "gpt2"}, optimizer_state={},
                    training_state={"iteration": 0, "input_file": None, "imported_from": "/models/gpt2"})
    code, out, _ = inspect(capsys, "--model_name", "imp")
    assert code == 0
    assert "Tokenizer     : gpt2, 50,257 tokens" in out and "Best val loss : not evaluated yet" in out
    assert "Input file    : none recorded" in out and "Imported from : /models/gpt2" in out
    assert "Loss curve: none yet" in out and "MISSING" not in out

    assert run_command("export", ["--model_name", "m", "--format", "safetensors",
                                  "--out", "checkpoints/w"]) == 0
    capsys.readouterr()
    code, out, _ = inspect(capsys, "--model_name", "w", "--verify")
    assert code == 0 and "MISSING" not in out and "weights only" in out
    assert "sha256 ok" in next(r for r in out.splitlines() if "model.safetensors" in r)
