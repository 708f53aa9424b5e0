"""The tokenizer files of a Hugging Face transformers folder, for each MyPT tokenizer kind, both ways.

gpt2: vocab.json and merges.txt derived from the shipped tiktoken ranks. bpe: a tokenizers-library
tokenizer.json (the split pattern, then GPT-2's byte-level mapping, then BPE with the vocabulary
and merges, end-of-text as a special added token). Both spell token bytes with GPT-2's
byte-to-unicode map and recover each merge by re-running BPE on a token's bytes with the ranks
below its own. char: a tokenizer.json whose BPE has no merges. The chat tokens are special added
tokens after end-of-text, and a fine-tuned model's template is tokenizer_config.json's
"chat_template" (mypt.finetune.template.JINJA), so that apply_chat_template gives MyPT's ids.
hf_bpe (an imported model's own tokenizer): its tokenizer.json and tokenizer_config.json (chat
template included) as they came.

Import reads such files back: GPT-2's vocabulary, a tokenizer.json written as above (checked
to be one that tiktoken encodes the same way, with the chat tokens and template if present), or
any other byte-level BPE tokenizer.json (Llama 3's, Qwen's), kept whole as an hf_bpe tokenizer
with the model's eos as its end-of-text. Other kinds (WordPiece, Unigram, SentencePiece-style
BPE) are refused, and so is a folder with no tokenizer files whose vocab_size is not GPT-2's.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from mypt.errors import MyPTError
from mypt.finetune.template import JINJA, TEMPLATE
from mypt.fsutil import json_bytes, read_json
from mypt.tokenizers import (
    CHAT_TOKENS,
    EOT,
    GPT2_EOT,
    GPT2_EOT_ID,
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    bpe_parts,
    gpt2_encoding,
)
from mypt.tokenizers.bpe import pattern_problem, ranks_problem
from mypt.tokenizers.hf_bpe import HFBPETokenizer, bytes_to_unicode


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The byte-level vocabulary (token text -> id) and merges (in priority order) of BPE ranks."""
    spell = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(spell[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            parts = bpe_parts(token, ranks, rank)
            assert len(parts) == 2, f"token {rank} is not one merge of two lower-ranked tokens"
            merges.append((text(parts[0]), text(parts[1])))
    return {text(token): rank for token, rank in ranks.items()}, merges


@functools.cache
def gpt2_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json's mapping and merges.txt's pairs (in priority order) for MyPT's gpt2 tokenizer."""
    enc = gpt2_encoding()
    vocab, merges = vocab_and_merges({enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab)
                                      if i != GPT2_EOT_ID})
    vocab[GPT2_EOT] = GPT2_EOT_ID
    return vocab, merges


def _config(block_size: int, tokenizer_class: str, tok: Tokenizer) -> dict[str, Any]:
    special = {"bos_token": EOT, "eos_token": EOT} if tok.eot_id is not None else {}
    template = {"chat_template": JINJA} if tok.chat_format == TEMPLATE else {}
    return {"tokenizer_class": tokenizer_class, "model_max_length": block_size, **special,
            "clean_up_tokenization_spaces": False, **template}


def _gpt2_tokenizer_files(tok: GPT2Tokenizer, block_size: int) -> dict[str, bytes]:
    vocab, merges = gpt2_vocab_and_merges()
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    added = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in _added_tokens(tok)}
    config = {**_config(block_size, "GPT2Tokenizer", tok), "unk_token": GPT2_EOT, "add_prefix_space": False,
              "add_bos_token": False, "added_tokens_decoder": added}
    return {
        "vocab.json": json_bytes(vocab),
        "merges.txt": merges_txt.encode("utf-8"),
        "tokenizer_config.json": json_bytes(config),
    }


def _added_tokens(tok: Tokenizer) -> list[dict[str, Any]]:
    """End-of-text and the chat tokens, as special added tokens (never split, never normalized)."""
    if tok.eot_id is None:
        return []
    specials = {EOT: tok.eot_id, **tok.chat_ids}
    return [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True} for t, i in specials.items()]


