"""The "hf_bpe" tokenizer: an imported model's own byte-level BPE (Llama 3's, Qwen's), kept as its
Hugging Face tokenizer.json and run by the `tokenizers` library, so its ids are transformers' ids.

Such a tokenizer has its own split pattern, merges and added special tokens (<|begin_of_text|>,
<|eot_id|>, <|im_start|>, <|im_end|>, <|endoftext|>, ...) at their own ids, and a chat template.
MyPT keeps all of it: to_json holds the whole tokenizer.json, the tokenizer_config.json it came
with (chat template included) and the ids of end-of-text (the model's eos) and begin-of-text.

As with every MyPT tokenizer, encode() turns special-token strings in a text into the
characters they are made of, never into the special ids, and adds no begin-of-text: its ids are
transformers' `tok(text, add_special_tokens=False, split_special_tokens=True)`; a prompt
(mypt.api's encode_prompt) also gets prompt_prefix, so it is `tok(text, split_special_tokens=True)`.
decode() writes special tokens as their strings, as transformers' decode does.

Fine-tuning into a MyPT chat model (`with_chat`) adds MyPT's four chat tokens as added special
tokens after every id the tokenizer has (`chat_start` on), so its ids for text stay transformers'
and the fine-tune's exported tokenizer.json has them; the model's own chat template is kept in
the config but not used: a MyPT fine-tune speaks MyPT's template (mypt.finetune.template).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import numpy as np

from mypt.errors import MyPTError
from mypt.tokenizers.base import CHAT_TOKENS, Tokenizer, chat_format_of


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (how byte-level vocabularies spell bytes).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes get the characters
    from U+0100 on, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in chars)
    chars.update((b, chr(256 + i)) for i, b in enumerate(extra))
    return dict(sorted(chars.items()))


class HFBPETokenizer(Tokenizer):
    """A byte-level BPE tokenizer.json with its special tokens (see the module docstring)."""

    kind = "hf_bpe"

    def __init__(self, tokenizer: dict[str, Any], config: dict[str, Any], eot_id: int, bos_id: int | None,
                 source: str, chat_start: int | None = None) -> None:
        import tokenizers

        self.tokenizer, self.config, self.eot_id, self.bos_id = tokenizer, config, eot_id, bos_id
        self.chat_start, self.chat = chat_start, chat_start is not None
        try:
            self._tok = tokenizers.Tokenizer.from_str(json.dumps(tokenizer))
        except Exception as e:  # noqa: BLE001 - the library reports a bad file as a plain Exception
            raise MyPTError(f"{source}: the tokenizers library cannot read it ({str(e)[:160]})") from None
        self._tok.encode_special_tokens = True  # special-token strings in a text stay text
        self._bytes = self._id_bytes(source)
        self.n_vocab = len(self._bytes)
        if not 0 <= eot_id < self.n_vocab or not (bos_id is None or 0 <= bos_id < self.n_vocab):
            raise MyPTError(f"{source}: end-of-text id {eot_id} or begin-of-text id {bos_id} is not a token id")
        if self.chat and (chat_start < 0 or [self._bytes[i] for i in self.chat_ids.values() if i < self.n_vocab]
                          != [t.encode() for t in CHAT_TOKENS]):
            last = chat_start + len(CHAT_TOKENS) - 1
            raise MyPTError(f"{source}: its chat tokens are not at ids {chat_start}-{last}; the file is damaged, "
                            "restore it")

    @property
    def chat_ids(self) -> dict[str, int]:
        """MyPT's chat tokens, added after every other id (with_chat); empty before."""
        if self.chat_start is None:
            return {}
        return {token: self.chat_start + i for i, token in enumerate(CHAT_TOKENS)}

    @property
    def sampled_vocab(self) -> int:
        return self.n_vocab  # the model's own special tokens are in its vocabulary: nothing to hold back

    def with_chat(self) -> HFBPETokenizer:
        """This tokenizer with MyPT's chat tokens as added special tokens after its last id."""
        if self.chat:
            return self
        start = self.n_vocab
        added = [{"id": start + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True} for i, t in enumerate(CHAT_TOKENS)]
        tokenizer = {**self.tokenizer, "added_tokens": [*self.tokenizer.get("added_tokens", []), *added]}
        return HFBPETokenizer(tokenizer, self.config, self.eot_id, self.bos_id, "the imported tokenizer", start)

    def _id_bytes(self, source: str) -> list[bytes]:
        """The bytes of every id: a vocabulary token's from GPT-2's byte spelling, an added token's UTF-8."""
        unspell = {c: b for b, c in bytes_to_unicode().items()}
        vocab = self._tok.get_vocab(with_added_tokens=False)
        added = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
        table: list[bytes | None] = [None] * (max([*vocab.values(), *added.values()]) + 1)
        try:
            for text, i in vocab.items():
                table[i] = bytes(unspell[c] for c in text)
        except KeyError:
            raise MyPTError(f"{source}: its vocabulary is not byte-level (a token has a character outside "
                            "GPT-2's byte map); MyPT reads byte-level BPE tokenizers") from None
        for text, i in added.items():
            table[i] = text.encode("utf-8")
        holes = [i for i, b in enumerate(table) if b is None]
        if holes:
            raise MyPTError(f"{source}: the ids of its vocabulary are not 0, 1, 2, ... (ids {holes[:5]} have no token)")
        return table  # type: ignore[return-value]

    @property
    def prompt_prefix(self) -> list[int]:
        """The ids transformers puts before a text (its post-processor's, e.g. Llama 3's <|begin_of_text|>)."""
        with_specials = self._tok.encode("a", add_special_tokens=True).ids
        return with_specials[:with_specials.index(self._tok.encode("a", add_special_tokens=False).ids[0])]

    @property
    def chat_template(self) -> str | None:
        template = self.config.get("chat_template")
        return template if isinstance(template, str) else None

    def encode(self, text: str, what: str = "prompt") -> list[int]:
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # an unpaired surrogate: raise what every other kind raises
            text.encode("utf-8")
            raise

    def encode_array(self, text: str, what: str = "prompt") -> np.ndarray:
        return np.asarray(self.encode(text, what), dtype=np.uint32)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self._bytes[int(i)] for i in ids)

    def start_ids(self) -> list[int]:
        return [self.eot_id if self.bos_id is None else self.bos_id]

    def to_json(self) -> dict:
        chat = {} if self.chat_start is None else {"chat_start": self.chat_start}
        return {"kind": self.kind, "tokenizer": self.tokenizer, "config": self.config, "eot_id": self.eot_id,
                "bos_id": self.bos_id, **chat, **self._json_extra()}

    def id_string(self) -> str:
        content = json.dumps([self.tokenizer, self.eot_id], sort_keys=True).encode()
        return f"hf_bpe-{hashlib.sha256(content).hexdigest()[:16]}"


def hf_bpe_from_json(d: dict, source: str) -> HFBPETokenizer:
    """The tokenizer to_json described; `source` names the file in errors."""
    tokenizer, config, eot, bos = d.get("tokenizer"), d.get("config"), d.get("eot_id"), d.get("bos_id")
    chat = d.get("chat_start")
    if not isinstance(tokenizer, dict) or not isinstance(config, dict) or not isinstance(eot, int) or \
            not (bos is None or isinstance(bos, int)) or not (chat is None or type(chat) is int):
        raise MyPTError(f"{source}: an hf_bpe tokenizer needs \"tokenizer\" and \"config\" objects and an integer "
                        "\"eot_id\"; this file is damaged: import the model again")
    return chat_format_of(d, HFBPETokenizer(tokenizer, config, eot, bos, source, chat), source)
