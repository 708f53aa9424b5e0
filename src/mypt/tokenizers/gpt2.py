"""The "gpt2" tokenizer: GPT-2's byte-level BPE through tiktoken, built offline from the ranks
file shipped in mypt/assets (checked against its sha256), never from the network."""

from __future__ import annotations

import base64
import functools
from collections.abc import Iterable

import numpy as np
import tiktoken

from mypt.fsutil import read_shipped
from mypt.tokenizers.base import EOT, Tokenizer, chat_format_of, chat_in, special_tokens

GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = EOT
GPT2_EOT_ID = 50256


def _gpt2_ranks_bytes() -> bytes:
    return read_shipped("gpt2.tiktoken", GPT2_SHA256)


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    """Parse tiktoken's "<base64 token> <rank>" lines (same format load_tiktoken_bpe reads)."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.cache
def gpt2_encoding(chat: bool = False) -> tiktoken.Encoding:
    """The GPT-2 tiktoken Encoding, built from the verified shipped file (never the network);
    with `chat`, the chat tokens are its special tokens 50257-50260 after end-of-text.

    The ranks are parsed from the bytes whose sha256 was just checked, rather than through
    tiktoken.load.load_tiktoken_bpe, which reads and writes a shared cache in the temp dir.
    """
    return tiktoken.Encoding(
        name="gpt2-chat" if chat else "gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=_parse_ranks(_gpt2_ranks_bytes()),
        special_tokens=special_tokens(GPT2_EOT_ID, chat),
    )


class TiktokenTokenizer(Tokenizer):
    """A tokenizer whose ids come from a tiktoken Encoding (gpt2 and bpe).

    Special-token strings in the text are ordinary text. encode_array lets tiktoken write
    straight into numpy and release the GIL for the whole call, so threads tokenize side by side.
    """

    _enc: tiktoken.Encoding

    @property
    def tiktoken_encoding(self) -> tiktoken.Encoding:
        """The tiktoken Encoding underneath (the data module encodes whole batches of documents with it)."""
        return self._enc

    def encode(self, text: str, what: str = "prompt") -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_array(self, text: str, what: str = "prompt") -> np.ndarray:
        # no special tokens allowed and none disallowed: the same ids as encode_ordinary
        return self._enc.encode_to_numpy(text, disallowed_special=())

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self._enc.decode_bytes([int(i) for i in ids])


class GPT2Tokenizer(TiktokenTokenizer):
    """GPT-2 byte-level BPE (50257 ids, id 50256 is <|endoftext|>), then the chat tokens
    (50257-50260; chat=False: a tokenizer.json saved before them, or an imported GPT-2's)."""

    kind = "gpt2"
    eot_id = GPT2_EOT_ID

    def __init__(self, chat: bool = True) -> None:
        self.chat = chat
        self._enc = gpt2_encoding(chat)
        self.n_vocab = self._enc.n_vocab

    def start_ids(self) -> list[int]:
        return [GPT2_EOT_ID]

    def with_chat(self) -> GPT2Tokenizer:
        return self if self.chat else GPT2Tokenizer()

    def to_json(self) -> dict:
        special = {"special_tokens": special_tokens(GPT2_EOT_ID, True)} if self.chat else {}
        return {"kind": "gpt2", **special, **self._json_extra()}

    def id_string(self) -> str:
        return "gpt2"  # the chat tokens change no id of any text: one token cache for both


def gpt2_from_json(d: dict, source: str) -> GPT2Tokenizer:
    special = d.get("special_tokens", special_tokens(GPT2_EOT_ID, False))
    tok = GPT2Tokenizer(chat_in(special, GPT2_EOT_ID, source, "the file is damaged, restore it"))
    return chat_format_of(d, tok, source)