def _tokenizer_json(model: dict[str, Any], tok: Tokenizer, pre_tokenizer: Any, decoder: Any) -> dict[str, Any]:
    bpe = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
           "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": _added_tokens(tok),
            "normalizer": None, "pre_tokenizer": pre_tokenizer, "post_processor": None, "decoder": decoder,
            "model": {**bpe, **model}}


def _char_tokenizer_files(tok: CharTokenizer, block_size: int) -> dict[str, bytes]:
    """BPE without merges maps each character to its id; Fuse joins them with nothing between."""
    model = {"vocab": {c: i for i, c in enumerate(tok.chars)}, "merges": []}
    tokenizer = _tokenizer_json(model, tok, None, {"type": "Fuse"})
    config = _config(block_size, "PreTrainedTokenizerFast", tok)
    return {"tokenizer.json": json_bytes(tokenizer), "tokenizer_config.json": json_bytes(config)}


def _byte_level(kind: str) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": kind == "pre", "use_regex": False}


def _bpe_tokenizer_files(tok: BPETokenizer, block_size: int) -> dict[str, bytes]:
    """The split pattern isolates the pieces tiktoken splits; ignore_merges takes a piece that is
    a whole token as that token, as tiktoken does."""
    vocab, merges = vocab_and_merges({token: i for i, token in enumerate(tok.ranks)})
    model = {"ignore_merges": True, "vocab": {**vocab, EOT: tok.eot_id}, "merges": [f"{a} {b}" for a, b in merges]}
    split = {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False}
    pre = {"type": "Sequence", "pretokenizers": [split, _byte_level("pre")]}
    tokenizer = _tokenizer_json(model, tok, pre, _byte_level("decoder"))
    config = _config(block_size, "PreTrainedTokenizerFast", tok)
    return {"tokenizer.json": json_bytes(tokenizer), "tokenizer_config.json": json_bytes(config)}


def tokenizer_files(tok: Tokenizer, block_size: int) -> tuple[dict[str, bytes], list[str]]:
    """The tokenizer files of an exported folder for tok, and notes for the user."""
    if isinstance(tok, HFBPETokenizer):  # an imported model's own files (with MyPT's chat tokens, once fine-tuned)
        config = {**tok.config, "model_max_length": block_size}
        notes = ["the tokenizer is the imported model's own: transformers turns its special-token strings in a text "
                 "into the special tokens unless you pass split_special_tokens=True, MyPT keeps them as text"]
        if tok.chat_format == TEMPLATE:
            config["chat_template"] = JINJA
            notes.append(f"chat template {TEMPLATE} (MyPT's chat tokens, ids {tok.chat_start}-{tok.n_vocab - 1}) "
                         "written as tokenizer_config.json's chat_template, in place of the base model's")
        return {"tokenizer.json": json_bytes(tok.tokenizer), "tokenizer_config.json": json_bytes(config)}, notes
    notes = []
    if tok.eot_id is not None:
        notes.append(f"{EOT} is the special token {tok.eot_id} (eos_token); transformers turns that string in a "
                     "text into it unless you pass split_special_tokens=True, MyPT keeps it as text")
    if tok.chat_format == TEMPLATE:
        notes.append(f"chat template {TEMPLATE} written as tokenizer_config.json's chat_template: "
                     "apply_chat_template(messages, add_generation_prompt=True) gives MyPT's ids; generate() "
                     f"stops a reply at <|end|> (id {tok.chat_ids['<|end|>']}, generation_config.json)")
    if isinstance(tok, CharTokenizer):
        notes.append(f"char tokenizer ({len(tok.chars)} characters) written as tokenizer.json; "
                     "transformers drops characters it does not know instead of failing")
        return _char_tokenizer_files(tok, block_size), notes
    if isinstance(tok, BPETokenizer):
        return _bpe_tokenizer_files(tok, block_size), notes
    return _gpt2_tokenizer_files(tok, block_size), notes


