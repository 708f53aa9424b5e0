"""GGUF export (mypt.formats.gguf), read back with the gguf package (llama.cpp's own reader).

llama.cpp itself is not needed here (bench/check_gguf.py runs the files in it): the tests read
every file back, check its metadata, tensors and tokenizer, and recompute the forward pass from
the read-back tensors the way llama.cpp's architectures compute it (gpt2's fused qkv, llama's
rotation of adjacent pairs, qwen3's rotation of halves after QK-norm), which must give MyPT's
logits. Models are 2 layers, 32-64 wide, with random weights scaled up (std 0.5).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import require, spread_checkpoint

gguf = require("gguf")

from mypt.api import load_model  # noqa: E402
from mypt.cli import run_command  # noqa: E402
from mypt.finetune.template import JINJA, TEMPLATE  # noqa: E402
from mypt.tokenizers import EOT, BPETokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer, train_bpe  # noqa: E402
from mypt.tokenizers.hf_bpe import bytes_to_unicode  # noqa: E402

SHAPE = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 16, "batch_size": 4, "dropout": 0.0, "bias": False}
LLAMA = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "intermediate_size": 96, "rope_theta": 500.0,
         "norm_eps": 1e-6}
SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8}
VARIANTS = {  # name: (fields, llama.cpp architecture)
    "gpt2": ({}, "gpt2"),
    "gpt2-bias-untied-gqa": ({"bias": True, "tie_embeddings": False, "n_kv_head": 2}, "gpt2"),
    "llama-gqa-untied": ({**LLAMA, "n_kv_head": 2, "tie_embeddings": False}, "llama"),
    "llama-bias-scaled": ({**LLAMA, "bias": True, "rope_scaling": SCALING}, "llama"),
    "qwen3-gqa": ({**LLAMA, "qk_norm": True, "n_kv_head": 2}, "qwen3"),
    "qwen3-untied-wide-heads": ({**LLAMA, "qk_norm": True, "tie_embeddings": False, "head_size": 32}, "qwen3"),
}
CHAR_TEXT = "hello world\nthe quick brown fox: jumps!  Ünïcödé 日本 🎉\t"


def make_checkpoint(root: Path, name: str, fields: dict, tok: Tokenizer | None = None, seed: int = 0) -> Path:
    return spread_checkpoint(root / name, {**SHAPE, **fields}, tok, seed)


def export(root: Path, name: str, out: Path, *extra: str) -> int:
    return run_command("export", ["--model_name", name, "--checkpoints_dir", str(root), "--format", "gguf",
                                  "--out", str(out), *extra])


def field(reader, key: str):
    """A metadata value as Python (a string, a number, or a list of them)."""
    f = reader.fields[key]
    return f.contents()


def read_tensors(reader) -> dict[str, np.ndarray]:
    """Every tensor as fp32 numpy (out, in), q8_0 and f16 dequantized."""
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(
        tuple(reversed([int(n) for n in t.shape]))) for t in reader.tensors}


# ---------------------------------------------------------------------------------------------
# The forward pass as llama.cpp's architectures compute it, from the file's tensors alone


def _rope(x: torch.Tensor, theta: float, neox: bool, factors: torch.Tensor | None) -> torch.Tensor:
    """x (T, nh, hs) rotated by position: pairs (2j, 2j+1) (llama.cpp's normal rope) or (j, j+hs/2) (neox)."""
    T, _, hs = x.shape
    freq = theta ** -(torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    if factors is not None:
        freq = freq / factors.double()
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freq  # (T, hs/2)
    cos, sin = angle.cos().float()[:, None], angle.sin().float()[:, None]
    a, b = (x[..., : hs // 2], x[..., hs // 2:]) if neox else (x[..., 0::2], x[..., 1::2])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    return torch.cat((ra, rb), -1) if neox else torch.stack((ra, rb), -1).flatten(-2)


def ggml_forward(path: Path, ids: list[int]) -> torch.Tensor:
    """Logits (T, vocab) for ids, computed from the GGUF file's metadata and tensors."""
    reader = gguf.GGUFReader(path)
    arch = field(reader, "general.architecture")
    meta = {k.removeprefix(arch + "."): field(reader, k) for k in reader.fields if k.startswith(arch + ".")}
    w = {k: torch.from_numpy(v) for k, v in read_tensors(reader).items()}
    n_head, n_kv = meta["attention.head_count"], meta["attention.head_count_kv"]
    gpt2 = arch == "gpt2"
    eps = meta["attention.layer_norm_epsilon" if gpt2 else "attention.layer_norm_rms_epsilon"]

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        if gpt2:
            return F.layer_norm(x, x.shape[-1:], w[name + ".weight"], w[name + ".bias"], eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w[name + ".weight"]

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))

    T = len(ids)
    x = w["token_embd.weight"][ids]
    if gpt2:
        x = x + w["position_embd.weight"][:T]
    for i in range(meta["block_count"]):
        b = f"blk.{i}."
        h = norm(x, b + "attn_norm")
        if gpt2:
            hs = x.shape[-1] // n_head
            q, k, v = linear(h, b + "attn_qkv").split((n_head * hs, n_kv * hs, n_kv * hs), -1)
        else:
            hs = meta["attention.key_length"]
            q, k, v = linear(h, b + "attn_q"), linear(h, b + "attn_k"), linear(h, b + "attn_v")
        q, k, v = q.view(T, n_head, hs), k.view(T, n_kv, hs), v.view(T, n_kv, hs)
        if arch == "qwen3":
            q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + eps) * w[b + "attn_q_norm.weight"]
            k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps) * w[b + "attn_k_norm.weight"]
        if not gpt2:
            factors = w.get("rope_freqs.weight")
            q = _rope(q, meta["rope.freq_base"], arch == "qwen3", factors)
            k = _rope(k, meta["rope.freq_base"], arch == "qwen3", factors)
        k, v = k.repeat_interleave(n_head // n_kv, 1), v.repeat_interleave(n_head // n_kv, 1)
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hs)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        x = x + linear(torch.einsum("hqk,khd->qhd", att, v).reshape(T, -1), b + "attn_output")
        h = norm(x, b + "ffn_norm")
        if gpt2:
            h = F.gelu(linear(h, b + "ffn_up"), approximate="tanh")
        else:
            h = F.silu(linear(h, b + "ffn_gate")) * linear(h, b + "ffn_up")
        x = x + linear(h, b + "ffn_down")
    head = w.get("output.weight", w["token_embd.weight"])
    return norm(x, "output_norm") @ head.t()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_read_back_file_computes_mypt_logits(tmp_path, variant):
    fields, arch = VARIANTS[variant]
    make_checkpoint(tmp_path, variant, fields)
    out = tmp_path / "m.gguf"
    assert export(tmp_path, variant, out, "--outtype", "f32") == 0
    reader = gguf.GGUFReader(out)
    assert field(reader, "general.architecture") == arch
    model = load_model(variant, checkpoints_dir=str(tmp_path), device="cpu").model
    ids = [15496, 11, 995, 0, 314, 716, 257, 1332, 13, 50256, 198, 40]
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0][0]
    got = ggml_forward(out, ids)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("outtype,tol", [("f16", 0.005), ("q8_0", 0.05)])
