"""Every command in the README runs as written (iteration counts shrunk to keep CI fast)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, corpus_text, require

SHRINK = {"--eval_interval": "2", "--eval_iters": "1", "--max_new_tokens": "8",
          "--max_chars": "3000"}


def readme_text() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def readme_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", readme_text(), re.S)


def to_argv(line: str) -> list[str] | None:
    """A README line as an argv for this test: None for lines that set up the environment."""
    line = line.split("  # ")[0].strip()
    if not line or line.startswith(("#", "pip ", "python3 -m venv", "torchrun", "tensorboard")):
        return None
    argv = shlex.split(line)
    if argv[0] == "mypt":
        argv = [sys.executable, "-m", "mypt", *argv[1:]]
    elif argv[0] == "python":
        argv[0] = sys.executable
        if argv[1].endswith(".py"):
            argv[1] = str(REPO / argv[1])
    for i, arg in enumerate(argv[:-1]):
        if arg in SHRINK:
            argv[i + 1] = SHRINK[arg]
        elif arg == "--max_iters":
            argv[i + 1] = str(int(argv[i + 1]) // 100)  # 300 -> 3, then resumed to 400 -> 4
    if "--max_iters" in argv and "--eval_interval" not in argv:
        argv += ["--eval_interval", "2", "--eval_iters", "1"]
    return argv


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"{argv}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_setup_demo_command_trains_and_generates(tmp_path):
    demo = readme_blocks()[0].strip()
    steps = [to_argv(part) for part in demo.split(" && ")]
    steps = [s for s in steps if s and not s[0].startswith(".")]
    assert [Path(s[1]).name for s in steps] == ["train.py", "generate.py"]
    run(steps[0], tmp_path)
    out = run(steps[1], tmp_path).stdout
    assert out.startswith("The ") and len(out) > len("The ")


def test_ci_runs_exactly_the_readmes_test_command_which_installs_the_tested_torch():
    test_command = readme_blocks()[1].strip()
    assert test_command == "bash scripts/test.sh"
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == test_command
    script = (REPO / "scripts" / "test.sh").read_text()
    assert "pip install -q torch==2.13.0 -e \".[test]\"" in script and "apt-get install" in script
    assert "pip install torch==2.13.0 -e . && python train.py" in readme_blocks()[0]
    # the package itself asks for a range, so a user's own torch build (CUDA, ROCm) is kept
    assert '"torch>=2.9",' in (REPO / "pyproject.toml").read_text() and "torch>=2.9" in readme_text()


@pytest.mark.slow
def test_walkthrough_runs_as_written(tmp_path):
    text = corpus_text(200_000)
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    walkthrough = next(b for b in readme_blocks() if "show_configs.py" in b and "demo_tiny" in b)
    lines = [argv for argv in map(to_argv, walkthrough.splitlines()) if argv]
    assert len(lines) >= 10
    outputs = [run(argv, tmp_path).stdout for argv in lines]
    joined = "\n".join(outputs)
    assert "Available Model Configurations" in joined
    assert "resuming 'demo_tiny' from iteration 3" in joined
    assert (tmp_path / "checkpoints" / "demo_tiny" / "loss.png").exists()
    assert (tmp_path / "exports" / "demo_tiny" / "config.json").exists()
    assert outputs[-1].startswith("ROMEO:")  # transformers generated from the exported folder


def test_char_quick_start_command_runs_with_the_presets_training_settings(tmp_path):
    block = next(b for b in readme_blocks() if "shakespeare-char.json" in b)
    argv = to_argv(block.strip())
    assert argv[argv.index("--input_file") + 1] == "builtin:tinyshakespeare"
    out = run([*argv, "--max_iters", "4", "--eval_interval", "2", "--eval_iters", "1"], tmp_path).stdout
    assert "training settings from configs/shakespeare-char.json: learning_rate 0.006, warmup_iters 30" in out
    assert (tmp_path / "checkpoints" / "sc" / "model.pt").is_file()


def test_modern_quick_start_command_runs_with_the_presets_recipe(tmp_path):
    block = next(b for b in readme_blocks() if "--model_name scm" in b)
    argv = to_argv(block.strip().splitlines()[0])
    assert argv[argv.index("--input_file") + 1] == "builtin:tinyshakespeare"
    out = run([*argv, "--max_iters", "4", "--eval_interval", "2", "--eval_iters", "1"], tmp_path).stdout
    assert "training settings from configs/shakespeare-char-modern.json: optimizer muon" in out
    saved = json.loads((tmp_path / "checkpoints" / "scm" / "config.json").read_text())
    assert (saved["position"], saved["mlp"], saved["qk_norm"]) == ("rope", "relu2", True)


def test_readme_preset_table_matches_the_files_and_exact_counts():
    from mypt.config import load_model_config
    from mypt.estimate import count_params

    rows = re.findall(r"^\| `(\S+\.json)` \| (\S+) \| ([\d,]+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$",
                      (REPO / "README.md").read_text(encoding="utf-8"), re.M)
    assert {r[0] for r in rows} == {p.name for p in (REPO / "configs").glob("*.json")}
    for file, name, count, *numbers in rows:
        cfg = load_model_config(REPO / "configs" / file)
        assert (name, int(count.replace(",", ""))) == (cfg.name, count_params(cfg))
        assert list(map(int, numbers)) == [cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.batch_size]


def _data_files(root: Path) -> None:
    """The files the README's training-data examples name, made of real text."""
    import gzip
    import json

    pa, pq = require("pyarrow", "data"), require("pyarrow.parquet", "data")

    paras = [p for p in corpus_text(200_000).split("\n\n") if p.strip()]
    (root / "books" / "poems").mkdir(parents=True)
    (root / "books" / "a.txt").write_text("\n\n".join(paras[0::8]), encoding="utf-8")
    (root / "books" / "poems" / "b.md").write_text("\n\n".join(paras[1::8]), encoding="utf-8")
    (root / "crawl" / "2024").mkdir(parents=True)
    with gzip.open(root / "crawl" / "2024" / "part0.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"url": f"u{i}", "content": p}) + "\n" for i, p in enumerate(paras[2::8]))
    pq.write_table(pa.table({"text": paras[3::8]}), root / "pages.parquet")
    (root / "pages").mkdir()
    pq.write_table(pa.table({"content": paras[4::8]}), root / "pages" / "p0.parquet")
    (root / "notes.txt").write_text("\n\n".join(paras[5::8]), encoding="utf-8")
    (root / "essays.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paras[6::8]))
    (root / "code" / "pkg").mkdir(parents=True)
    for i in range(40):
        (root / "code" / "pkg" / f"m{i}.py").write_text(
            "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n\n" for j in range(40)))


@pytest.mark.slow
def test_training_data_examples_run_as_written(tmp_path):
    """The folder, JSON lines, Parquet and mixture examples (trained for 2 iterations each)."""
    _data_files(tmp_path)
    mix = next(b for b in re.findall(r"```json\n(.*?)```", (REPO / "README.md").read_text(), re.S) if "sources" in b)
    (tmp_path / "mix.json").write_text(mix)
    blocks = [b for b in readme_blocks() if "--input_file books/" in b or "--data mix.json" in b]
    lines = [argv for b in blocks for argv in map(to_argv, b.splitlines()) if argv]
    assert len(lines) == 5
    short = ["--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1", "--block_size", "64", "--batch_size", "2"]
    outputs = [run([*argv, *(short if "train.py" in argv[1] else [])], tmp_path).stdout for argv in lines]
    assert "data: the 2 input files: 2 file(s), 2 document(s)" in outputs[0]
    assert "data: " in outputs[1] and "whole documents" in outputs[1]
    assert "4 file(s)" in outputs[2]
    assert outputs[3].startswith("input: 1 file(s)")
    assert all(f"data: source '{n}'" in outputs[4] for n in ("prose", "code", "web"))