# ---------------------------------------------------------------------------------------------
# Import


GPT2_VOCAB_SIZES = (50257, 50304)  # GPT-2's vocabulary, and padded to a multiple of 64 as MyPT pads it


def import_tokenizer(hf_dir: Path, hf: dict[str, Any]) -> tuple[Tokenizer, str | None]:
    """The MyPT tokenizer of a transformers folder (hf: its config.json), and why it cannot be used
    (None: it can).

    tokenizer.json comes first (GPT-2's, a MyPT export's, or a byte-level BPE such as Llama 3's
    or Qwen's), then vocab.json (GPT-2's only). A folder with neither is taken to use GPT-2's
    tokenizer only when its vocab_size is GPT-2's; any other is refused. A MyPT export's chat
    tokens and template come back with it.
    """
    tok, problem = _import_tokenizer(hf_dir, hf)
    if problem is None and tok.chat:
        config = hf_dir / "tokenizer_config.json"
        saved = read_json(config, "tokenizer config") if config.is_file() else {}
        if isinstance(saved, dict) and saved.get("chat_template") == JINJA:
            tok.chat_format = TEMPLATE  # a model fine-tuned by MyPT
    return tok, problem


def _import_tokenizer(hf_dir: Path, hf: dict[str, Any]) -> tuple[Tokenizer, str | None]:
    gpt2_vocab, _ = gpt2_vocab_and_merges()
    path = hf_dir / "tokenizer.json"
    if not path.is_file() and (hf_dir / "vocab.json").is_file():
        if read_json(hf_dir / "vocab.json", "vocabulary") == gpt2_vocab:
            return _gpt2_from_hf(hf_dir)
        return GPT2Tokenizer(chat=False), ("its vocab.json is not GPT-2's and it has no tokenizer.json; MyPT reads "
                                           "GPT-2's vocab.json, or a byte-level BPE tokenizer.json: copy the model's "
                                           "tokenizer.json and tokenizer_config.json into the folder")
    if not path.is_file():
        if hf.get("vocab_size") in GPT2_VOCAB_SIZES:
            return GPT2Tokenizer(chat=False), None
        return GPT2Tokenizer(chat=False), (f"it has no tokenizer.json, and its vocab_size ({hf.get('vocab_size')}) "
                                           "is not GPT-2's, so its ids mean nothing to any tokenizer MyPT has: copy "
                                           "the model's tokenizer files (tokenizer.json, tokenizer_config.json) into "
                                           "the folder")
    d = read_json(path, "tokenizer")
    model = d.get("model") if isinstance(d, dict) else None
    if isinstance(model, dict) and model.get("type", "BPE") != "BPE":
        return GPT2Tokenizer(chat=False), (f"{path}: its model type is {model.get('type')!r}; MyPT reads byte-level "
                                           "BPE tokenizers (GPT-2's, Llama 3's, Qwen's) only")
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict):
        return GPT2Tokenizer(chat=False), (f"{path} has no BPE vocabulary (model.vocab); it is not a tokenizer "
                                           "MyPT reads")
    try:
        if model["vocab"] == gpt2_vocab:
            return GPT2Tokenizer(_specials_from_hf(d.get("added_tokens") or [], str(path))[1]), None
        if _is_char(d):
            return _char_from_hf(d, str(path)), None
        return _mypt_or_hf_bpe(d, hf_dir, hf), None
    except MyPTError as e:
        return GPT2Tokenizer(chat=False), str(e)
    except (TypeError, AttributeError, KeyError, ValueError) as e:  # a field of an unexpected shape
        return GPT2Tokenizer(chat=False), (f"{path} is not a tokenizer.json of a kind MyPT reads (a field has an "
                                           f"unexpected shape: {type(e).__name__}: {str(e)[:120]})")


