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


# ----------------------------------------------------------------------------- imported folders

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
                   "<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
QWEN_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOKENIZERS = {  # split pattern, special tokens, bos, eos (config.json's eos_token_id), chat template, NFC
    "llama": (LLAMA3_SPLIT, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>"], "<|begin_of_text|>", ["<|end_of_text|>", "<|eot_id|>"],
              LLAMA3_TEMPLATE, False),
    "qwen3": (QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, ["<|im_end|>"], QWEN_TEMPLATE,
              True),
}
TEXTS = [
    "ROMEO:\nBut, soft! what light through yonder window breaks?",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🙂👍🏽 and ﬁ ligatures",
    "numbers 1234567 3.14159 -42 1e10 and 2026-12-03",
    "whitespace   runs\t\ttabs\n\n\nnewlines   \n  trailing   ",
    "special strings in text: <|endoftext|> <|im_start|>user <|eot_id|> <|begin_of_text|>",
    "contractions: they'll I'm we've she'd IT'S don't",
    "",
]
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Who speaks first?"},
            {"role": "assistant", "content": "SAMPSON."}, {"role": "user", "content": "And then?"}]


def write_tokenizer(folder: Path, kind: str) -> dict[str, int]:
    """A byte-level BPE trained on the corpus with the family's split pattern, specials and template."""
    from conftest import corpus_text
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    split, specials, bos, eos, template, nfc = TOKENIZERS[kind]
    tok = Tokenizer(models.BPE(ignore_merges=kind == "llama"))
    tok.normalizer = normalizers.NFC() if nfc else None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([corpus_text(200_000)], trainer)
    tok.add_special_tokens(specials)
    ids = {s: tok.token_to_id(s) for s in specials}
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, ids[bos])])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos[0],
              "chat_template": template, "model_max_length": 131072, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return ids


def hf_model(kind: str, widths: dict, ids: dict[str, int], **extra):
    """A transformers Llama or Qwen3 of 2 layers with random, spread weights."""
    bos, eos = TOKENIZERS[kind][2], TOKENIZERS[kind][3]
    common = dict(num_hidden_layers=2, tie_word_embeddings=True, max_position_embeddings=16,
                  bos_token_id=ids[bos] if bos else None, eos_token_id=[ids[e] for e in eos], **widths, **extra)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
    spread(model, 5)
    return model.eval()


