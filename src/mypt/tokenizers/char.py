"""The "char" tokenizer: one id per character of the training text, in sorted order, then the
end-of-text id, then the chat tokens. A char tokenizer.json saved before end-of-text was reserved
has no "special_tokens" entry: it loads as it was, with no end-of-text id (eot_id None) and no
chat tokens. One that says `"eot": true` instead, as MyPT wrote it for a short while, has the
end-of-text id; one whose "special_tokens" is end-of-text alone has no chat tokens."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Sequence

import numpy as np

from mypt.errors import MyPTError
from mypt.tokenizers.base import CHAT_TOKENS, EOT, Tokenizer, chat_format_of, chat_in, special_tokens

_MAX_LISTED_CHARS = 10


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)


def sorted_unique(chars: Sequence[str]) -> bool:
    return all(a < b for a, b in itertools.pairwise(chars))


def _format_chars(chars: Sequence[str]) -> str:
    shown = ", ".join(repr(c) for c in chars[:_MAX_LISTED_CHARS])
    more = len(chars) - _MAX_LISTED_CHARS
    return shown + (f" and {more} more" if more > 0 else "")


class CharTokenizer(Tokenizer):
    """One id per character; ids are indices into the sorted list of the training characters.

    With `eot` (every new one) the id after the characters is end-of-text, and with `chat` (every
    new one) the chat tokens follow it. The model's vocab_size is n_vocab exactly, not padded: a
    character vocabulary is small.
    """

    kind = "char"

    def __init__(self, chars: Sequence[str], eot: bool = True, chat: bool | None = None) -> None:
        assert chars and all(len(c) == 1 for c in chars), "chars must be single characters"
        assert sorted_unique(chars), "chars must be sorted and unique"
        chat = eot if chat is None else chat
        assert eot or not chat, "the chat tokens follow end-of-text"
        self.chars = list(chars)
        self.chat = chat
        self.eot_id = len(self.chars) if eot else None
        specials = ([EOT] if eot else []) + (list(CHAT_TOKENS) if chat else [])
        self.n_vocab = len(self.chars) + len(specials)
        self._points = _code_points("".join(self.chars))
        self._texts = self.chars + specials

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        if not text:
            raise MyPTError("the char tokenizer needs a non-empty training text")
        return cls(sorted(set(text)))

    def encode(self, text: str, what: str = "prompt") -> list[int]:
        return self.encode_array(text, what).tolist()

    def encode_array(self, text: str, what: str = "prompt") -> np.ndarray:
        points = _code_points(text)
        n_chars = len(self.chars)
        ids = np.searchsorted(self._points, points)
        np.minimum(ids, n_chars - 1, out=ids)
        unknown = self._points[ids] != points
        if unknown.any():
            self._raise_unknown(text, unknown, what)
        return ids

    def _raise_unknown(self, text: str, unknown: np.ndarray, what: str) -> None:
        bad = sorted({text[i] for i in np.flatnonzero(unknown).tolist()})
        raise MyPTError(
            f"{what} contains characters not in this model's vocabulary: {_format_chars(bad)} "
            "(the char tokenizer only knows the characters of its training text)"
        )

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8", errors="surrogatepass")

    def decode(self, ids: Iterable[int]) -> str:
        texts = self._texts
        return "".join(texts[int(i)] for i in ids)

    def start_ids(self) -> list[int]:
        points = self._points
        newline = int(np.searchsorted(points, ord("\n")))
        found = newline < len(points) and int(points[newline]) == ord("\n")
        return [newline] if found else [0]

    def with_chat(self) -> CharTokenizer:
        return self if self.chat else CharTokenizer(self.chars)

    def to_json(self) -> dict:
        d: dict = {"kind": "char", "chars": list(self.chars)}
        if self.eot_id is not None:
            d["special_tokens"] = special_tokens(self.eot_id, self.chat)
        return {**d, **self._json_extra()}

    def id_string(self) -> str:
        text = "".join(self.chars) + "".join("\0" + t for t in self._texts[len(self.chars):])
        digest = hashlib.sha256(text.encode("utf-8", errors="surrogatepass"))
        return "char-" + digest.hexdigest()[:12]

    def model_vocab_size(self) -> int:
        return self.n_vocab


def char_from_json(d: dict, source: str) -> CharTokenizer:
    """The char tokenizer of a tokenizer.json dict; MyPTError naming `source` if it is damaged."""
    chars = d.get("chars")
    ok = (
        isinstance(chars, list)
        and len(chars) > 0
        and all(isinstance(c, str) and len(c) == 1 for c in chars)
        and sorted_unique(chars)
    )
    if not ok:
        raise MyPTError(
            f"{source}: the char tokenizer's 'chars' must be a non-empty, sorted list of distinct "
            "single characters; the file is damaged, restore or re-create it"
        )
    special = d.get("special_tokens")
    chat = special is not None and chat_in(special, len(chars), source,
                                           "the file is damaged, restore or re-create it")
    interim = d.get("eot") is True  # see the module docstring
    return chat_format_of(d, CharTokenizer(chars, eot=special is not None or interim, chat=chat), source)