def _gpt2_from_hf(hf_dir: Path) -> tuple[Tokenizer, str | None]:
    """GPT-2's tokenizer, with the chat tokens if tokenizer_config.json adds them (a MyPT export)."""
    path = hf_dir / "tokenizer_config.json"
    config = read_json(path, "tokenizer config") if path.is_file() else {}
    decoder = config.get("added_tokens_decoder") if isinstance(config, dict) else None
    if not isinstance(decoder, dict):
        return GPT2Tokenizer(chat=False), None
    try:
        added = [{**t, "id": int(i)} for i, t in decoder.items()]
        return GPT2Tokenizer(_specials_from_hf(added, str(path))[1]), None
    except MyPTError as e:
        return GPT2Tokenizer(chat=False), str(e)
    except (TypeError, ValueError) as e:
        return GPT2Tokenizer(chat=False), f"{path}: added_tokens_decoder has an unexpected shape ({e})"


def _specials_from_hf(added: list[Any], source: str) -> tuple[int | None, bool]:
    """(end-of-text's id, whether the chat tokens follow it) from a folder's added tokens; only
    those two kinds of special token are read."""
    ids = {t.get("content"): t.get("id") for t in added if isinstance(t, dict)}
    eot = ids.pop(EOT, None)
    if not ids:
        return eot, False
    if eot is not None and ids == {t: eot + 1 + i for i, t in enumerate(CHAT_TOKENS)}:
        return eot, True
    raise MyPTError(f"{source}: added tokens other than {EOT} and MyPT's chat tokens right after it "
                    f"({', '.join(CHAT_TOKENS)}) are not supported")


def _mypt_or_hf_bpe(d: dict[str, Any], hf_dir: Path, hf: dict[str, Any]) -> Tokenizer:
    """A tokenizer.json MyPT exported (its bpe kind), else the folder's own byte-level BPE (hf_bpe)."""
    source = str(hf_dir / "tokenizer.json")
    try:
        return _bpe_from_hf(d, source)
    except MyPTError:
        if not _is_byte_level_bpe(d):
            raise
    config = _tokenizer_config(hf_dir)
    ids = {t["content"]: t["id"] for t in d.get("added_tokens") or []}
    eot = _special_id(_eos_setting(hf_dir, hf, config), ids)
    if eot is None:
        raise MyPTError(f"{source}: no end-of-text token: neither generation_config.json nor config.json has an "
                        "eos_token_id, nor tokenizer_config.json an eos_token that is one of its added tokens")
    return HFBPETokenizer(d, config, eot, _special_id(config.get("bos_token"), ids), source)


def _is_byte_level_bpe(d: dict[str, Any]) -> bool:
    """A BPE over GPT-2's byte spelling: a ByteLevel pre-tokenizer (alone or last of a Sequence) and decoder."""
    pre, decoder = d.get("pre_tokenizer") or {}, d.get("decoder") or {}
    steps = pre.get("pretokenizers") or [{}] if pre.get("type") == "Sequence" else [pre]
    last = steps[-1] if isinstance(steps, list) else {}
    return isinstance(last, dict) and last.get("type") == "ByteLevel" and decoder.get("type") == "ByteLevel"


def _tokenizer_config(hf_dir: Path) -> dict[str, Any]:
    """tokenizer_config.json (empty if absent), its chat_template taken from chat_template.jinja
    where transformers wrote it there."""
    path = hf_dir / "tokenizer_config.json"
    config = read_json(path, "tokenizer config") if path.is_file() else {}
    if not isinstance(config, dict):
        raise MyPTError(f"{path}: expected a JSON object")
    jinja = hf_dir / "chat_template.jinja"
    if "chat_template" not in config and jinja.is_file():
        config["chat_template"] = jinja.read_text(encoding="utf-8")
    return config


def _eos_setting(hf_dir: Path, hf: dict[str, Any], config: dict[str, Any]) -> Any:
    """The model's eos as the folder gives it: generation_config.json's eos_token_id, config.json's,
    or tokenizer_config.json's eos_token (an id, a list of ids, or a token's text)."""
    path = hf_dir / "generation_config.json"
    generation = read_json(path, "generation config") if path.is_file() else {}
    for source in (generation, hf):
        if isinstance(source, dict) and source.get("eos_token_id") is not None:
            return source["eos_token_id"]
    return config.get("eos_token")


