"""The shapes people import (Qwen3-0.6B, Llama-3.2-1B) with their tokenizers, against real transformers.

Qwen3's heads are wider than hidden_size / num_attention_heads (head_dim 128 of a 1024 width,
16 heads); Llama 3.2 scales its rotary frequencies (rope_scaling "llama3"). Both tie their
embeddings. The folders are written by transformers itself at 2 layers with random weights (the
real widths in one slow test); their tokenizer.json files are byte-level BPEs trained here by the
`tokenizers` library with Llama 3's and Qwen2's split patterns and special tokens. transformers
reads only local folders (HF_HUB_OFFLINE), never the network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import hf_greedy, mypt_greedy, require

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = require("transformers")

from mypt.api import load_model  # noqa: E402
from mypt.checkpoint import save_checkpoint  # noqa: E402
from mypt.cli import run_command  # noqa: E402
from mypt.config import ModelConfig  # noqa: E402
from mypt.errors import MyPTError  # noqa: E402
from mypt.estimate import count_params  # noqa: E402
from mypt.model import GPT, llama3_frequencies  # noqa: E402
from mypt.tokenizers import GPT2Tokenizer  # noqa: E402

LLAMA32_SCALING = {"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                   "original_max_position_embeddings": 8192}
# At 16 positions Llama 3.2's scaling (past 8192) changes nothing a test can see; an original
# context of 8 puts the scaled and the smoothed bands inside the tests' 16 tokens.
SHORT_SCALING = {**LLAMA32_SCALING, "original_max_position_embeddings": 8}
MODERN = {"n_layer": 2, "block_size": 16, "batch_size": 4, "dropout": 0.0, "vocab_size": 512, "position": "rope",
          "norm": "rmsnorm", "mlp": "swiglu", "norm_eps": 1e-6, "tie_embeddings": True}
MYPT_VARIANTS = {  # MyPT models of the two shapes (narrowed), and the transformers class each exports as
    "qwen3-wide-heads": ({**MODERN, "n_embd": 32, "n_head": 4, "head_size": 16, "n_kv_head": 2, "qk_norm": True,
                          "intermediate_size": 48, "rope_theta": 1e6}, "Qwen3ForCausalLM"),
    "llama3-scaled": ({**MODERN, "n_embd": 32, "n_head": 4, "n_kv_head": 2, "intermediate_size": 64,
                       "rope_theta": 500.0, "rope_scaling": SHORT_SCALING}, "LlamaForCausalLM"),
}


def spread(model: torch.nn.Module, seed: int) -> None:
    """Random weights far from ties: norm gains near 1, the rest wide."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            norm = "norm" in n or "ln_" in n
            p.copy_(torch.randn_like(p) * (0.3 if norm else 0.5) + (1.0 if norm else 0.0))


def hf_params(model) -> int:
    return sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())


def test_llama3_frequencies_are_transformers(tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for head_dim, scaling in ((64, LLAMA32_SCALING), (16, SHORT_SCALING)):
        hc = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                      max_position_embeddings=131072,
                                      rope_parameters={"rope_theta": 500000.0, **scaling})
        theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hc, "cpu")
        plain = 500000.0 ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        ours = llama3_frequencies(plain, scaling)
        assert not torch.allclose(ours, plain)  # the scaling changes some frequencies
        torch.testing.assert_close(ours.float(), theirs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling ("),
    ({"rope_scaling": {**LLAMA32_SCALING, "factor": 0}}, "rope_scaling.factor (0) must be a number above 0"),
    ({"rope_scaling": {**LLAMA32_SCALING, "low_freq_factor": 4.0}}, "must be above low_freq_factor"),
    ({"head_size": 7}, "even head size; head_size is 7"),
    ({"head_size": 0}, "head_size (0) must be a positive integer"),
    ({"position": "learned", "norm": "layernorm", "mlp": "gelu"}, "rope_scaling needs position rope"),
])
def test_config_checks_head_size_and_rope_scaling(bad, message):
    fields = {**MYPT_VARIANTS["llama3-scaled"][0], **bad}
    with pytest.raises(MyPTError) as e:
        ModelConfig.from_dict(fields, "preset.json")
    assert message in str(e.value)


def test_head_size_and_scaling_are_saved_only_when_set():
    plain = ModelConfig(**{**MODERN, "n_embd": 32, "n_head": 4})
    assert "head_size" not in plain.to_dict() and "rope_scaling" not in plain.to_dict()
    assert plain.head_dim == 8
    cfg = ModelConfig(**MYPT_VARIANTS["qwen3-wide-heads"][0])
    assert cfg.head_dim == 16 and cfg.to_dict()["head_size"] == 16
    assert ModelConfig.from_dict(cfg.to_dict(), "config.json") == cfg
    assert dict(cfg.components())["Attention"] == "4 heads of 16, 2 key/value heads (grouped-query)"


def make_checkpoint(root: Path, name: str, fields: dict) -> ModelConfig:
    cfg = ModelConfig(**fields)
    model = GPT(cfg)
    spread(model, 0)
    save_checkpoint(root / name, model_state=model.state_dict(), config=cfg.to_dict(),
                    tokenizer=GPT2Tokenizer().to_json(), training_state={"iteration": 1}, optimizer_state={})
    return cfg


@pytest.mark.parametrize("variant", sorted(MYPT_VARIANTS))
def test_export_of_wide_heads_and_scaled_rope_computes_the_same_in_transformers(tmp_path, variant, capsys):
    fields, cls = MYPT_VARIANTS[variant]
    fields = {**fields, "vocab_size": 50304}  # the gpt2 tokenizer's padded vocabulary
    cfg = make_checkpoint(tmp_path / "ck", "m", fields)
    assert run_command("export", ["--model_name", "m", "--checkpoints_dir", str(tmp_path / "ck"),
                                  "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [cls] and config["head_dim"] == cfg.head_dim
    assert config.get("rope_scaling") == cfg.rope_scaling
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    lm = load_model("m", tmp_path / "ck", device="cpu")
    assert hf_params(hf) == lm.model.num_params() == count_params(cfg)
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = lm.model(ids)[0]
        assert ours.abs().max() > 1.0
        torch.testing.assert_close(hf(ids).logits, ours, atol=1e-4, rtol=0)
        prompt = ids[:, :6]
        assert torch.equal(hf_greedy(hf, prompt, 10), mypt_greedy(lm.model, prompt, 10))
    capsys.readouterr()
    assert run_command("inspect", ["--model_name", "m", "--checkpoints_dir", str(tmp_path / "ck")]) == 0
    assert f"{hf_params(hf):,}" in capsys.readouterr().out