SHAPES = {  # the two shapes, narrowed: Qwen3's heads wider than hidden / heads, Llama 3.2's scaled rotary
    "qwen3": dict(vocab_size=640, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=48, rope_theta=1e6, rms_norm_eps=1e-6),
    "llama": dict(vocab_size=640, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  intermediate_size=64, rms_norm_eps=1e-5,
                  rope_parameters={"rope_theta": 500000.0, **SHORT_SCALING}),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def hf_folder(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp(request.param) / "model"
    folder.mkdir()
    ids = write_tokenizer(folder, request.param)
    hf_model(request.param, SHAPES[request.param], ids).save_pretrained(folder)
    return folder


def import_folder(folder: Path, ck: Path, name: str = "m") -> int:
    return run_command("import", ["--hf_dir", str(folder), "--model_name", name, "--checkpoints_dir", str(ck)])


def test_import_computes_what_transformers_computes(tmp_path, hf_folder, capsys):
    assert import_folder(hf_folder, tmp_path / "ck") == 0
    capsys.readouterr()
    lm = load_model("m", tmp_path / "ck", device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    hc = json.loads((hf_folder / "config.json").read_text())
    assert lm.config.head_dim == hc["head_dim"] and lm.config.tie_embeddings
    assert lm.config.rope_scaling == (SHORT_SCALING if hc["model_type"] == "llama" else None)
    assert hf_params(hf) == lm.model.num_params() == count_params(lm.config)
    ids = torch.randint(0, 600, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = lm.model(ids)[0]
        assert ours.abs().max() > 1.0
        torch.testing.assert_close(hf(ids).logits, ours, atol=1e-4, rtol=0)
        assert torch.equal(hf_greedy(hf, ids[:, :6], 10), mypt_greedy(lm.model, ids[:, :6], 10))


def test_imported_tokenizer_gives_transformers_ids(tmp_path, hf_folder, capsys):
    assert import_folder(hf_folder, tmp_path / "ck") == 0
    tok = load_model("m", tmp_path / "ck", device="cpu").tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(hf_folder)
    kind = json.loads((hf_folder / "config.json").read_text())["model_type"]
    assert tok.kind == "hf_bpe" and tok.chat_template == TOKENIZERS[kind][4]
    assert tok.eot_id == theirs.convert_tokens_to_ids(TOKENIZERS[kind][3][0])  # the model's (first) eos
    specials = set(theirs.all_special_ids) | {theirs.convert_tokens_to_ids(s) for s in TOKENIZERS[kind][1]}
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == theirs(text, add_special_tokens=False, split_special_tokens=True).input_ids, text
        assert not specials & set(ids), text  # special-token strings in a text stay text (MyPT's rule)
        assert tok.decode(ids) == theirs.decode(ids) == text
    lm = load_model("m", tmp_path / "ck", device="cpu")
    for text in TEXTS[:-1]:  # a prompt begins as transformers begins it (Llama 3: <|begin_of_text|>)
        assert lm.encode_prompt(text) == theirs(text, split_special_tokens=True).input_ids, text
    assert lm.encode_prompt("")[0] == (theirs.bos_token_id if kind == "llama" else tok.eot_id)
    prompt = torch.tensor([lm.encode_prompt("ROMEO:")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    ids = prompt
    with torch.no_grad():  # greedy over the tokenizer's ids (the model's rows past them are padding)
        for _ in range(8):
            ids = torch.cat([ids, hf(ids).logits[:, -1, :tok.n_vocab].argmax(-1, keepdim=True)], dim=1)
    new = ids[0, prompt.size(1):].tolist()
    new = new[:new.index(tok.eot_id)] if tok.eot_id in new else new  # sampling stops at the model's eos
    assert lm.generate("ROMEO:", max_new_tokens=8, top_k=1, ignore_eot=False) == theirs.decode(new)
    default = theirs(TEXTS[4], add_special_tokens=False).input_ids  # transformers' default: specials
    assert specials & set(default)
    assert tok.decode(default) == theirs.decode(default) == TEXTS[4]
    chat = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    rendered = theirs.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert tok.decode(rendered) == chat


def test_export_writes_the_tokenizer_and_model_back(tmp_path, hf_folder, capsys):
    assert import_folder(hf_folder, tmp_path / "ck") == 0
    assert run_command("export", ["--model_name", "m", "--checkpoints_dir", str(tmp_path / "ck"),
                                  "--out", str(tmp_path / "out")]) == 0
    before = transformers.AutoTokenizer.from_pretrained(hf_folder)
    after = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert after.chat_template == before.chat_template
    for text in TEXTS:
        for split in (False, True):
            assert after(text, split_special_tokens=split).input_ids == \
                before(text, split_special_tokens=split).input_ids, text
    assert after.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False) == \
        before.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    original = json.loads((hf_folder / "config.json").read_text())
    assert config["head_dim"] == original["head_dim"]
    assert config["eos_token_id"] == original["eos_token_id"][0]  # the model's eos, MyPT's end-of-text
    assert config["bos_token_id"] == (original["bos_token_id"] or config["eos_token_id"])
    assert config.get("rope_scaling") == (SHORT_SCALING if original["model_type"] == "llama" else None)
    a = transformers.AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 600, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(b(ids).logits, a(ids).logits, atol=1e-4, rtol=0)


def _wordpiece(folder: Path) -> None:
    from tokenizers import Tokenizer, models

    (folder / "tokenizer.json").unlink()
    Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(folder / "tokenizer.json"))


def _unigram(folder: Path) -> None:
    from tokenizers import Tokenizer, models

    (folder / "tokenizer.json").unlink()
    Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0)).save(str(folder / "tokenizer.json"))


def _no_vocab(folder: Path) -> None:
    d = json.loads((folder / "tokenizer.json").read_text())
    del d["model"]["vocab"]
    (folder / "tokenizer.json").write_text(json.dumps(d))


def _sentencepiece_bpe(folder: Path) -> None:  # Llama 2 / Mistral style: Metaspace, byte fallback
    d = json.loads((folder / "tokenizer.json").read_text())
    d["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    d["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    (folder / "tokenizer.json").write_text(json.dumps(d))


def _no_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()


UNREADABLE = {
    "wordpiece": (_wordpiece, "tokenizer.json: its model type is 'WordPiece'"),
    "unigram": (_unigram, "tokenizer.json: its model type is 'Unigram'"),
    "no-vocab": (_no_vocab, "tokenizer.json has no BPE vocabulary (model.vocab)"),
    "not-byte-level": (_sentencepiece_bpe, "tokenizer.json: its pre-tokenizer is not a split pattern"),
    "no-tokenizer-files": (_no_tokenizer, "it has no tokenizer.json, and its vocab_size (640) is not GPT-2's"),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_import_refuses_a_tokenizer_mypt_cannot_read(tmp_path, hf_folder, capsys, case):
    from conftest import refused_import

    breaker, message = UNREADABLE[case]
    err = refused_import(tmp_path, hf_folder, breaker, capsys)
    assert message in err and str(tmp_path / "hf") in err
    assert len(err.strip().splitlines()) == 1


def test_a_gpt2_sized_folder_without_tokenizer_files_keeps_gpt2s(tmp_path, capsys):
    """Today's behaviour, kept only where the ids can be GPT-2's: vocab_size 50257 or 50304."""
    folder = tmp_path / "hf"
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**SHAPES["qwen3"], "vocab_size": 50304},
                                                                   num_hidden_layers=2, tie_word_embeddings=True))
    model.save_pretrained(folder)
    assert import_folder(folder, tmp_path / "ck") == 0
    assert load_model("m", tmp_path / "ck", device="cpu").tokenizer.kind == "gpt2"


@pytest.mark.slow
def test_qwen3_0_6b_widths_import_with_exact_counts(tmp_path, capsys):
    """Qwen3-0.6B's own config.json values at 2 layers: 1024 wide, 16 heads of 128, 8 key/value heads."""
    folder = tmp_path / "qwen3-0.6b"
    folder.mkdir()
    ids = write_tokenizer(folder, "qwen3")
    widths = dict(vocab_size=151936, hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  intermediate_size=3072, rope_theta=1e6, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    common = dict(num_hidden_layers=2, tie_word_embeddings=True, max_position_embeddings=40960,
                  eos_token_id=ids["<|im_end|>"], **widths)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common)).eval()
    hf.save_pretrained(folder)
    assert import_folder(folder, tmp_path / "ck") == 0
    capsys.readouterr()
    lm = load_model("m", tmp_path / "ck", device="cpu")
    assert (lm.config.head_dim, lm.config.n_embd, lm.config.n_head, lm.config.kv_heads) == (128, 1024, 16, 8)
    n = hf_params(hf)
    assert n == lm.model.num_params() == count_params(lm.config)
    assert run_command("inspect", ["--model_name", "m", "--checkpoints_dir", str(tmp_path / "ck")]) == 0
    assert f"{n:,}" in capsys.readouterr().out
    x = torch.randint(0, 600, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = lm.model(x)[0]
        assert ours.std() > 0.1
        torch.testing.assert_close(hf(x).logits, ours, atol=1e-4, rtol=0)


def test_a_qwen3_folder_without_tokenizer_files_is_refused(tmp_path, capsys):
    """Qwen3's vocab_size (151936) holds GPT-2's 50257 ids: without this check it imported as a gpt2
    model and sampled garbage."""
    from conftest import refused_import

    source = tmp_path / "qwen3"
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**SHAPES["qwen3"], "vocab_size": 151936},
                                                                   num_hidden_layers=2, tie_word_embeddings=True))
    model.save_pretrained(source)
    err = refused_import(tmp_path, source, lambda folder: None, capsys)
    assert "has no tokenizer.json" in err and "copy the model's tokenizer files" in err


