"""Export to / import from Hugging Face transformers, checked against real transformers.

Models are 2 layers, 32 wide, with random weights scaled up (std 0.5) so that greedy choices are
far from ties; transformers loads only local folders (HF_HUB_OFFLINE), never the network.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARCH, hf_greedy, mypt_greedy, refused_import, require, run_cli
from forked_cli import ONE_THREAD

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = require("transformers")

from mypt.api import load_model  # noqa: E402
from mypt.checkpoint import CHECKPOINT_FILES, load_checkpoint, save_checkpoint  # noqa: E402
from mypt.cli import run_command  # noqa: E402
from mypt.config import ModelConfig  # noqa: E402
from mypt.errors import MyPTError  # noqa: E402
from mypt.formats.hf_tokenizer import bytes_to_unicode, gpt2_vocab_and_merges  # noqa: E402
from mypt.model import GPT  # noqa: E402
from mypt.tokenizers import BPETokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer, train_bpe  # noqa: E402

TEXTS = [
    "Hello, world! It's a test.",
    "  leading spaces,   runs   of spaces,\n\n\nnewlines\tand\ttabs   \n",
    "naïve café, Ærøskøbing, 日本語のテキスト, emoji 🎉👍🏽 and e\u0301 combining",
    "I'm sure they'll say we've done it; you'd agree? 12345 3.14159 $100",
    "\u00a0non-breaking\u2003em space\r\nwindows line\u200b",
    "ROMEO:\nBut soft, what light through yonder window breaks?",
]
CHAR_TEXT = "hello world\nthe quick brown fox: jumps!  Ünïcödé 日本\t"


def make_checkpoint(root: Path, name: str, *, bias: bool = False, chars: str | None = None,
                    seed: int = 0, tok: Tokenizer | None = None) -> Path:
    """A MyPT checkpoint folder with random, well-spread weights (no training needed)."""
    torch.manual_seed(seed)
    tok = tok or (CharTokenizer.from_text(chars) if chars else GPT2Tokenizer())
    cfg = ModelConfig(**{**TINY_ARCH, "bias": bias}, vocab_size=tok.model_vocab_size())
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    folder = root / name
    save_checkpoint(folder, model_state=model.state_dict(), config=cfg.to_dict(), tokenizer=tok.to_json(),
                    training_state={"iteration": 7, "best_val_loss": 3.0, "last_val_loss": 3.5},
                    optimizer_state={})
    return folder


def export_and_import(tmp_path: Path, name: str, capsys: pytest.CaptureFixture) -> Path:
    """Export checkpoint `name` to tmp_path/hf and import that folder back as model 'back'."""
    assert export(tmp_path, name, tmp_path / "hf") == 0
    code = run_command("import", ["--hf_dir", str(tmp_path / "hf"), "--model_name", "back",
                                  "--checkpoints_dir", str(tmp_path / "ck")])
    assert code == 0, capsys.readouterr().err
    return tmp_path / "ck" / "back"


def export(tmp_path: Path, name: str, out: Path, *extra: str) -> int:
    return run_command("export", ["--model_name", name, "--checkpoints_dir", str(tmp_path / "ck"),
                                  "--out", str(out), *extra])


def test_gpt2_bpe_files_from_the_ranks():
    spell = bytes_to_unicode()
    assert len(set(spell.values())) == 256 and spell[ord("A")] == "A" and spell[ord(" ")] == "Ġ"
    vocab, merges = gpt2_vocab_and_merges()
    assert len(vocab) == 50257 and sorted(vocab.values()) == list(range(50257))
    assert len(merges) == 50000
    assert merges[0] == ("Ġ", "t") and vocab["Ġthe"] == 262 and vocab["<|endoftext|>"] == 50256
    assert all(vocab[a + b] == 256 + i for i, (a, b) in enumerate(merges))


@pytest.mark.parametrize("bias", [False, True])
def test_export_hf_loads_in_transformers_with_the_same_logits_and_tokens(tmp_path, bias):
    folder = make_checkpoint(tmp_path / "ck", "m", bias=bias)
    out = tmp_path / "hf"
    assert export(tmp_path, "m", out) == 0
    assert not any(p.suffix in (".pt", ".bin", ".pkl") for p in out.iterdir())
    config = json.loads((out / "config.json").read_text())
    assert config["n_positions"] == 32 and config["activation_function"] == "gelu_new"
    assert config["attn_pdrop"] == 0.0 and config["tie_word_embeddings"] is True

    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    lm = load_model(path=folder, device="cpu")
    ids = torch.randint(0, 50304, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs, ours = hf(ids).logits, lm.model(ids)[0]
        assert torch.allclose(theirs, ours, atol=1e-4, rtol=0), (theirs - ours).abs().max()
        prompt = ids[:, :8]
        assert torch.equal(hf_greedy(hf, prompt, 12), mypt_greedy(lm.model, prompt, 12))


def test_exported_tokenizer_encodes_like_mypt(tmp_path):
    make_checkpoint(tmp_path / "ck", "m")
    out = tmp_path / "hf"
    assert export(tmp_path, "m", out) == 0
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    ours = GPT2Tokenizer()
    for text in TEXTS:
        ids = ours.encode(text)
        assert theirs.encode(text) == ids, text
        assert theirs.decode(ids) == text
    assert theirs.eos_token_id == 50256


def test_export_char_model(tmp_path):
    folder = make_checkpoint(tmp_path / "ck", "c", chars=CHAR_TEXT)
    out = tmp_path / "hf"
    assert export(tmp_path, "c", out) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(set(CHAR_TEXT)) + 5  # the characters, end-of-text, the 4 chat tokens
    assert config["eos_token_id"] == len(set(CHAR_TEXT))
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    lm = load_model(path=folder, device="cpu")
    assert theirs.eos_token_id == lm.tokenizer.eot_id
    text = "the  brown\n\nfox: Ünï 日本\t!"
    ids = lm.tokenizer.encode(text)
    assert theirs.encode(text) == ids and theirs.decode(ids) == text
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, lm.model(x)[0], atol=1e-4, rtol=0)
        assert torch.equal(hf_greedy(hf, x[:, :5], 10), mypt_greedy(lm.model, x[:, :5], 10))


@pytest.mark.parametrize("bias", [False, True])
def test_export_then_import_gives_identical_weights(tmp_path, bias, capsys):
    folder = make_checkpoint(tmp_path / "ck", "m", bias=bias)
    original, back = load_checkpoint(folder), load_checkpoint(export_and_import(tmp_path, "m", capsys))
    assert sorted(back.model_state) == sorted(original.model_state)
    for name, tensor in original.model_state.items():
        assert torch.equal(back.model_state[name], tensor), name
    arch = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "dropout")
    assert {k: back.config[k] for k in arch} == {k: original.config[k] for k in arch}
    # no optimizer.pt: an imported model has no optimizer state yet; training starts a fresh one
    assert sorted(p.name for p in (tmp_path / "ck" / "back").iterdir()) == sorted(
        set(CHECKPOINT_FILES) - {"optimizer.pt"})
    assert not load_checkpoint(tmp_path / "ck" / "back", with_optimizer=True).has_optimizer
    state = back.training_state
    assert state["iteration"] == 0 and state["imported_from"] == str((tmp_path / "hf").resolve())
    assert back.tokenizer == GPT2Tokenizer().to_json()  # with the chat tokens, as exported


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A transformers GPT-2 folder (random weights, nonzero biases) with GPT-2 tokenizer files."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(3)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model.save_pretrained(root / "model")
    make_checkpoint(root / "ck", "tok", tok=GPT2Tokenizer(chat=False))  # GPT-2's own files: no chat tokens
    export(root, "tok", root / "tokenizer_source")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(root / "tokenizer_source" / name, root / "model" / name)
    return root / "model"


def test_import_transformers_model(tmp_path, hf_folder, capsys):
    ck = tmp_path / "ck"
    assert run_command("import", ["--hf_dir", str(hf_folder), "--model_name", "g", "--checkpoints_dir", str(ck)]) == 0
    assert "bias true" in capsys.readouterr().out
    lm = load_model("g", ck, device="cpu")
    assert lm.config.vocab_size == 50257 and lm.config.bias and lm.tokenizer.kind == "gpt2" and not lm.tokenizer.chat
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    ids = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, lm.model(ids)[0], atol=1e-4, rtol=0)
    assert run_command("import", ["--hf_dir", str(hf_folder), "--model_name", "g", "--checkpoints_dir", str(ck)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_import_hub_layout_shards_and_mask_buffers(tmp_path, hf_folder):
    """The original gpt2 upload names tensors without 'transformer.' and stores attn.bias masks."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "hub"
    shutil.copytree(hf_folder, folder)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(folder / "model.safetensors").items()}
    tensors["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / file, metadata={"format": "pt"})
    index = {"weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    ck = tmp_path / "ck"
    assert run_command("import", ["--hf_dir", str(folder), "--model_name", "g", "--checkpoints_dir", str(ck)]) == 0
    assert run_command("import", ["--hf_dir", str(hf_folder), "--model_name", "ref", "--checkpoints_dir", str(ck)]) == 0
    ours, ref = load_checkpoint(ck / "g").model_state, load_checkpoint(ck / "ref").model_state
    assert sorted(ours) == sorted(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)


def test_imported_model_fine_tunes_and_samples(tmp_path, hf_folder, small_text):
    ck = tmp_path / "checkpoints"
    assert run_command("import", ["--hf_dir", str(hf_folder), "--model_name", "g",
                                  "--checkpoints_dir", str(ck)]) == 0
    flags = ["--model_name", "g", "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1",
             "--batch_size", "2"]
    missing = run_cli(*flags, cwd=tmp_path, env=ONE_THREAD)
    assert missing.returncode == 2 and "--input_file" in missing.stderr, missing.stderr
    result = run_cli(*flags, "--input_file", str(small_text), cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming 'g' from iteration 0" in result.stdout
    state = json.loads((ck / "g" / "training_state.json").read_text())
    assert state["iteration"] == 2 and state["input_file"] == str(small_text)
    lm = load_model("g", ck, device="cpu")
    prompt = lm.tokenizer.encode("ROMEO:")
    ids = mypt_greedy(lm.model, torch.tensor([prompt]), 5)[0].tolist()
    assert len(ids) == len(prompt) + 5 and lm.tokenizer.decode(ids).startswith("ROMEO:")


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def _untie_head(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = torch.zeros_like(tensors["transformer.wte.weight"])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _drop_tensor(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _sharded(folder: Path, index: str) -> None:
    """The weights as named by a model.safetensors.index.json of the given text."""
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(index)


def _pickle_only(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")


def _other_vocab(folder: Path) -> None:
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]
    (folder / "vocab.json").write_text(json.dumps(vocab))


BROKEN = {
    "bert": (lambda f: _edit_config(f, model_type="bert"), "only GPT-2, Llama and Qwen3 folders"),
    "relu": (lambda f: _edit_config(f, activation_function="relu"), "activation_function is 'relu'"),
    "n_inner": (lambda f: _edit_config(f, n_inner=64), "n_inner is 64"),
    "eps": (lambda f: _edit_config(f, layer_norm_epsilon=1e-6), "layer_norm_epsilon"),
    "untied": (_untie_head, "lm_head.weight differs"),
    "missing": (_drop_tensor, "missing tensors: transformer.h.1.mlp.c_fc.weight"),
    "pickle": (_pickle_only, "pytorch_model.bin"),
    "vocab": (_other_vocab, "vocab.json is not GPT-2's"),
    "small_vocab": (lambda f: _edit_config(f, vocab_size=1000), "vocab_size is 1000"),
    "pdrop-text": (lambda f: _edit_config(f, attn_pdrop="x"), 'attn_pdrop is "x"; expected a probability'),
    "positions": (lambda f: _edit_config(f, n_positions=-3), "block_size (n_positions in config.json)"),
    # numbers no model has: refused by name before anything is built or read (n_layer 10**8 once hung)
    "layers-10**8": (lambda f: _edit_config(f, n_layer=10**8), "n_layer (100000000) must be at most 1,024"),
    "pdrop-10**400": (lambda f: _edit_config(f, attn_pdrop=10**400), "attn_pdrop is 10000"),
    "pdrop-nan": (lambda f: _edit_config(f, resid_pdrop=float("nan")), "resid_pdrop is NaN"),
    "eps-10**400": (lambda f: _edit_config(f, layer_norm_epsilon=10**400), "layer_norm_epsilon is 10000"),
    "width-1e309": (lambda f: (f / "config.json").write_text('{"model_type": "gpt2", "n_embd": 1e309}'),
                    "n_embd (Infinity) must be an integer"),
    "digits-5000": (lambda f: (f / "config.json").write_text('{"model_type": "gpt2", "n_layer": %s}' % ("9" * 5000)),
                    "config.json: holds a number MyPT cannot read"),
    "nested-100000": (lambda f: (f / "config.json").write_text('{"model_type": %s}' % ("[" * 10**5 + "]" * 10**5)),
                      "config.json: lists and objects are nested more than 100 deep"),
    "architectures-nested": (lambda f: _edit_config(f, architectures=[["GPT2LMHeadModel"]]), "architectures [["),
    "index-not-an-object": (lambda f: _sharded(f, "[1]"), "model.safetensors.index.json: expected"),
    "index-names-a-file-elsewhere": (lambda f: _sharded(f, '{"weight_map": {"a": "../x.safetensors"}}'),
                                     "{tensor name: file name in this folder}"),
    "index-nested-100000": (lambda f: _sharded(f, '{"weight_map": %s}' % ("[" * 10**5 + "]" * 10**5)),
                            "index.json: lists and objects are nested more than 100 deep"),
    "too-big-for-memory": (lambda f: _edit_config(f, n_layer=1024, n_embd=65536, n_head=64, n_positions=1 << 21),
                           "its config.json describes the model (52,917,425,012,736 parameters: n_layer 1024"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_import_refuses_what_mypt_cannot_represent(tmp_path, hf_folder, capsys, case):
    breaker, message = BROKEN[case]
    assert message in refused_import(tmp_path, hf_folder, breaker, capsys)


def test_export_safetensors_is_a_pickle_free_mypt_folder(tmp_path, capsys):
    folder = make_checkpoint(tmp_path / "ck", "m")
    out = tmp_path / "ck" / "m_weights"
    assert export(tmp_path, "m", out, "--format", "safetensors") == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "training_state.json"]
    original, exported = load_model(path=folder, device="cpu"), load_model("m_weights", tmp_path / "ck", device="cpu")
    for name, tensor in original.model.state_dict().items():
        assert torch.equal(exported.model.state_dict()[name], tensor), name
    assert exported.model.lm_head.weight is exported.model.transformer.wte.weight
    assert exported.checkpoint.training_state["iteration"] == 7
    assert load_checkpoint(out, with_optimizer=True).optimizer_state is None  # training starts a fresh one
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-7] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(MyPTError, match=r"model\.safetensors does not match its manifest"):
        load_checkpoint(out)
    (out / "model.safetensors").write_bytes(bytes(data[: len(data) // 2]))
    state = json.loads((out / "training_state.json").read_text())
    del state["manifest"]  # so the damage itself must be reported
    (out / "training_state.json").write_text(json.dumps(state))
    with pytest.raises(MyPTError, match=r"model\.safetensors is truncated or corrupt"):
        load_checkpoint(out)


def test_weights_that_do_not_fit_the_config_name_the_safetensors_file(tmp_path):
    make_checkpoint(tmp_path / "ck", "m")
    out = tmp_path / "ck" / "w"
    assert export(tmp_path, "m", out, "--format", "safetensors") == 0
    state = json.loads((out / "training_state.json").read_text())
    del state["manifest"]  # else the edited config.json is reported first
    (out / "training_state.json").write_text(json.dumps(state))
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "n_layer": config["n_layer"] + 1}))
    with pytest.raises(MyPTError, match=r"w/model\.safetensors does not match .*w/config\.json: .*missing"):
        load_model("w", tmp_path / "ck", device="cpu")


def test_export_refuses_a_used_folder_and_unknown_models(tmp_path, capsys):
    make_checkpoint(tmp_path / "ck", "m")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export(tmp_path, "m", out) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert export(tmp_path, "nope", tmp_path / "other") == 2
    assert "no model named 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


# ---------------------------------------------------------------------------------------------
# bpe

HARD_TEXTS = [
    *TEXTS,
    "    eight spaces\n\n\n\n\t\t  \n \r\n\r\n  \r\r\n end   ",
    "emoji 🙂👍🏽👨‍👩‍👧 flags 🇫🇷🇯🇵 and keycap 1️⃣",
    "mojibake Ã© Ã¼ â€™ ðŸ™‚, byte-map look-alikes ĠĊ Ġthe ĉ, replacement \ufffd, controls \x00\x01\x7f\x1b",
    "odd spaces \x0b\x0c\x1c\x85\u2028\u2029\u3000| and 'S 'LL 'Ve DON'T 1234567890",
]


@pytest.fixture(scope="module")
def bpe_tok() -> BPETokenizer:
    from conftest import corpus_text

    return train_bpe([corpus_text(200_000) + "".join(HARD_TEXTS) * 20], 700, "test text")


def test_export_bpe_model_tokenizes_like_mypt_in_transformers(tmp_path, bpe_tok):
    folder = make_checkpoint(tmp_path / "ck", "b", tok=bpe_tok)
    out = tmp_path / "hf"
    assert export(tmp_path, "b", out) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 704 and config["eos_token_id"] == bpe_tok.eot_id == 695  # then 4 chat tokens
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs.eos_token_id == 695 and len(theirs) == 700
    merged = [t for t in bpe_tok.ranks if len(t) > 1 and t[0] >= 0x80]  # multibyte characters were merged
    assert merged
    for text in HARD_TEXTS:
        ids = bpe_tok.encode(text)
        assert theirs.encode(text) == ids, text
        assert theirs.decode(ids) == text
    literal = "a <|endoftext|> b"
    assert theirs.encode(literal, split_special_tokens=True) == bpe_tok.encode(literal)
    assert theirs.decode([695]) == "<|endoftext|>"
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    lm = load_model(path=folder, device="cpu")
    x = torch.tensor([bpe_tok.encode(HARD_TEXTS[2])[:TINY_ARCH["block_size"]]])
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, lm.model(x)[0], atol=1e-4, rtol=0)


def test_export_then_import_bpe_model(tmp_path, bpe_tok, capsys):
    folder = make_checkpoint(tmp_path / "ck", "b", tok=bpe_tok)
    back = load_model(path=export_and_import(tmp_path, "b", capsys), device="cpu")
    assert back.tokenizer.to_json() == bpe_tok.to_json()
    original = load_checkpoint(folder)
    for name, tensor in original.model_state.items():
        assert torch.equal(back.checkpoint.model_state[name], tensor), name
    assert back.checkpoint.training_state["tokenizer"] == "bpe"


def test_export_then_import_char_model(tmp_path, capsys):
    make_checkpoint(tmp_path / "ck", "c", chars=CHAR_TEXT)
    back = load_checkpoint(export_and_import(tmp_path, "c", capsys))
    assert back.tokenizer == CharTokenizer.from_text(CHAR_TEXT).to_json()


def _edit_tokenizer_json(folder: Path, change) -> None:
    d = json.loads((folder / "tokenizer.json").read_text())
    change(d)
    (folder / "tokenizer.json").write_text(json.dumps(d))


BPE_BROKEN = {
    "pre": (lambda d: d.__setitem__("pre_tokenizer", {"type": "Whitespace"}), "pre-tokenizer is not a split"),
    "ids": (lambda d: d["model"]["vocab"].__setitem__("Ġthe", 5000), "ids of its vocabulary are not 0, 1, 2"),
    "id-text": (lambda d: d["model"]["vocab"].__setitem__("Ġthe", "5"), "is not a tokenizer.json of a kind MyPT"),
    "pre-steps": (lambda d: d.__setitem__("pre_tokenizer", {"type": "Sequence", "pretokenizers": ["x"]}),
                  "pre-tokenizer is not a split"),
}


@pytest.mark.parametrize("case", sorted(BPE_BROKEN))
def test_import_refuses_a_bpe_tokenizer_tiktoken_would_not_match(tmp_path, bpe_tok, capsys, case):
    make_checkpoint(tmp_path / "ck", "b", tok=bpe_tok)
    assert export(tmp_path, "b", tmp_path / "hf") == 0
    change, message = BPE_BROKEN[case]
    _edit_tokenizer_json(tmp_path / "hf", change)
    args = ["--hf_dir", str(tmp_path / "hf"), "--model_name", "x", "--checkpoints_dir", str(tmp_path / "ck")]
    assert run_command("import", args) == 2
    err = capsys.readouterr().err
    assert message in err and "tokenizer.json" in err and "Traceback" not in err
    assert not (tmp_path / "ck" / "x").exists()


BPE_NOT_TIKTOKENS = {  # byte-level BPEs tiktoken would split differently: kept whole, run as transformers runs them
    "merges": lambda d: d["model"]["merges"].reverse(),
    "eot": lambda d: d["added_tokens"].clear(),
}


@pytest.mark.parametrize("case", sorted(BPE_NOT_TIKTOKENS))
def test_import_reads_a_byte_level_bpe_tiktoken_cannot_as_transformers_does(tmp_path, bpe_tok, capsys, case):
    make_checkpoint(tmp_path / "ck", "b", tok=bpe_tok)
    assert export(tmp_path, "b", tmp_path / "hf") == 0
    _edit_tokenizer_json(tmp_path / "hf", BPE_NOT_TIKTOKENS[case])
    args = ["--hf_dir", str(tmp_path / "hf"), "--model_name", "x", "--checkpoints_dir", str(tmp_path / "ck")]
    assert run_command("import", args) == 0
    tok = load_model("x", tmp_path / "ck", device="cpu").tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.kind == "hf_bpe" and tok.eot_id == 695
    changed = 0
    for text in HARD_TEXTS:
        ids = tok.encode(text)
        assert ids == theirs(text, split_special_tokens=True).input_ids, text
        assert tok.decode(ids) == text
        changed += ids != bpe_tok.encode(text)
    assert changed or case == "eot"  # reversed merges split differently from tiktoken's ranks
