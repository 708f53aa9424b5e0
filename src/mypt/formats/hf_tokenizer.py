"""The tokenizer files of a Hugging Face transformers folder, for each MyPT tokenizer kind.

gpt2: vocab.json and merges.txt derived from the shipped tiktoken ranks (token bytes spelled
with GPT-2's byte-to-unicode map; each merge recovered by re-running BPE on a token's bytes
with the ranks below its own). char: a tokenizers-library tokenizer.json whose BPE has no merges.
"""

from __future__ import annotations

import functools
from pathlib import Path

from mypt.fsutil import json_bytes, read_json
from mypt.tokenizers import GPT2_EOT, GPT2_EOT_ID, CharTokenizer, Tokenizer, gpt2_encoding


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (how vocab.json spells bytes).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes get the characters
    from U+0100 on, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in chars)
    chars.update((b, chr(256 + i)) for i, b in enumerate(extra))
    return dict(sorted(chars.items()))


def _bpe_parts(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """BPE of token's bytes using only the merges whose result ranks below `below`."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, where = below, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], below)
            if rank < best:
                best, where = rank, i
        if where < 0:
            break
        parts[where:where + 2] = [parts[where] + parts[where + 1]]
    return parts


@functools.cache
def gpt2_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json's mapping and merges.txt's pairs (in priority order) for MyPT's gpt2 tokenizer."""
    enc = gpt2_encoding()
    ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i != GPT2_EOT_ID}
    spell = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(spell[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            parts = _bpe_parts(token, ranks, rank)
            assert len(parts) == 2, f"token {rank} is not one merge of two lower-ranked tokens"
            merges.append((text(parts[0]), text(parts[1])))
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[GPT2_EOT] = GPT2_EOT_ID
    return vocab, merges


def _gpt2_tokenizer_files(block_size: int) -> dict[str, bytes]:
    vocab, merges = gpt2_vocab_and_merges()
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": block_size,
        "bos_token": GPT2_EOT,
        "eos_token": GPT2_EOT,
        "unk_token": GPT2_EOT,
        "add_prefix_space": False,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    return {
        "vocab.json": json_bytes(vocab),
        "merges.txt": merges_txt.encode("utf-8"),
        "tokenizer_config.json": json_bytes(config),
    }


def _char_tokenizer_files(tok: CharTokenizer, block_size: int) -> dict[str, bytes]:
    """A tokenizers-library tokenizer.json: BPE without merges maps each character to its id."""
    model = {
        "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
        "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
        "vocab": {c: i for i, c in enumerate(tok.chars)}, "merges": [],
    }
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": None, "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Fuse"},  # join the characters with nothing between them
        "model": model,
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": block_size,
        "clean_up_tokenization_spaces": False,
    }
    return {"tokenizer.json": json_bytes(tokenizer), "tokenizer_config.json": json_bytes(config)}


def tokenizer_files(tok: Tokenizer, block_size: int) -> tuple[dict[str, bytes], list[str]]:
    """The tokenizer files of an exported folder for tok, and notes for the user."""
    if isinstance(tok, CharTokenizer):
        notes = [f"char tokenizer ({tok.n_vocab} characters) written as tokenizer.json; "
                 "transformers drops characters it does not know instead of failing"]
        return _char_tokenizer_files(tok, block_size), notes
    return _gpt2_tokenizer_files(block_size), []


def tokenizer_problem(hf_dir: Path) -> str | None:
    """Why the folder's tokenizer is not GPT-2's (None: it is, or the folder has none)."""
    vocab, _ = gpt2_vocab_and_merges()
    if (hf_dir / "vocab.json").is_file():
        theirs = read_json(hf_dir / "vocab.json", "vocabulary")
    elif (hf_dir / "tokenizer.json").is_file():
        theirs = (read_json(hf_dir / "tokenizer.json", "tokenizer").get("model") or {}).get("vocab")
    else:
        return None
    if theirs != vocab:
        return ("its tokenizer is not GPT-2's (vocab differs); MyPT can only pair imported "
                "weights with its gpt2 tokenizer")
    return None