def test_f16_and_q8_0_files_stay_close_to_mypt(tmp_path, outtype, tol):
    fields, _ = VARIANTS["llama-gqa-untied"]
    make_checkpoint(tmp_path, "m", fields)
    out = tmp_path / "m.gguf"
    assert export(tmp_path, "m", out, "--outtype", outtype) == 0
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    want_type = outtype.upper()
    assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == want_type
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert field(reader, "general.file_type") == {"f16": 1, "q8_0": 7}[outtype]
    model = load_model("m", checkpoints_dir=str(tmp_path), device="cpu").model
    ids = [15496, 11, 995, 0, 314, 716, 257]
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0][0]
    got = ggml_forward(out, ids)
    spread = want.std().item()
    assert (got - want).abs().mean().item() < tol * spread, "rounded logits drifted from MyPT's"
    assert not torch.equal(got, want)  # the weights were rounded


def test_metadata_and_tensor_shapes(tmp_path):
    fields, _ = VARIANTS["qwen3-untied-wide-heads"]
    make_checkpoint(tmp_path, "q", fields)
    out = tmp_path / "q.gguf"
    assert export(tmp_path, "q", out) == 0  # default outtype: f16
    reader = gguf.GGUFReader(out)
    meta = {k: field(reader, k) for k in reader.fields if k.startswith("qwen3.")}
    assert meta == {"qwen3.context_length": 16, "qwen3.embedding_length": 64, "qwen3.block_count": 2,
                    "qwen3.feed_forward_length": 96, "qwen3.attention.head_count": 4,
                    "qwen3.attention.head_count_kv": 4, "qwen3.attention.layer_norm_rms_epsilon": pytest.approx(1e-6),
                    "qwen3.rope.freq_base": 500.0, "qwen3.rope.dimension_count": 32,
                    "qwen3.attention.key_length": 32, "qwen3.attention.value_length": 32}
    assert field(reader, "general.name") == "q"
    shapes = {t.name: (tuple(int(n) for n in t.shape), t.tensor_type.name) for t in reader.tensors}
    assert shapes["token_embd.weight"] == ((64, 50304), "F16")  # ggml order: {in, out}
    assert shapes["output.weight"] == ((64, 50304), "F16")
    assert shapes["blk.1.attn_q.weight"] == ((64, 128), "F16")
    assert shapes["blk.1.attn_k_norm.weight"] == ((32,), "F32")
    assert shapes["blk.0.ffn_gate.weight"] == ((64, 96), "F16")
    assert shapes["blk.0.ffn_down.weight"] == ((96, 64), "F16")
    assert len(shapes) == 3 + 2 * 11