def _special_id(setting: Any, ids: dict[str, int]) -> int | None:
    """The id a bos/eos setting names: an id, the first of a list, or an added token's text (or {"content"})."""
    if isinstance(setting, list):
        setting = setting[0] if setting else None
    if isinstance(setting, dict):
        setting = setting.get("content")
    if isinstance(setting, str):
        return ids.get(setting)
    return setting if isinstance(setting, int) and not isinstance(setting, bool) else None


def _eot_from_hf(d: dict[str, Any], source: str) -> int | None:
    return _specials_from_hf(d.get("added_tokens") or [], source)[0]


def _is_char(d: dict[str, Any]) -> bool:
    return not d["model"].get("merges") and d.get("pre_tokenizer") is None and d.get("decoder") == {"type": "Fuse"}


def _char_from_hf(d: dict[str, Any], source: str) -> CharTokenizer:
    vocab = d["model"]["vocab"]
    chars = sorted(vocab, key=lambda c: vocab[c])
    eot, chat = _specials_from_hf(d.get("added_tokens") or [], source)
    if [vocab[c] for c in chars] != list(range(len(chars))) or chars != sorted(chars) or \
            not all(len(c) == 1 for c in chars) or eot not in (None, len(chars)):
        raise MyPTError(f"{source}: a character vocabulary must map sorted single characters to 0, 1, 2, ... "
                        "(then end-of-text); this one does not")
    return CharTokenizer(chars, eot=eot is not None, chat=chat)


def _bpe_from_hf(d: dict[str, Any], source: str) -> BPETokenizer:
    """The byte-level BPE of a tokenizer.json like the one _bpe_tokenizer_files writes."""
    pattern = _split_pattern(d, source)
    ranks = _byte_ranks(d["model"]["vocab"], source)
    problem = ranks_problem(ranks) or pattern_problem(pattern)
    if problem is None and _eot_from_hf(d, source) != len(ranks):
        problem = f"{EOT} must be the special token right after the vocabulary (id {len(ranks)})"
    if problem is None:
        merges = [m if isinstance(m, str) else " ".join(m) for m in d["model"].get("merges") or []]
        _, ours = vocab_and_merges({token: i for i, token in enumerate(ranks)})
        if merges != [f"{a} {b}" for a, b in ours]:
            problem = "its merges are not in the order of the tokens they make, so tiktoken would split differently"
    if problem:
        raise MyPTError(f"{source}: {problem}")
    return BPETokenizer(ranks, pattern, _specials_from_hf(d.get("added_tokens") or [], source)[1])


def _byte_ranks(vocab: dict[str, int], source: str) -> list[bytes]:
    """The bytes of each id of a byte-level vocabulary (end-of-text left out), in id order."""
    unspell = {c: b for b, c in bytes_to_unicode().items()}
    try:
        tokens = sorted((i, bytes(unspell[c] for c in text)) for text, i in vocab.items() if text != EOT)
    except KeyError:
        raise MyPTError(f"{source}: its vocabulary is not byte-level (a token has a character outside "
                        "GPT-2's byte map)") from None
    if [i for i, _ in tokens] != list(range(len(tokens))):
        raise MyPTError(f"{source}: the ids of its vocabulary are not 0, 1, 2, ...")
    return [token for _, token in tokens]


def _split_pattern(d: dict[str, Any], source: str) -> str:
    pre = d.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    ok = (isinstance(steps, list) and len(steps) == 2 and steps[0].get("type") == "Split"
          and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
          and isinstance((steps[0].get("pattern") or {}).get("Regex"), str)
          and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex")
          and not steps[1].get("add_prefix_space") and d.get("normalizer") is None)
    if not ok:
        raise MyPTError(f"{source}: its pre-tokenizer is not a split pattern followed by GPT-2's byte mapping "
                        "(the form mypt export writes); MyPT cannot read it")
    return steps[0]["pattern"]["Regex"]
