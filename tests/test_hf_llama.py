"""Llama and Qwen3 export / import (mypt.formats.hf_llama), checked against real transformers.

Models are 2 layers, 32 wide, with random weights scaled up so that greedy choices are far from
ties; transformers loads only local folders (HF_HUB_OFFLINE), never the network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import hf_greedy, mypt_greedy, refused_import, require, run_cli, spread_checkpoint
from forked_cli import ONE_THREAD

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = require("transformers")

from mypt.api import load_model  # noqa: E402
from mypt.checkpoint import load_checkpoint  # noqa: E402
from mypt.cli import run_command  # noqa: E402

SHAPE = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16, "batch_size": 4, "dropout": 0.0,
         "vocab_size": 50304}
LLAMA = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "intermediate_size": 48, "rope_theta": 500.0,
         "norm_eps": 1e-6}
VARIANTS = {
    "llama-gqa-untied": ({**LLAMA, "n_kv_head": 2, "tie_embeddings": False}, "LlamaForCausalLM"),
    "llama-tied-bias": ({**LLAMA, "bias": True}, "LlamaForCausalLM"),
    "llama-mqa": ({**LLAMA, "n_kv_head": 1}, "LlamaForCausalLM"),
    "qwen3-gqa": ({**LLAMA, "qk_norm": True, "n_kv_head": 2}, "Qwen3ForCausalLM"),
    "qwen3-untied": ({**LLAMA, "qk_norm": True, "tie_embeddings": False}, "Qwen3ForCausalLM"),
}


def make_checkpoint(root: Path, name: str, fields: dict, seed: int = 0) -> Path:
    """A MyPT checkpoint of the variant with random, well-spread weights (no training needed)."""
    return spread_checkpoint(root / name, {**SHAPE, **fields}, seed=seed)


def export(root: Path, name: str, out: Path) -> int:
    return run_command("export", ["--model_name", name, "--checkpoints_dir", str(root), "--out", str(out)])


def hf_params(model) -> int:
    return sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_export_computes_the_same_function_in_transformers(tmp_path, variant, capsys):
    fields, cls = VARIANTS[variant]
    make_checkpoint(tmp_path / "ck", "m", fields)
    assert export(tmp_path / "ck", "m", tmp_path / "hf") == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [cls]
    hf = getattr(transformers, cls).from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == cls
    lm = load_model("m", tmp_path / "ck", device="cpu")
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = lm.model(ids)[0], hf(ids).logits
        assert ours.abs().max() > 1.0  # sharp logits: the comparison means something
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
        prompt = ids[:1, :4]
        assert torch.equal(hf_greedy(hf, prompt, 12), mypt_greedy(lm.model, prompt, 12))
    assert hf_params(hf) == lm.model.num_params()
    inspected = run_cli("--model_name", "m", "--checkpoints_dir", str(tmp_path / "ck"), cwd=tmp_path,
                        script="scripts/inspect_model.py", env=ONE_THREAD)
    assert re.search(rf"Parameters\s+: {hf_params(hf):,} ", inspected.stdout), inspected.stdout


def test_qwen3_slides_its_window_past_block_size_as_mypt_does(tmp_path):
    make_checkpoint(tmp_path / "ck", "m", VARIANTS["qwen3-gqa"][0])
    assert export(tmp_path / "ck", "m", tmp_path / "hf") == 0
    hf = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    lm = load_model("m", tmp_path / "ck", device="cpu")
    ids = torch.randint(0, 50257, (1, 40), generator=torch.Generator().manual_seed(2))  # 2.5 x block_size
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, lm.model(ids)[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize(("fields", "field"), [
    ({**LLAMA, "mlp": "relu2"}, "mlp is relu2"),
    ({**LLAMA, "mlp": "gelu"}, "mlp is gelu"),
    ({**LLAMA, "norm": "layernorm"}, "norm is layernorm"),
    ({"tie_embeddings": False}, "tie_embeddings is false"),  # as config.json spells it
    ({"mlp": "relu2"}, "mlp is relu2"),
], ids=["relu2", "gelu-rope", "layernorm-rope", "gpt2-untied", "gpt2-relu2"])
def test_export_refuses_a_model_no_transformers_class_computes(tmp_path, capsys, fields, field):
    make_checkpoint(tmp_path / "ck", "m", fields)
    assert export(tmp_path / "ck", "m", tmp_path / "hf") == 2
    err = capsys.readouterr().err
    assert field in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------- import


def gpt2_tokenizer_files(root: Path, into: Path) -> None:
    make_checkpoint(root / "tokck", "tok", {})
    assert export(root / "tokck", "tok", root / "tok_src") == 0
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(root / "tok_src" / name, into / name)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def hf_folder(request, tmp_path_factory) -> Path:
    """A folder transformers itself wrote (random weights, GQA, untied head) with GPT-2 tokenizer files."""
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(5)
    common = dict(vocab_size=50304, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=24, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, rope_theta=1000.0)
    if request.param == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in n else 0.5) + (1.0 if "norm" in n else 0.0))
    model.save_pretrained(root / "model")
    gpt2_tokenizer_files(root, root / "model")
    return root / "model"


def test_import_gives_transformers_logits_then_fine_tunes_and_samples(tmp_path, hf_folder, small_text, capsys):
    ck = tmp_path / "checkpoints"
    assert run_command("import", ["--hf_dir", str(hf_folder), "--model_name", "m", "--checkpoints_dir", str(ck)]) == 0
    capsys.readouterr()
    lm = load_model("m", ck, device="cpu")
    kind = json.loads((hf_folder / "config.json").read_text())["model_type"]
    assert (lm.config.position, lm.config.norm, lm.config.mlp, lm.config.qk_norm) == \
        ("rope", "rmsnorm", "swiglu", kind == "qwen3")
    assert (lm.config.n_kv_head, lm.config.tie_embeddings, lm.config.block_size) == (2, False, 24)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    ids = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids)[0], hf(ids).logits, atol=1e-4, rtol=0)
    assert hf_params(hf) == lm.model.num_params()

    flags = ["--model_name", "m", "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1",
             "--input_file", str(small_text), "--optimizer", "muon"]
    result = run_cli(*flags, cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming 'm' from iteration 0" in result.stdout
    key = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.equal(load_checkpoint(ck / "m").model_state[key], lm.model.state_dict()[key])  # it trained
    sample = run_cli("--model_name", "m", "--prompt", "ROMEO:", "--max_new_tokens", "30", "--seed", "1",
                     "--device", "cpu", cwd=tmp_path, script="generate.py", env=ONE_THREAD)
    assert sample.returncode == 0 and sample.stdout.startswith("ROMEO:"), sample.stderr
    assert len(sample.stdout) > len("ROMEO:") + 10


def test_export_then_import_gives_identical_weights(tmp_path, capsys):
    for variant in ("llama-gqa-untied", "qwen3-gqa", "llama-tied-bias"):
        make_checkpoint(tmp_path / "ck", variant, VARIANTS[variant][0])
        assert export(tmp_path / "ck", variant, tmp_path / f"hf-{variant}") == 0
        assert run_command("import", ["--hf_dir", str(tmp_path / f"hf-{variant}"), "--model_name", f"back-{variant}",
                                      "--checkpoints_dir", str(tmp_path / "ck")]) == 0
        ours = load_checkpoint(tmp_path / "ck" / variant).model_state
        back = load_checkpoint(tmp_path / "ck" / f"back-{variant}").model_state
        assert sorted(ours) == sorted(back)
        for key in ours:
            assert torch.equal(ours[key], back[key]), f"{variant}: {key}"


def _edit(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


BROKEN = {
    "gelu": (lambda f: _edit(f, hidden_act="gelu"), "hidden_act is 'gelu'"),
    "scaled-rope": (lambda f: _edit(f, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e3},
                                    rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope type is 'linear'"),
    "shapes": (lambda f: _edit(f, intermediate_size=64), "mlp.gate_proj.weight has shape (40, 32)"),
    "model_type": (lambda f: _edit(f, model_type="mistral"), "model_type is 'mistral'"),
    "eps-text": (lambda f: _edit(f, rms_norm_eps="small"), "norm_eps (rms_norm_eps in config.json)"),
    "no-heads": (lambda f: _edit(f, num_attention_heads=0), "n_head (num_attention_heads in config.json)"),
    "width-text": (lambda f: _edit(f, hidden_size="32"), "n_embd (hidden_size in config.json)"),
    "rope-list": (lambda f: _edit(f, rope_parameters=[1]), "rope_parameters is [1]; expected an object"),
    "tie-text": (lambda f: _edit(f, tie_word_embeddings="no"),
                 "tie_embeddings (tie_word_embeddings in config.json)"),
    "theta-10**400": (lambda f: _edit(f, rope_theta=10**400, rope_parameters=None),
                      "rope_theta (1000000000000000000"),
    "layers-10**8": (lambda f: _edit(f, num_hidden_layers=10**8), "n_layer (num_hidden_layers in config.json) "
                     "(100000000) must be at most 1,024"),
    "head-dim-list": (lambda f: _edit(f, head_dim=[1], num_attention_heads=10**9),
                      "head_size (head_dim in config.json) ([1]) must be an integer"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_import_refuses_what_mypt_cannot_represent(tmp_path, hf_folder, capsys, case):
    breaker, message = BROKEN[case]
    assert message in refused_import(tmp_path, hf_folder, breaker, capsys)