def test_gpt2_tokenizer_and_specials(tmp_path):
    make_checkpoint(tmp_path, "g", {})
    out = tmp_path / "g.gguf"
    assert export(tmp_path, "g", out) == 0
    reader = gguf.GGUFReader(out)
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert len(tokens) == len(types) == 50304  # one per embedding row
    assert tokens[:3] == ["!", '"', "#"] and tokens[198] == "Ċ" and tokens[995] == "Ġworld"
    assert tokens[50256:50261] == [EOT, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    assert types[50255] == 1 and types[50256:50261] == [3] * 5 and set(types[50261:]) == {5}
    merges = field(reader, "tokenizer.ggml.merges")
    assert len(merges) == 50000 and merges[0] == "Ġ t"
    assert field(reader, "tokenizer.ggml.eos_token_id") == 50256
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert "tokenizer.chat_template" not in reader.fields  # a base model has none


def test_chat_model_carries_its_template(tmp_path):
    tok = GPT2Tokenizer()
    tok.chat_format = TEMPLATE
    make_checkpoint(tmp_path, "c", VARIANTS["llama-gqa-untied"][0], tok=tok)
    out = tmp_path / "c.gguf"
    assert export(tmp_path, "c", out) == 0
    reader = gguf.GGUFReader(out)
    assert field(reader, "tokenizer.chat_template") == JINJA
    assert field(reader, "tokenizer.ggml.eot_token_id") == tok.chat_ids["<|end|>"] == 50260


def bpe_encode(text_pieces: list[str], tokens: list[str], merges: list[str]) -> list[int]:
    """Plain byte-level BPE over pre-split pieces, as llama.cpp runs it: bytes spelled with GPT-2's
    map, the lowest-ranked adjacent merge applied until none applies, each symbol looked up."""
    spell, rank = bytes_to_unicode(), {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    ids = {t: i for i, t in enumerate(tokens)}
    out = []
    for piece in text_pieces:
        parts = [spell[b] for b in piece.encode("utf-8")]
        while len(parts) > 1:
            best = min(range(len(parts) - 1), key=lambda i: rank.get((parts[i], parts[i + 1]), math.inf))
            if (parts[best], parts[best + 1]) not in rank:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        out += [ids[p] for p in parts]
    return out


def test_char_tokenizer_is_bpe_whose_merges_rebuild_each_character(tmp_path):
    tok = CharTokenizer.from_text(CHAR_TEXT)
    make_checkpoint(tmp_path, "ch", {}, tok=tok)
    out = tmp_path / "ch.gguf"
    assert export(tmp_path, "ch", out) == 0
    reader = gguf.GGUFReader(out)
    tokens, merges = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.merges")
    assert len(tokens) == tok.n_vocab  # a char model's vocabulary is not padded
    assert tokens[tok.eot_id] == EOT
    # 🎉 is 4 bytes (3 merges), 日 and 本 3 (2 each), Ü ï ö é 2 (1 each)
    assert len(merges) == 3 + 2 * 2 + 4
    text = "the quick 日本 fox: Ünïcödé 🎉"
    assert bpe_encode(text.split(" "), tokens, merges) == [i for i in tok.encode(text) if i != tok.encode(" ")[0]]


def test_ascii_char_tokenizer_still_has_a_merge(tmp_path):
    """llama.cpp refuses a BPE vocabulary without tokenizer.ggml.merges; the one written never applies."""
    tok = CharTokenizer.from_text("abc ABC\n")
    make_checkpoint(tmp_path, "a", {}, tok=tok)
    assert export(tmp_path, "a", tmp_path / "a.gguf") == 0
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    tokens, merges = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.merges")
    assert merges == ["À Á"] == [f"{bytes_to_unicode()[0xC0]} {bytes_to_unicode()[0xC1]}"]
    assert bpe_encode(["abc", " ABC", "\n"], tokens, merges) == tok.encode("abc ABC\n")


def test_bpe_tokenizer_merges_encode_like_mypt(tmp_path):
    tok: BPETokenizer = train_bpe([CHAR_TEXT * 20 + "the theme of these thirty thinkers"], 320, "test")
    make_checkpoint(tmp_path, "b", VARIANTS["qwen3-gqa"][0], tok=tok)
    out = tmp_path / "b.gguf"
    assert export(tmp_path, "b", out) == 0
    reader = gguf.GGUFReader(out)
    assert field(reader, "tokenizer.ggml.pre") == "llama-bpe"
    tokens, merges = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.merges")
    assert len(tokens) == 320 and tokens[tok.eot_id] == EOT and len(merges) == len(tok.ranks) - 256
    for word in ("the", " theme", " thinkers", "日本"):
        assert bpe_encode([word], tokens, merges) == tok.encode(word)


REFUSED = {  # variant fields, the words the message must have
    "relu2": ({**LLAMA, "mlp": "relu2"}, ["mlp is relu2", "no llama.cpp architecture"]),
    "learned-rmsnorm": ({"norm": "rmsnorm", "norm_eps": 1e-6}, ["norm is rmsnorm", "gpt2"]),
    "qwen3-bias": ({**LLAMA, "qk_norm": True, "bias": True}, ["bias is true with qk_norm"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_models_no_architecture_computes_are_refused(tmp_path, capsys, case):
    fields, words = REFUSED[case]
    make_checkpoint(tmp_path, "m", fields)
    out = tmp_path / "m.gguf"
    assert export(tmp_path, "m", out) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words) and "Traceback" not in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["m"]


def test_bad_requests_are_refused_and_change_nothing(tmp_path, capsys):
    make_checkpoint(tmp_path, "m", {})
    existing = tmp_path / "old.gguf"
    existing.write_bytes(b"keep me")
    cases = {
        ("--out", str(existing)): "already exists",
        ("--out", str(tmp_path / "missing" / "m.gguf")): "does not exist",
        ("--out", str(tmp_path / "m.gguf"), "--outtype", "q4_0"): "--outtype q4_0: choose one of f32, f16, q8_0",
    }
    for argv, words in cases.items():
        assert run_command("export", ["--model_name", "m", "--checkpoints_dir", str(tmp_path), "--format", "gguf",
                                      *argv]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
    assert run_command("export", ["--model_name", "m", "--checkpoints_dir", str(tmp_path), "--out",
                                  str(tmp_path / "hf"), "--outtype", "f16"]) == 2
    assert "--outtype is for --format gguf" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "old.gguf"]


def test_hf_gpt2_config_has_what_llama_cpp_converter_reads(tmp_path):
    """llama.cpp's convert_hf_to_gguf.py reads GPT-2's n_ctx (older transformers' name), which a
    config.json with only n_positions lacks (KeyError 'n_ctx')."""
    make_checkpoint(tmp_path, "g", {})
    assert run_command("export", ["--model_name", "g", "--checkpoints_dir", str(tmp_path),
                                  "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key, want in {"n_ctx": 16, "n_positions": 16, "n_embd": 64, "n_head": 4, "n_layer": 2,
                      "layer_norm_epsilon": 1e-5}.items():
        assert config[key] == want, key
