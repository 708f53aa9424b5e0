"""GGUF files for llama.cpp (and Ollama or LM Studio on top of it): the export.

Owns the mapping of a MyPT model onto the llama.cpp architecture that computes the same function,
its tensor names and layouts, its metadata and the embedded tokenizer; the `gguf` package (kept
by llama.cpp's developers) writes the file. The architectures, as llama.cpp's src/models/ computes
them:

* gpt2: learned positions, LayerNorm (weight and bias, every bias required: MyPT's absent ones are
  written as zeros), tanh GELU MLP, one fused attn_qkv matrix (grouped-query allowed), the output
  layer tied unless output.weight is present.
* llama: rotary positions on the pairs (2j, 2j + 1) of each head (llama.cpp's "normal" rope), which
  is MyPT's own layout, so the query and key rows go out as they are; RMSNorm; SwiGLU; optional
  biases; Llama 3 rope scaling as the rope_freqs tensor (each frequency's divisor).
* qwen3: as llama plus the RMSNorm of each head's queries and keys, but rotating the pairs
  (j, j + hs/2) ("neox" rope), so the query and key rows and the QK-norm gains are permuted as for
  transformers (hf_llama's rule); no biases and no rope scaling.

Tokenizers: gpt2 and bpe as byte-level BPE (model "gpt2") with their merges, pre-tokenized by
llama.cpp's "gpt-2" or "llama-bpe" (cl100k) pattern; char as a byte-level BPE whose merges only
join the bytes of each multi-byte character, so that every known character is one token.
End-of-text and the chat tokens are control tokens (never produced from text), the padding rows
of the embedding are unused tokens, and a fine-tuned model carries its chat template.

Tensor types (--outtype): f32, f16 or q8_0 for the matrices; vectors, norms and the position
table stay f32, and a matrix whose rows do not split into q8_0's blocks of 32 is written f16.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mypt import fsutil
from mypt.build import Built
from mypt.config import ModelConfig
from mypt.errors import MyPTError
from mypt.finetune.template import JINJA, TEMPLATE
from mypt.formats.hf_llama import _per_head, _rotary_order
from mypt.formats.hf_tokenizer import gpt2_vocab_and_merges, vocab_and_merges
from mypt.model import llama3_frequencies
from mypt.tokenizers import (
    EOT,
    SPLIT_PATTERN,
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
)
from mypt.tokenizers.hf_bpe import bytes_to_unicode

OUTTYPES = ("f32", "f16", "q8_0")
DEFAULT_OUTTYPE = "f16"  # q8_0 crashed in llama.cpp on one CPU (BENCHMARKS.md); f16 runs everywhere measured
EXTRA = "pip install 'mypt[gguf]'"
# LLAMA_FTYPE of llama.cpp (general.file_type): what most of the file's matrices are
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}
# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, CONTROL, UNUSED = 1, 3, 5
GPT2_PRE, CL100K_PRE = "gpt-2", "llama-bpe"  # llama.cpp's names of the two split patterns


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise MyPTError(f"--format gguf needs the gguf package: {EXTRA}") from None
    return gguf


# ---------------------------------------------------------------------------------------------
# Which architecture


def gpt2_problems(cfg: ModelConfig) -> list[str]:
    """What keeps the config from llama.cpp's gpt2 architecture, each naming its field."""
    return cfg.mismatches({"position": "learned", "norm": "layernorm", "mlp": "gelu", "qk_norm": False,
                           "head_dim": cfg.n_embd // cfg.n_head}, "llama.cpp's gpt2")


def llama_problems(cfg: ModelConfig) -> list[str]:
    """What keeps the config from llama.cpp's llama (or, with qk_norm, qwen3) architecture."""
    problems = cfg.mismatches({"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"}, "llama.cpp's llama (and qwen3)")
    if cfg.qk_norm and cfg.bias:
        problems.append("bias is true with qk_norm; llama.cpp's qwen3 has no biases (llama has: leave out "
                        "qk_norm, or set bias false)")
    if cfg.qk_norm and cfg.rope_scaling:
        problems.append("rope_scaling is set with qk_norm; llama.cpp's qwen3 has no rope scaling")
    return problems


def architecture(cfg: ModelConfig) -> str:
    """llama.cpp's architecture for the config: gpt2, llama or qwen3; a MyPTError naming the
    fields when none computes the model."""
    gpt2, llama = gpt2_problems(cfg), llama_problems(cfg)
    if not gpt2:
        return "gpt2"
    if not llama:
        return "qwen3" if cfg.qk_norm else "llama"
    problems, target = (gpt2, "gpt2") if len(gpt2) < len(llama) else (llama, "llama (or qwen3)")
    raise MyPTError(f"--format gguf: no llama.cpp architecture computes this model (config.json): "
                    f"{'; '.join(problems)}. The closest is llama.cpp's {target}; --format safetensors "
                    "exports it for MyPT")


# ---------------------------------------------------------------------------------------------
# Tensors, named and laid out as llama.cpp reads them (numpy (out, in) = ggml {in, out})


def _gpt2_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """gpt2's tensors; a bias MyPT leaves out (bias false) as zeros, since gpt2 requires them all."""
    def with_bias(ours: str, theirs: str) -> dict[str, torch.Tensor]:
        weight = state[ours + ".weight"]
        bias = state.get(ours + ".bias")
        return {theirs + ".weight": weight,
                theirs + ".bias": torch.zeros(weight.size(0), dtype=weight.dtype) if bias is None else bias}

    out = {"token_embd.weight": state["transformer.wte.weight"],
           "position_embd.weight": state["transformer.wpe.weight"]}
    for i in range(cfg.n_layer):
        ours, blk = f"transformer.h.{i}.", f"blk.{i}."
        out |= with_bias(ours + "attn.c_attn", blk + "attn_qkv") | with_bias(ours + "attn.c_proj", blk + "attn_output")
        out |= with_bias(ours + "mlp.c_fc", blk + "ffn_up") | with_bias(ours + "mlp.c_proj", blk + "ffn_down")
        # a LayerNorm's weight is a vector: with_bias's zeros have its length
        out |= with_bias(ours + "ln_1", blk + "attn_norm") | with_bias(ours + "ln_2", blk + "ffn_norm")
    out |= with_bias("transformer.ln_f", "output_norm")
    if not cfg.tie_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    return out


def _llama_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """llama's or qwen3's tensors: c_attn split into q, k, v and c_fc into gate, up; for qwen3
    (neox rope) each head's query and key rows and QK-norm gains permuted to the halves layout."""
    hs = cfg.head_dim
    order = _rotary_order(hs) if arch == "qwen3" else torch.arange(hs)
    widths = (cfg.n_head * hs, cfg.kv_heads * hs, cfg.kv_heads * hs)
    out = {"token_embd.weight": state["transformer.wte.weight"], "output_norm.weight": state["transformer.ln_f.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    for i in range(cfg.n_layer):
        ours, blk = f"transformer.h.{i}.", f"blk.{i}."
        out[blk + "attn_norm.weight"] = state[ours + "ln_1.weight"]
        out[blk + "ffn_norm.weight"] = state[ours + "ln_2.weight"]
        for kind in ("weight", "bias") if cfg.bias else ("weight",):
            q, k, v = state[ours + f"attn.c_attn.{kind}"].split(widths)
            out |= {blk + f"attn_q.{kind}": _per_head(q, hs, order), blk + f"attn_k.{kind}": _per_head(k, hs, order),
                    blk + f"attn_v.{kind}": v, blk + f"attn_output.{kind}": state[ours + f"attn.c_proj.{kind}"]}
            gate, up = state[ours + f"mlp.c_fc.{kind}"].chunk(2)
            out |= {blk + f"ffn_gate.{kind}": gate, blk + f"ffn_up.{kind}": up,
                    blk + f"ffn_down.{kind}": state[ours + f"mlp.c_proj.{kind}"]}
        if cfg.qk_norm:
            out[blk + "attn_q_norm.weight"] = state[ours + "attn.q_norm.weight"][order]
            out[blk + "attn_k_norm.weight"] = state[ours + "attn.k_norm.weight"][order]
    if cfg.rope_scaling:
        out["rope_freqs.weight"] = rope_factors(cfg)
    return out


def rope_factors(cfg: ModelConfig) -> torch.Tensor:
    """llama.cpp's rope_freqs for Llama 3 scaling: it divides each rotary frequency by its factor."""
    inv_freq = cfg.rope_theta ** -(torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    return (inv_freq / llama3_frequencies(inv_freq, cfg.rope_scaling)).float()


def gguf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, np.ndarray]:
    """Every tensor of the file as fp32 numpy arrays in llama.cpp's names and layouts."""
    tensors = _gpt2_tensors(state, cfg) if arch == "gpt2" else _llama_tensors(state, cfg, arch)
    return {name: t.detach().to("cpu", torch.float32).contiguous().numpy() for name, t in tensors.items()}


def _encoded(gguf: Any, name: str, data: np.ndarray, outtype: str) -> tuple[np.ndarray, Any, str | None]:
    """(data, ggml type, note) of one tensor at outtype: vectors, norms and the position table stay f32;
    a matrix q8_0 cannot split into blocks of 32 falls back to f16 (the note says so)."""
    types = gguf.GGMLQuantizationType
    if data.ndim == 1 or name.endswith("_norm.weight") or name == "position_embd.weight" or outtype == "f32":
        return data, types.F32, None
    if outtype == "q8_0":
        if data.shape[-1] % gguf.GGML_QUANT_SIZES[types.Q8_0][0] == 0:
            return gguf.quants.quantize(data, types.Q8_0), types.Q8_0, None
        note = f"{name}: rows of {data.shape[-1]} do not split into q8_0's blocks of 32; written f16"
        return data.astype(np.float16), types.F16, note
    return data.astype(np.float16), types.F16, None


# ---------------------------------------------------------------------------------------------
# The tokenizer


def _char_vocab(tok: CharTokenizer) -> tuple[list[str], list[str]]:
    """Each character spelled byte-level, and the merges that join a multi-byte character's bytes
    (left to right): llama.cpp's BPE then turns each known character into its one token."""
    spell = bytes_to_unicode()
    tokens, merges = [], []
    for c in tok.chars:
        data = c.encode("utf-8", errors="surrogatepass")
        tokens.append("".join(spell[b] for b in data))
        merges += [f"{tokens[-1][:n]} {tokens[-1][n]}" for n in range(1, len(data))]
    # llama.cpp refuses a BPE vocabulary without merges (and the gguf package drops an empty list):
    # all-ASCII characters get one that never applies, 0xC0 and 0xC1 being bytes UTF-8 never has
    return tokens, merges or [f"{spell[0xC0]} {spell[0xC1]}"]


def _base_vocab(tok: Tokenizer) -> tuple[list[str], list[str], str]:
    """(token texts of the ordinary ids, merges, llama.cpp pre-tokenizer) of a MyPT tokenizer."""
    if isinstance(tok, GPT2Tokenizer):
        vocab, merges = gpt2_vocab_and_merges()
        texts = sorted(vocab, key=vocab.__getitem__)[:tok.eot_id]
        return texts, [f"{a} {b}" for a, b in merges], GPT2_PRE
    if isinstance(tok, BPETokenizer):
        if tok.pattern != SPLIT_PATTERN:
            raise MyPTError("--format gguf: this bpe tokenizer splits text with its own pattern, which no llama.cpp "
                            "pre-tokenizer reproduces; export --format hf and convert that folder with llama.cpp's "
                            "convert_hf_to_gguf.py")
        vocab, merges = vocab_and_merges({token: i for i, token in enumerate(tok.ranks)})
        return sorted(vocab, key=vocab.__getitem__), [f"{a} {b}" for a, b in merges], CL100K_PRE
    if isinstance(tok, CharTokenizer):
        tokens, merges = _char_vocab(tok)
        return tokens, merges, GPT2_PRE
    raise MyPTError(f"--format gguf: the {tok.kind} tokenizer (an imported model's own) is not written by MyPT's "
                    "GGUF export; export --format hf and convert that folder with llama.cpp's convert_hf_to_gguf.py")


def vocabulary(tok: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str], str]:
    """(tokens, token types, merges, pre-tokenizer) with one token per row of the embedding:
    the ordinary ids, end-of-text and the chat tokens (control), then padding (unused)."""
    texts, merges, pre = _base_vocab(tok)
    special = {} if tok.eot_id is None else {EOT: tok.eot_id, **tok.chat_ids}
    types = [NORMAL] * len(texts)
    for text, i in special.items():
        assert i == len(texts), "special tokens follow the ordinary ids"
        texts.append(text)
        types.append(CONTROL)
    pads = vocab_size - len(texts)
    return texts + [f"[PAD{i}]" for i in range(len(texts), vocab_size)], types + [UNUSED] * pads, merges, pre


def _add_tokenizer(writer: Any, tok: Tokenizer, vocab_size: int) -> None:
    tokens, types, merges, pre = vocabulary(tok, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_add_bos_token(False)  # MyPT's ids start with the text itself
    writer.add_add_eos_token(False)
    if tok.eot_id is not None:
        writer.add_bos_token_id(tok.eot_id)
        writer.add_eos_token_id(tok.eot_id)
        writer.add_pad_token_id(tok.eot_id)
    if tok.chat_format == TEMPLATE:
        writer.add_eot_token_id(tok.chat_ids["<|end|>"])  # a reply ends at end-of-turn
        writer.add_chat_template(JINJA)


# ---------------------------------------------------------------------------------------------
# The file


def _add_hparams(writer: Any, cfg: ModelConfig, arch: str) -> None:
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.hidden_size)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.kv_heads)
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
        return
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)


def export_gguf(built: Built, out: Path, outtype: str = DEFAULT_OUTTYPE, name: str = "") -> list[str]:
    """Write a built model as the GGUF file `out` (which must not exist; its folder must); notes for the user."""
    gguf = _gguf()
    check_request(out, outtype)
    cfg, tok = built.config, built.tokenizer
    arch = architecture(cfg)
    vocabulary(tok, cfg.vocab_size)  # a tokenizer the file cannot carry is refused before anything is written
    notes: list[str] = [f"llama.cpp architecture {arch}, tensors {outtype}"]
    tmp = fsutil.temp_path(out)
    try:
        fsutil.create_temp(tmp).close()
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(name or cfg.name)
        writer.add_file_type(FILE_TYPES[outtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hparams(writer, cfg, arch)
        _add_tokenizer(writer, tok, cfg.vocab_size)
        for tensor_name, data in gguf_tensors(built.model.state_dict(), cfg, arch).items():
            data, qtype, note = _encoded(gguf, tensor_name, data, outtype)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
            notes += [note] if note else []
        _write(writer, tmp)
        os.link(tmp, out)  # refuses a file that appeared at out meanwhile
        fsutil.fsync_dir(out.parent)
    except OSError as exc:
        raise fsutil.write_error(str(out), exc, "nothing was written there") from None
    finally:
        tmp.unlink(missing_ok=True)
    return notes + _notes(cfg, tok, arch)


def _write(writer: Any, tmp: Path) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())


def check_request(out: Path, outtype: str) -> None:
    """Refuse an unknown outtype, an existing --out and one in a missing folder (before any work)."""
    if outtype not in OUTTYPES:
        raise MyPTError(f"--outtype {outtype}: choose one of {', '.join(OUTTYPES)}")
    if os.path.lexists(out):
        raise MyPTError(f"--out {out} already exists; remove it or pick another --out")
    if not out.parent.is_dir():
        raise MyPTError(f"--out {out}: the folder {out.parent} does not exist; create it or pick another --out")


def _notes(cfg: ModelConfig, tok: Tokenizer, arch: str) -> list[str]:
    notes = []
    if arch != "gpt2":
        notes.append(f"past {cfg.block_size} tokens (block_size) llama.cpp attends to the whole context while MyPT "
                     "slides a window of block_size tokens: the two agree up to block_size tokens")
    if tok.chat and tok.chat_format is None:
        notes.append("a base model: llama.cpp may sample the chat tokens, which MyPT never samples for it")
    if isinstance(tok, CharTokenizer):
        notes.append("char tokenizer: llama.cpp drops characters it does not know, where MyPT refuses them")
    if tok.chat_format == TEMPLATE:
        notes.append("chat template written (tokenizer.chat_template); a reply ends at <|end|>")
    return notes