PUBLIC_CONFIGS = {  # the public config.json values, at full depth
    "Qwen3-0.6B": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072,
                   "num_hidden_layers": 28, "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1000000,
                   "rms_norm_eps": 1e-6, "max_position_embeddings": 40960, "hidden_act": "silu",
                   "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
                   "bos_token_id": 151643, "eos_token_id": 151645},
    "Llama-3.2-1B": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "vocab_size": 128256, "tie_word_embeddings": True,
                     "rope_theta": 500000.0, "rope_scaling": LLAMA32_SCALING, "rms_norm_eps": 1e-5,
                     "max_position_embeddings": 131072, "hidden_act": "silu", "attention_bias": False,
                     "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": 128001},
}


@pytest.mark.parametrize("name", sorted(PUBLIC_CONFIGS))
def test_public_configs_count_exactly_what_transformers_builds(name, tmp_path):
    """MyPT's count of the imported config (inspect, the memory check) is transformers' count, at full depth."""
    from mypt.formats import hf_llama

    hf = PUBLIC_CONFIGS[name]
    assert not hf_llama.architecture_problems(hf)
    cfg = hf_llama.import_config(hf, tmp_path / name, "config.json")
    assert cfg.head_dim == hf["head_dim"] and cfg.rope_scaling == hf.get("rope_scaling")
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf))
        ours = GPT(cfg)
    assert count_params(cfg) == sum(p.numel() for p in theirs.parameters()) == ours.num_params()  # tied: once
    assert count_params(cfg) == {"Qwen3-0.6B": 596_049_920, "Llama-3.2-1B": 1_235_814_400}[name]


