"""scripts/show_configs.py: the table, the detail view and the memory estimate."""

from __future__ import annotations

import json
import re

import pytest
from conftest import REPO, run_cli

from mypt.config import load_model_config
from mypt.errors import MyPTError
from mypt.estimate import count_params, estimate_memory, max_batch_size, parse_memory

PRESETS = sorted(p.name for p in (REPO / "configs").glob("*.json"))


def test_table_lists_every_preset_with_its_exact_count():
    result = run_cli(cwd=REPO, script="scripts/show_configs.py")
    assert result.returncode == 0, result.stderr
    for name in PRESETS:
        cfg = load_model_config(REPO / "configs" / name)
        row = re.search(rf"^{re.escape(name)}\s+(\S+)\s+(\S+)\s+(\d+)\s+(\d+)\s+(\d+)$", result.stdout, re.M)
        assert row, f"{name} missing from:\n{result.stdout}"
        assert row.group(1) == cfg.name
        assert row.group(2) == f"{count_params(cfg) / 1e6:.2f}M"
        assert tuple(map(int, row.groups()[2:])) == (cfg.n_layer, cfg.n_head, cfg.n_embd)
    assert "Available Model Configurations" in result.stdout


@pytest.mark.parametrize("name", PRESETS)
def test_detail_view_shows_exact_total_breakdown_and_estimate(name):
    result = run_cli("--config_file", f"configs/{name}", "--memory", "8GB", cwd=REPO,
                     script="scripts/show_configs.py")
    assert result.returncode == 0, result.stderr
    cfg = load_model_config(REPO / "configs" / name)
    n = count_params(cfg)
    assert f"Total       : {n:,} ({n / 1e6:.2f}M)" in result.stdout
    assert "Per layer   : " in result.stdout and "Architecture:" in result.stdout
    assert f"python train.py --config_file configs/{name}" in result.stdout
    for key, value in cfg.training.items():  # a preset's tuned training settings are shown
        assert f"  --{key} {value}\n" in result.stdout
    for precision in ("fp32", "bf16"):
        fits = estimate_memory(cfg, cfg.batch_size, precision).total <= 8 * 2**30
        line = re.search(rf"^\s+{precision}\s*: (yes|no.*)$", result.stdout, re.M).group(1)
        assert line.startswith("yes") == fits
        if not fits:
            assert f"largest batch_size that fits: {max_batch_size(cfg, 8 * 2**30, precision)}" in line


def test_150M_fits_8GB_in_bf16_but_not_fp32_at_batch_32():
    cfg = load_model_config("150M")
    assert estimate_memory(cfg, 32, "bf16").total <= 8 * 2**30 < estimate_memory(cfg, 32, "fp32").total
    best = max_batch_size(cfg, 8 * 2**30, "fp32")
    assert estimate_memory(cfg, best, "fp32").total <= 8 * 2**30 < estimate_memory(cfg, best + 1, "fp32").total


@pytest.mark.parametrize("name", ["small", "150M"])
def test_gradient_checkpointing_shrinks_the_activation_estimate(name):
    cfg = load_model_config(name)
    plain = estimate_memory(cfg, cfg.batch_size, "fp32").activations
    checkpointed = estimate_memory(cfg, cfg.batch_size, "fp32", checkpointing=True).activations
    assert checkpointed < plain
    if cfg.n_layer >= 12:  # where the blocks, not the loss head, hold most activations
        assert checkpointed < plain / 2


def test_broken_config_in_folder_is_listed_and_does_not_hide_others(tmp_path):
    (tmp_path / "good.json").write_text((REPO / "configs" / "tiny.json").read_text())
    (tmp_path / "bad.json").write_text(json.dumps({"n_layer": 2}))
    result = run_cli("--configs_dir", str(tmp_path), cwd=tmp_path, script="scripts/show_configs.py")
    assert result.returncode == 0
    assert re.search(r"^good.json\s+GPT-Tiny\s+11.45M", result.stdout, re.M)
    assert re.search(r"^bad.json\s+\(invalid\)", result.stdout, re.M)
    assert "missing required field 'n_head'" in result.stdout


def test_parse_memory():
    assert parse_memory("8GB") == 8 * 2**30 and parse_memory("512 MiB") == 512 * 2**20
    with pytest.raises(MyPTError, match="--memory"):
        parse_memory("lots")
