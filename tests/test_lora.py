"""LoRA (mypt.finetune.lora): adapters applied from outside the model, their checkpoint, merging,
and the PEFT export checked against the real peft and transformers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import require

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mypt.api import load_model  # noqa: E402
from mypt.build import build_model  # noqa: E402
from mypt.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from mypt.cli import run_command  # noqa: E402
from mypt.config import LoRAConfig, ModelConfig  # noqa: E402
from mypt.errors import MyPTError  # noqa: E402
from mypt.finetune.lora import LoRALinear, adapted, apply_lora, merge_lora, trainable_count  # noqa: E402
from mypt.model import GPT  # noqa: E402
from mypt.tokenizers import GPT2Tokenizer  # noqa: E402

SHAPE = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16, "batch_size": 4, "dropout": 0.0,
         "vocab_size": 50304}
LLAMA = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "intermediate_size": 48, "rope_theta": 500.0,
         "norm_eps": 1e-6}
VARIANTS = {"gpt2": {}, "llama-gqa-untied": {**LLAMA, "n_kv_head": 2, "tie_embeddings": False},
            "qwen3-gqa": {**LLAMA, "qk_norm": True, "n_kv_head": 2}}
LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": "all", "tokens": [3, 50, 777]}  # rows that train too


def spread(model: torch.nn.Module, seed: int) -> None:
    """Random, well-spread weights (and adapters), so comparisons of logits mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            gain = 1.0 if "norm" in n or "ln_" in n else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if gain else 0.5) + gain)


def ids(n: int = 2, t: int = 16) -> torch.Tensor:
    return torch.randint(0, 50257, (n, t), generator=torch.Generator().manual_seed(1))


def save(folder: Path, model: GPT, cfg: ModelConfig) -> Path:
    save_checkpoint(folder, model_state=model.state_dict(), config=cfg.to_dict(),
                    tokenizer=GPT2Tokenizer().to_json(), training_state={"iteration": 3}, optimizer_state={})
    return folder


def base_and_lora(root: Path, fields: dict, lora: dict = LORA) -> tuple[GPT, GPT]:
    """checkpoints/base (random weights) and checkpoints/tuned (the same weights + random adapters)."""
    cfg = ModelConfig(**{**SHAPE, **fields})
    base = GPT(cfg)
    spread(base, 0)
    save(root / "base", base, cfg)
    tuned = GPT(cfg)
    tuned.load_state_dict(base.state_dict())
    apply_lora(tuned, LoRAConfig(**lora))
    with torch.no_grad():
        for _, layer in adapted(tuned):
            layer.lora_B.normal_(0, 0.3)
        for name, rows in tuned.named_parameters():
            if name.endswith("rows_delta"):
                rows.normal_(0, 0.5)
    save(root / "tuned", tuned, ModelConfig(**{**SHAPE, **fields, "lora": lora}))
    return base.eval(), tuned.eval()


def test_a_fresh_adapter_changes_nothing_and_trains_only_itself():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SHAPE, **VARIANTS["llama-gqa-untied"]))
    with torch.no_grad():
        before = model(ids())[0]
    total = sum(p.numel() for p in model.parameters())
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets="attn"))
    names = [n for n, _ in adapted(model)]
    assert names == [f"transformer.h.{i}.attn.{k}" for i in range(2) for k in ("c_attn", "c_proj")]
    with torch.no_grad():
        torch.testing.assert_close(model(ids())[0], before, atol=0, rtol=0)  # B starts at zero
    # c_attn: 4 x 32 + 64 x 4 (q 32, k 16, v 16 rows); c_proj: 4 x 32 + 32 x 4; two layers
    assert trainable_count(model) == 2 * ((4 * 32 + 64 * 4) + (4 * 32 + 32 * 4))
    assert sum(p.numel() for p in model.parameters()) == total + trainable_count(model)
    _, loss = model(ids(), ids())
    loss.backward()
    assert all((p.grad is None) != p.requires_grad for p in model.parameters())
    assert all(layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() == 0 for _, layer in adapted(model))
    assert all(layer.lora_B.grad.abs().sum() > 0 for _, layer in adapted(model))  # B moves first