def test_an_imported_model_fine_tunes_into_a_mypt_chat_model(tmp_path, hf_folder, capsys):
    """`mypt finetune --from FOLDER` of a Qwen3 or Llama 3.2 folder (LoRA): MyPT's chat tokens join
    its tokenizer as added special tokens after all of its ids (text keeps transformers' ids), the
    LoRA trains their rows, and the export's apply_chat_template gives MyPT's ids for a
    multi-turn conversation with a system message."""
    from mypt.finetune.template import TEMPLATE, Message, prompt_ids

    convs = [{"messages": [{"role": "user", "content": f"Who speaks {i}?"}, {"role": "assistant", "content": "ROMEO"}]}
             for i in range(12)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs), encoding="utf-8")
    ck = tmp_path / "ck"
    assert run_command("finetune", ["--from", str(hf_folder), "--model_name", "chat", "--checkpoints_dir", str(ck),
                                    "--input_file", str(tmp_path / "chat.jsonl"), "--lora_rank", "2", "--max_iters",
                                    "2", "--eval_interval", "2", "--eval_iters", "1"]) == 0
    assert "tokenizer has no chat tokens: added <|system|>, <|user|>, <|assistant|>, <|end|>" in capsys.readouterr().out
    base = transformers.AutoTokenizer.from_pretrained(hf_folder)
    lm = load_model("chat", ck, device="cpu")
    tok = lm.tokenizer
    assert tok.kind == "hf_bpe" and tok.chat_format == TEMPLATE
    assert list(tok.chat_ids.values()) == list(range(len(base), len(base) + 4)) and tok.n_vocab == len(base) + 4
    assert lm.config.lora is None and json.loads((ck / "chat" / "config.json").read_text())["lora"]["tokens"] == \
        list(tok.chat_ids.values())
    for text in TEXTS:
        assert tok.encode(text) == base(text, add_special_tokens=False, split_special_tokens=True).input_ids, text
    out = tmp_path / "hf"
    assert run_command("export", ["--model_name", "chat", "--checkpoints_dir", str(ck), "--out", str(out)]) == 0
    exported = transformers.AutoTokenizer.from_pretrained(out)
    ours = prompt_ids(tok, [Message(m["role"], m["content"]) for m in MESSAGES])
    assert exported.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False) == ours
    from mypt.tokenizers import tokenizer_from_json

    saved = json.loads((ck / "chat" / "tokenizer.json").read_text())
    for bad in (3, -4):  # a damaged file: its chat tokens are not where it says
        with pytest.raises(MyPTError, match=rf"^ck/chat/tokenizer.json: its chat tokens are not at ids {bad}-"):
            tokenizer_from_json({**saved, "chat_start": bad}, "ck/chat/tokenizer.json")
    reply = lm.chat([{"role": "user", "content": "Who speaks 3?"}], max_new_tokens=3, temperature=0)
    assert reply.text() == lm.chat([{"role": "user", "content": "Who speaks 3?"}], max_new_tokens=3,
                                   temperature=0).text()
