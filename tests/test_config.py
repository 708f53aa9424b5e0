"""Presets, validation errors and precedence (config.py), through the API and the real CLIs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from mypt.config import (
    ARCH_FIELDS,
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    TRAIN_FIELD_TYPES,
    ModelConfig,
    TrainConfig,
    apply_arch_flags,
    load_model_config,
    new_run_train_config,
)
from mypt.errors import MyPTError

PRESETS = sorted(p.name for p in (REPO / "configs").glob("*.json"))
SPEC_ARCH = {  # the spec's table: layers, heads, embed, block
    "tiny.json": (4, 4, 192, 128), "small.json": (6, 6, 384, 256), "150M.json": (16, 12, 768, 256),
    "200M.json": (16, 14, 896, 256), "250M.json": (16, 16, 1024, 256),
}


def test_all_spec_presets_and_examples_ship():
    assert set(SPEC_ARCH) | {"code.json", "shakespeare.json"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_validates_and_is_complete(name):
    raw = json.loads((REPO / "configs" / name).read_text())
    cfg = load_model_config(REPO / "configs" / name)
    assert {"name", "description", "batch_size", "block_size", "vocab_size", "n_embd", "n_head",
            "n_layer", "dropout", "bias"} <= set(raw)
    assert cfg.n_embd % cfg.n_head == 0
    if name in SPEC_ARCH:
        assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == SPEC_ARCH[name]
        assert cfg.vocab_size == 50304 and cfg.bias is False


def test_preset_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_model_config("tiny").n_embd == 192
    assert load_model_config("configs/small.json").n_embd == 384


def write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "x.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


BASE = json.loads((REPO / "configs" / "tiny.json").read_text())
BAD_CONFIGS = {
    "indivisible": ({**BASE, "n_embd": 770, "n_head": 12}, r"n_embd \(770\) must be divisible by n_head \(12\)"),
    "missing": ({k: v for k, v in BASE.items() if k != "block_size"}, r"missing required field 'block_size'"),
    "typo": ({**{k: v for k, v in BASE.items() if k != "n_layer"}, "n_layers": 4},
             r"unknown field 'n_layers' \(did you mean 'n_layer'\?\)"),
    "negative": ({**BASE, "n_layer": -2}, r"n_layer \(-2\) must be a positive integer"),
    "dropout": ({**BASE, "dropout": 1.0}, r"dropout \(1.0\) must be at least 0 and below 1"),
    "bias_type": ({**BASE, "bias": "no"}, r'bias \("no"\) must be true or false'),
    "float_layers": ({**BASE, "n_layer": 4.5}, r"n_layer \(4.5\) must be an integer"),
    "broken_json": ('{"n_layer": 4,\n  "n_head": }', r"malformed JSON at line 2, column 13"),
    "training_type": ({**BASE, "training": [1]}, r"training \(\[1\]\) must be a JSON object"),
    "training_typo": ({**BASE, "training": {"learning_rat": 1e-3}},
                      r"training: unknown field 'learning_rat' \(did you mean 'learning_rate'\?\)"),
    "training_value": ({**BASE, "training": {"warmup_iters": 1.5}},
                       r"training.warmup_iters \(1.5\) must be an integer"),
    "training_range": ({**BASE, "training": {"beta2": 1.0}}, r"training.beta2 \(1.0\) must be at least 0 and below 1"),
    "position": ({**BASE, "position": "alibi"}, r'position \("alibi"\) must be one of learned, rope'),
    "norm": ({**BASE, "norm": "batchnorm"}, r'norm \("batchnorm"\) must be one of layernorm, rmsnorm'),
    "mlp": ({**BASE, "mlp": "relu"}, r'mlp \("relu"\) must be one of gelu, swiglu, relu2'),
    "qk_norm_type": ({**BASE, "qk_norm": "yes"}, r'qk_norm \("yes"\) must be true or false'),
    "kv_heads": ({**BASE, "n_kv_head": 3}, r"n_kv_head \(3\) must divide n_head \(4\)"),
    "rope_odd_head": ({**BASE, "position": "rope", "n_embd": 12, "n_head": 4},
                      r"position rope needs an even head size; n_embd / n_head is 3"),
    "rope_theta": ({**BASE, "rope_theta": 0}, r"rope_theta \(0\) must be a number from 1 to 1e\+12"),
    "rope_theta_huge_int": ({**BASE, "rope_theta": 10**400}, r"rope_theta \(1000000\d+\.\.\.\) must be a number"),
    "norm_eps_tiny": ({**BASE, "norm_eps": 1e-300}, r"norm_eps \(1e-300\) must be a number from 1e-12 to 1"),
    "n_layer_huge": ({**BASE, "n_layer": 10**8}, r"n_layer \(100000000\) must be at most 1,024"),
    "block_size_huge": ({**BASE, "block_size": 10**400}, r"block_size \(1000000\d+\.\.\.\) must be at most"),
    "intermediate": ({**BASE, "intermediate_size": 0}, r"intermediate_size \(0\) must be a positive integer"),
    "optimizer": ({**BASE, "training": {"optimizer": "sgd"}}, r"training.optimizer \(sgd\) must be one of adamw, muon"),
    "muon_momentum": ({**BASE, "training": {"muon_momentum": 1}},
                      r"training.muon_momentum \(1\) must be at least 0 and below 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_config_errors_name_the_file_and_field(tmp_path, case):
    data, pattern = BAD_CONFIGS[case]
    path = write(tmp_path, data)
    with pytest.raises(MyPTError, match=pattern) as info:
        load_model_config(path)
    assert str(path) in str(info.value)


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, {**BASE, "n_embd": 770, "n_head": 12, "n_layer": 0, "bogus": 1})
    with pytest.raises(MyPTError) as info:
        load_model_config(path)
    message = str(info.value)
    assert message.count("\n  - ") == 3 and "3 problems" in message
    for part in ("n_embd (770)", "n_layer (0)", "unknown field 'bogus'"):
        assert part in message


@pytest.mark.parametrize("case", ["indivisible", "missing", "typo", "negative", "broken_json", "training_range"])
@pytest.mark.parametrize("script", ["scripts/show_configs.py", "train.py"])
def test_cli_exits_2_with_one_message_and_writes_nothing(tmp_path, case, script):
    data, pattern = BAD_CONFIGS[case]
    path = write(tmp_path, data)
    args = ["--config_file", str(path)]
    if script == "train.py":
        args += ["--model_name", "m", "--max_iters", "1"]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli(*args, cwd=tmp_path, script=script)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and str(path) in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no checkpoints/, no cache


def test_unknown_preset_lists_the_known_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MyPTError, match=r"no such file. Presets: .*tiny"):
        load_model_config("configs/nope.json")


def test_config_file_that_is_a_directory(tmp_path):
    (tmp_path / "d.json").mkdir()
    with pytest.raises(MyPTError, match="is a directory"):
        load_model_config(tmp_path / "d.json")


def test_preset_wins_over_arch_flags_with_a_warning_per_ignored_flag():
    preset = load_model_config("tiny")
    cfg, warnings = apply_arch_flags(preset, {"n_layer": 8, "n_head": 4, "n_embd": None}, "configs/tiny.json")
    assert cfg == preset
    assert warnings == ["--n_layer 8 ignored: configs/tiny.json sets n_layer = 4"]  # n_head agrees: no warning


def test_arch_flags_apply_without_a_preset():
    cfg, warnings = apply_arch_flags(None, {"n_layer": 2, "n_embd": 64, "n_head": 2}, None)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head) == (2, 64, 2) and warnings == []
    with pytest.raises(MyPTError, match=r"n_embd \(65\) must be divisible by n_head \(2\)"):
        apply_arch_flags(None, {"n_embd": 65, "n_head": 2}, None)


def test_train_cli_prints_the_precedence_warning(tmp_path, small_text):
    result = run_cli("--config_file", "tiny", "--n_layer", "8", "--model_name", "m", "--input_file",
                     str(small_text), "--max_iters", "0", cwd=tmp_path)
    assert result.returncode == 2  # --max_iters 0 is rejected before anything else happens
    assert "--max_iters (0) must be a positive integer" in result.stderr
    result = run_cli("--config_file", str(REPO / "configs" / "tiny.json"), "--n_layer", "8", "--block_size", "16",
                     "--model_name", "../m", cwd=tmp_path)
    assert result.returncode == 2 and "--model_name" in result.stderr


def test_train_config_collects_flag_errors():
    with pytest.raises(MyPTError) as info:
        TrainConfig(max_iters=-1, eval_iters=0, learning_rate=-1e-3, dtype="int8")
    message = str(info.value)
    for part in ("--max_iters (-1)", "--eval_iters (0)", "--learning_rate (-0.001)", "--dtype (int8)"):
        assert part in message


def test_model_config_round_trips_through_json():
    cfg = load_model_config("small")
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())), "x") == cfg


@pytest.mark.parametrize("name", PRESETS)
def test_absent_architecture_fields_mean_gpt2_and_are_left_out_of_saved_configs(name):
    cfg = load_model_config(REPO / "configs" / name)
    raw = json.loads((REPO / "configs" / name).read_text())
    saved = cfg.to_dict()
    assert ModelConfig.from_dict(json.loads(json.dumps(saved)), "x") == cfg
    if not set(raw) & set(ARCH_FIELDS):  # a GPT-2 preset: its config.json has no new field
        assert (cfg.position, cfg.norm, cfg.mlp, cfg.qk_norm, cfg.kv_heads, cfg.tie_embeddings, cfg.zero_init) == \
            ("learned", "layernorm", "gelu", False, cfg.n_head, True, False)
        assert not set(saved) & set(ARCH_FIELDS)


def test_preset_training_block_sets_defaults_that_flags_override(tmp_path):
    path = write(tmp_path, {**BASE, "training": {"learning_rate": 5e-3, "warmup_iters": 30, "min_lr": None}})
    cfg = load_model_config(path)
    assert cfg.training == {"learning_rate": 5e-3, "warmup_iters": 30, "min_lr": None}
    assert ModelConfig.from_dict(cfg.to_dict(), "x") == cfg
    assert "training" not in load_model_config("tiny").to_dict()  # presets without one save none
    tc, used = new_run_train_config(cfg, {"warmup_iters": 5, "max_iters": 9})
    assert (tc.learning_rate, tc.warmup_iters, tc.max_iters, tc.min_lr) == (5e-3, 5, 9, None)
    assert used == {"learning_rate": 5e-3, "min_lr": None}


# Every number a config file holds, given the values that once got through: a 400-digit integer
# (OverflowError when made a float), 1e309 (infinity in JSON), -1, NaN and Infinity (which
# Python's json reads) and the string "nan".
HOSTILE = {"huge_int": "1" + "0" * 400, "overflow": "1e309", "negative": "-1", "nan": "NaN",
           "infinity": "Infinity", "nan_string": '"nan"'}
NUMBER_FIELDS = [k for k, t in {**REQUIRED_FIELDS, **OPTIONAL_FIELDS, **ARCH_FIELDS}.items() if t in (int, float)]
TRAIN_NUMBERS = [k for k, t in TRAIN_FIELD_TYPES.items() if t in (int, float)]


@pytest.mark.parametrize("value", HOSTILE.values(), ids=HOSTILE.keys())
@pytest.mark.parametrize("field", NUMBER_FIELDS + [f"training.{k}" for k in TRAIN_NUMBERS])
def test_every_number_in_a_config_is_range_checked(tmp_path, field, value):
    key = field.split(".")[-1]
    placeholder = {**BASE, "training": {key: 12345}} if field.startswith("training.") else {**BASE, key: 12345}
    text = json.dumps(placeholder).replace("12345", value)
    path = write(tmp_path, text)
    with pytest.raises(MyPTError) as info:
        load_model_config(path)
    assert str(path) in str(info.value) and key in str(info.value)
    assert len(str(info.value)) < 1000  # a 400-digit number is cut, not pasted whole


def test_seed_check_is_shared():
    from mypt.config import MAX_SEED, seed_problem

    assert seed_problem(0) is None and seed_problem(MAX_SEED) is None
    for bad in (-1, MAX_SEED + 1, 2**64, True, 1.5, "1"):
        assert seed_problem(bad, "--seed") is not None