@pytest.mark.parametrize("targets,layers", [("mlp", ("mlp.c_fc", "mlp.c_proj")),
                                            ("all", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))])
def test_targets_choose_the_layers(targets, layers):
    model = GPT(ModelConfig(**SHAPE))
    apply_lora(model, LoRAConfig(rank=2, alpha=2, targets=targets))
    assert [n for n, _ in adapted(model)] == [f"transformer.h.{i}.{k}" for i in range(2) for k in layers]


def test_merging_computes_the_same_function(tmp_path):
    _, tuned = base_and_lora(tmp_path, VARIANTS["qwen3-gqa"])
    with torch.no_grad():
        adapted_logits = tuned(ids())[0]
        merge_lora(tuned)
        assert not list(adapted(tuned)) and all(type(m) is not LoRALinear for m in tuned.modules())
        torch.testing.assert_close(tuned(ids())[0], adapted_logits, atol=1e-4, rtol=1e-5)


def test_a_lora_checkpoint_loads_with_its_adapters_or_merged(tmp_path):
    base, tuned = base_and_lora(tmp_path, VARIANTS["gpt2"])
    with torch.no_grad():
        want = tuned(ids())[0]
        assert (want - base(ids())[0]).abs().max() > 1.0  # the adapters matter
    ckpt = load_checkpoint(tmp_path / "tuned")
    assert ckpt.config["lora"] == LORA
    unmerged = build_model(ckpt)
    assert unmerged.config.lora_config == LoRAConfig(**LORA) and len(list(adapted(unmerged.model))) == 8
    assert {n for n, p in unmerged.model.named_parameters() if p.requires_grad} == \
        {f"{n}.lora_{x}" for n, _ in adapted(unmerged.model) for x in "AB"} | {"transformer.wte.rows_delta"}
    lm = load_model("tuned", tmp_path, device="cpu")  # sampling, eval, serve: merged at load
    assert lm.config.lora is None and not list(adapted(lm.model))
    with torch.no_grad():
        torch.testing.assert_close(unmerged.model.eval()(ids())[0], want, atol=0, rtol=0)
        torch.testing.assert_close(lm.model(ids())[0], want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("bad,message", [
    ({"rank": 0, "alpha": 8}, "lora.rank (0) must be an integer from 1 to 65536"),
    ({"rank": 4, "alpha": float("inf")}, "lora.alpha (Infinity) must be a number above 0"),
    ({"rank": 4, "alpha": 8, "targets": "head"}, "lora.targets (\"head\") must be one of attn, mlp, all"),
    ({"rank": 4, "alpha": 8, "dropout": 1.0}, "lora.dropout (1.0) must be at least 0 and below 1"),
    ({"rank": 4, "alpha": 8, "scale": 2}, "lora.unknown field 'scale'"),
    ({"rank": 4, "alpha": 8, "tokens": [3, 3]}, "lora.tokens ([3, 3]) must be a list of distinct token ids"),
    ({"rank": 4, "alpha": 8, "tokens": [50304]}, "lora.tokens ([50304]) must all be below vocab_size (50304)"),
])
def test_a_bad_lora_block_in_config_json_is_named(bad, message):
    with pytest.raises(MyPTError) as err:
        ModelConfig.from_dict({**SHAPE, "bias": False, "lora": bad}, "ck/config.json")
    assert str(err.value).startswith("ck/config.json: ") and message in str(err.value)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_peft_loads_the_adapter_onto_the_base_export_with_our_logits(tmp_path, variant, capsys):
    transformers, peft = require("transformers"), require("peft")
    _, tuned = base_and_lora(tmp_path, VARIANTS[variant])
    assert run_command("export", ["--model_name", "base", "--checkpoints_dir", str(tmp_path),
                                  "--out", str(tmp_path / "base-hf")]) == 0
    assert run_command("export", ["--model_name", "tuned", "--checkpoints_dir", str(tmp_path), "--format", "peft",
                                  "--out", str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base-hf")
    model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours = tuned(ids())[0]
        torch.testing.assert_close(model(ids()).logits, ours, atol=1e-4, rtol=0)
    # and --format hf of the fine-tune is the merged model
    assert run_command("export", ["--model_name", "tuned", "--checkpoints_dir", str(tmp_path),
                                  "--out", str(tmp_path / "merged-hf")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged-hf").eval()
    assert "lora" not in json.loads((tmp_path / "merged-hf" / "config.json").read_text())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids()).logits, ours, atol=1e-4, rtol=0)


def test_peft_export_of_a_model_without_adapters_is_refused(tmp_path, capsys):
    base_and_lora(tmp_path, VARIANTS["gpt2"])
    assert run_command("export", ["--model_name", "base", "--checkpoints_dir", str(tmp_path), "--format", "peft",
                                  "--out", str(tmp_path / "adapter")]) == 2
    assert "--format peft: this model has no LoRA adapters" in capsys.readouterr().err
    assert not (tmp_path / "adapter").exists()


@pytest.mark.slow
@pytest.mark.parametrize("source", ["older-checkpoint-llama-untied", "imported-gpt2"])
def test_peft_export_of_a_grown_base_carries_the_embedding_and_head(tmp_path, source, capsys):
    """A base without chat-token rows grows when fine-tuned; its adapter carries the grown embedding
    and head (modules_to_save) and loads, as the export says, onto the base's export resized."""
    transformers, peft = require("transformers"), require("peft")
    from test_finetune import CHARS, conversations, finetune, make_base, write_jsonl

    from mypt.tokenizers import CharTokenizer

    ck = tmp_path / "checkpoints"
    write_jsonl(tmp_path / "chat.jsonl", conversations(20))
    if source == "imported-gpt2":  # GPT-2's 50257 rows: 50304 with the chat tokens (padded to 64)
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
        transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
        base, base_hf, embedding = str(tmp_path / "hf"), tmp_path / "hf", "transformer.wte"
    else:  # a char tokenizer saved before the chat tokens: 4 rows more
        make_base(ck, "old", CharTokenizer(CHARS, chat=False), tie=False, **{**LLAMA, "rope_theta": 10000.0})
        assert run_command("export", ["--model_name", "old", "--checkpoints_dir", str(ck),
                                      "--out", str(tmp_path / "base-hf")]) == 0
        base, base_hf, embedding = "old", tmp_path / "base-hf", "model.embed_tokens"
    r = finetune(tmp_path, "--from", base, "--model_name", "tuned", "--input_file", "chat.jsonl", "--lora_rank", "4",
                 "--max_iters", "3", "--learning_rate", "1e-2", "--batch_size", "2", "--eval_iters", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    tuned = load_checkpoint(ck / "tuned")
    vocab, base_vocab = tuned.config["vocab_size"], tuned.training_state["finetune"]["base_vocab_size"]
    assert base_vocab < vocab and f"grow from {base_vocab} to {vocab} rows" in r.stdout
    capsys.readouterr()
    adapter = tmp_path / "adapter"
    assert run_command("export", ["--model_name", "tuned", "--checkpoints_dir", str(ck), "--format", "peft",
                                  "--out", str(adapter)]) == 0
    assert f"model.resize_token_embeddings({vocab}, mean_resizing=False)" in capsys.readouterr().out
    assert json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"] == [embedding, "lm_head"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_hf)
    assert hf.config.vocab_size == base_vocab
    hf.resize_token_embeddings(vocab, mean_resizing=False)  # the README's recipe
    model = peft.PeftModel.from_pretrained(hf, adapter).eval()
    ours = build_model(tuned).model.eval()
    tok = build_model(tuned).tokenizer
    x = torch.randint(0, tok.n_vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    x[:, :4] = torch.tensor(sorted(tok.chat_ids.values()))  # the grown rows are read, and their logits compared
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ours(x)[0], atol=1e-4, rtol=0)
    theirs = transformers.AutoTokenizer.from_pretrained(adapter)  # the fine-tune's tokenizer, with its template
    assert theirs.chat_template and theirs.convert_tokens_to_ids("<|end|>") == tok.chat_ids["<|end|>"]
