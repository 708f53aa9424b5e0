"""train.py end to end: a real run on real text, the checkpoint folder, and the resume rules."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_ARCH, corpus_text, run_cli, snapshot, tiny_arch_flags

FAST = ["--eval_iters", "2", "--log_interval", "5", "--warmup_iters", "5", "--learning_rate", "3e-3"]


def train(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli(*tiny_arch_flags(), *FAST, *args, cwd=cwd)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A char model trained for 40 iterations on real text (shared by the tests below)."""
    cwd = tmp_path_factory.mktemp("trained")
    text = corpus_text(60_000)
    (cwd / "input.txt").write_text(text, encoding="utf-8")
    result = train(cwd, "--model_name", "m", "--tokenizer", "char", "--input_file", "input.txt",
                   "--max_iters", "40", "--eval_interval", "10")
    assert result.returncode == 0, result.stdout + result.stderr
    return cwd


def test_training_writes_the_checkpoint_folder_and_loss_falls(trained):
    folder = trained / "checkpoints" / "m"
    for name in ("model.pt", "config.json", "tokenizer.json", "training_state.json", "optimizer.pt",
                 "metrics.jsonl", "loss.png"):
        assert (folder / name).is_file(), name
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [10, 20, 30, 40]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.25  # about 0.3 over these 30 iterations, by the init
    state = json.loads((folder / "training_state.json").read_text())
    assert state["iteration"] == 40 and state["input_file"] == str(trained / "input.txt")  # absolute
    assert state["best_val_loss"] == min(r["val_loss"] for r in rows)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    n_chars = len(tokenizer["chars"])
    assert tokenizer["kind"] == "char" and tokenizer["special_tokens"] == {
        "<|endoftext|>": n_chars, "<|system|>": n_chars + 1, "<|user|>": n_chars + 2, "<|assistant|>": n_chars + 3,
        "<|end|>": n_chars + 4}
    assert config["vocab_size"] == n_chars + 5  # the characters, end-of-text and the 4 chat tokens
    weights = torch.load(folder / "model.pt", weights_only=True)
    assert weights["transformer.wte.weight"].shape == (config["vocab_size"], 32)
    assert (folder / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_with_only_the_model_name_continues(trained):
    result = run_cli("--model_name", "m", "--max_iters", "50", "--config_file", "small", "--n_layer", "6",
                     cwd=trained)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "resuming 'm' from iteration 40" in out
    assert "--config_file small ignored" in out and "--n_layer 6 ignored" in out
    folder = trained / "checkpoints" / "m"
    state = json.loads((folder / "training_state.json").read_text())
    assert state["iteration"] == 50
    assert state["train_config"]["eval_interval"] == 10  # saved training flags are the defaults on resume
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [10, 20, 30, 40, 50]


def test_resume_to_a_reached_iteration_does_nothing(trained):
    before = snapshot(trained / "checkpoints")
    result = run_cli("--model_name", "m", "--max_iters", "20", cwd=trained)
    assert result.returncode == 0
    assert "nothing to do" in result.stdout
    assert snapshot(trained / "checkpoints") == before


def test_changed_input_needs_allow_data_change(trained, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text((trained / "input.txt").read_text(encoding="utf-8")[::-1], encoding="utf-8")
    before = snapshot(trained / "checkpoints")
    result = run_cli("--model_name", "m", "--max_iters", "100", "--input_file", str(other), cwd=trained)
    assert result.returncode == 2
    assert "--allow_data_change" in result.stderr and "Traceback" not in result.stderr
    assert snapshot(trained / "checkpoints") == before


def test_new_model_without_input_trains_on_builtin_corpus_with_gpt2_offline(tmp_path):
    """The gpt2 tokenizer works with the network unplugged: sockets raise in the child process."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import socket\n"
        "def _no_network(*a, **k):\n    raise OSError('network disabled by the test')\n"
        "socket.socket.connect = _no_network\nsocket.socket.connect_ex = _no_network\n"
        "socket.create_connection = _no_network\nsocket.getaddrinfo = _no_network\n"
    )
    result = run_cli(*tiny_arch_flags(), "--model_name", "g", "--max_iters", "3", "--eval_interval", "3",
                     "--eval_iters", "1", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "no --input_file given: training on the built-in corpus" in result.stdout
    state = json.loads((tmp_path / "checkpoints" / "g" / "training_state.json").read_text())
    assert state["input_file"] == "builtin:python-docs" and state["tokenizer"] == "gpt2"
    config = json.loads((tmp_path / "checkpoints" / "g" / "config.json").read_text())
    assert config["vocab_size"] == 50304


def test_builtin_tinyshakespeare_trains_a_char_model_and_resumes_without_naming_it(tmp_path):
    """builtin:tinyshakespeare is the shipped corpus: its 65 characters (+ end-of-text) are the
    vocabulary, it is recorded as given, and a resume finds it again without --input_file."""
    result = train(tmp_path, "--model_name", "s", "--tokenizer", "char", "--input_file", "builtin:tinyshakespeare",
                   "--max_iters", "4", "--eval_interval", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    state = json.loads((tmp_path / "checkpoints" / "s" / "training_state.json").read_text())
    assert state["input_file"] == "builtin:tinyshakespeare"
    assert state["input_sha256"] == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    assert json.loads((tmp_path / "checkpoints" / "s" / "config.json").read_text())["vocab_size"] == 70
    result = train(tmp_path, "--model_name", "s", "--max_iters", "6")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "checkpoints" / "s" / "training_state.json").read_text())["iteration"] == 6


def test_unknown_builtin_corpus_is_refused_naming_the_known_ones(tmp_path):
    result = train(tmp_path, "--model_name", "u", "--input_file", "builtin:shakespeare", "--max_iters", "2")
    assert result.returncode == 2
    assert "--input_file builtin:shakespeare: no such built-in corpus" in result.stderr
    assert "builtin:python-docs, builtin:tinyshakespeare" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints" / "u").exists()


def test_a_damaged_shipped_file_is_named_with_the_fix():
    from mypt.data.builtin import TINYSHAKESPEARE_GZ_SHA256
    from mypt.errors import MyPTError
    from mypt.fsutil import read_shipped

    assert len(read_shipped("tinyshakespeare.txt.gz", TINYSHAKESPEARE_GZ_SHA256)) == 433_884
    with pytest.raises(MyPTError, match=r"tinyshakespeare.txt.gz is damaged \(sha256 bf237b9f.*reinstall mypt"):
        read_shipped("tinyshakespeare.txt.gz", "0" * 64)


def test_preset_training_settings_are_used_and_flags_override_them(tmp_path):
    preset = json.loads((REPO / "configs" / "tiny.json").read_text())
    arch = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 4}
    preset = {**preset, **arch, "training": {"learning_rate": 4e-3, "warmup_iters": 3, "max_iters": 6,
                                              "eval_interval": 3}}
    (tmp_path / "p.json").write_text(json.dumps(preset))
    (tmp_path / "input.txt").write_text(corpus_text(20_000), encoding="utf-8")
    result = run_cli("--config_file", "p.json", "--model_name", "m", "--tokenizer", "char", "--input_file",
                     "input.txt", "--warmup_iters", "2", "--eval_iters", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "training settings from p.json: learning_rate 0.004, max_iters 6, eval_interval 3" in result.stdout
    saved = json.loads((tmp_path / "checkpoints" / "m" / "training_state.json").read_text())
    assert saved["iteration"] == 6
    assert {k: saved["train_config"][k] for k in ("learning_rate", "warmup_iters", "max_iters", "eval_interval")} \
        == {"learning_rate": 4e-3, "warmup_iters": 2, "max_iters": 6, "eval_interval": 3}


@pytest.mark.slow
def test_compile_trains_to_the_same_weights_as_eager(tmp_path):
    (tmp_path / "input.txt").write_text(corpus_text(20_000), encoding="utf-8")
    common = [*tiny_arch_flags(), *FAST, "--tokenizer", "char", "--input_file", "input.txt", "--max_iters", "3",
              "--eval_interval", "3", "--dtype", "fp32"]
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        result = run_cli(*common, "--model_name", name, *extra, cwd=tmp_path, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
    eager, compiled = (torch.load(tmp_path / "checkpoints" / n / "model.pt", weights_only=True)
                       for n in ("eager", "compiled"))
    assert eager.keys() == compiled.keys()  # saved without torch.compile's _orig_mod. prefix
    for key, tensor in eager.items():
        torch.testing.assert_close(compiled[key], tensor, rtol=1e-4, atol=1e-5, msg=key)


def test_compile_without_a_cpp_compiler_is_one_clear_error(tmp_path):
    (tmp_path / "input.txt").write_text(corpus_text(20_000), encoding="utf-8")
    before = snapshot(tmp_path)
    result = run_cli(*tiny_arch_flags(), "--model_name", "m", "--tokenizer", "char", "--input_file", "input.txt",
                     "--compile", cwd=tmp_path, env={"PATH": str(tmp_path / "no-bin"), "CXX": ""})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: --compile on a CPU needs a C++ compiler")
    assert snapshot(tmp_path) == before


def _files_with_identity(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


def test_token_cache_is_reused(tmp_path):
    (tmp_path / "input.txt").write_text(corpus_text(30_000), encoding="utf-8")
    flags = ["--model_name", "c", "--tokenizer", "char", "--input_file", "input.txt", "--eval_interval", "4"]
    first = train(tmp_path, *flags, "--max_iters", "4")
    assert first.returncode == 0, first.stderr
    cache = tmp_path / "checkpoints" / ".cache"
    before = _files_with_identity(cache)
    assert before and "preparing" in first.stderr
    again = train(tmp_path, "--model_name", "c", "--max_iters", "8")
    assert again.returncode == 0, again.stderr
    assert "preparing" not in again.stderr  # no progress bar: nothing was read or tokenized
    assert _files_with_identity(cache) == before  # not one cache file rewritten


def test_too_short_input_suggests_the_block_size_the_run_can_change(tmp_path):
    (tmp_path / "input.txt").write_text(corpus_text(300), encoding="utf-8")
    (tmp_path / "cfg.json").write_text(json.dumps({**TINY_ARCH, "block_size": 64, "vocab_size": 50304}))
    base = ["--model_name", "s", "--tokenizer", "char", "--input_file", "input.txt", "--max_iters", "2"]
    preset = run_cli(*base, "--config_file", "cfg.json", "--block_size", "8", cwd=tmp_path)
    assert preset.returncode == 2, preset.stderr
    assert re.search(r"the validation part \(--val_split 0.1, the end of its text\) has \d+, but one block needs "
                     r"block_size \+ 1 = 65; use a longer input, a config file with a smaller block_size than "
                     r"cfg.json's 64 \(--block_size does not override --config_file\) or a larger --val_split$",
                     preset.stderr.strip()), preset.stderr
    flags = run_cli(*base, "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "512", cwd=tmp_path)
    assert flags.returncode == 2 and "use a longer input, a smaller --block_size (now 512) or a smaller --val_split" \
        in flags.stderr, flags.stderr
    assert not (tmp_path / "checkpoints" / "s").exists()


def test_help_lists_flags_with_defaults(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for flag in ("--max_iters", "--learning_rate", "--warmup_iters", "--min_lr", "--grad_accum_steps",
                 "--tokenizer", "--dtype", "--compile", "--checkpoints_dir", "--seed", "--grad_clip"):
        assert flag in result.stdout
    assert "(default: 2000)" in " ".join(result.stdout.split())


def test_mypt_module_and_script_aliases_run_the_same_code(tmp_path):
    a = subprocess.run([sys.executable, "-m", "mypt", "configs"], capture_output=True, text=True, cwd=REPO)
    b = run_cli(cwd=REPO, script="scripts/show_configs.py")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout
