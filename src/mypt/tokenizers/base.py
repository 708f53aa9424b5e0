"""What every tokenizer offers (the `Tokenizer` interface) and StreamDecoder, which prints
generated tokens as they arrive without ever splitting a UTF-8 character.

Every kind reserves an end-of-text token, `Tokenizer.eot_id`, spelled EOT when decoded, and
right after it the four chat tokens CHAT_TOKENS (a start marker per role and an end-of-turn,
`Tokenizer.chat_ids`). None of them is ever produced from ordinary text: a user's text
containing the literal string EOT or `<|user|>` is tokenized as the characters it is made of.
A tokenizer saved before the chat tokens were reserved loads without them (`chat` False);
`with_chat()` adds them (fine-tuning grows such a model's embedding). `chat_format` names the
chat template a model was fine-tuned with (mypt.finetune.template), None for a base model.
"""

from __future__ import annotations

import abc
import codecs
import json
import re
from collections.abc import Iterable

import numpy as np

from mypt.errors import MyPTError

EOT = "<|endoftext|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end|>"
CHAT_TOKENS = (*ROLE_TOKENS.values(), END_OF_TURN)  # their ids follow end-of-text's, in this order
VOCAB_MULTIPLE = 64  # model vocabularies are padded up to a multiple of this for fast matmuls

# Where a long text may be cut so that tokenizing the pieces one by one gives the ids of the
# whole: just before a whitespace character that follows a letter or digit. Neither GPT-2's
# split pattern nor bpe's joins a letter or digit with the whitespace after it, and the text
# from the whitespace on splits exactly as in the whole text (no lookbehind). After punctuation
# it is not safe for bpe ("!\n" is one piece), nor after whitespace ("a  \nB" splits as "a",
# "  ", "\n", "B" whole, but "a  \n" alone ends in one "  \n" piece). Cuts before a newline
# are preferred.
NEWLINE_CUT = re.compile(r"[^\W_]\n")
WHITESPACE_CUT = re.compile(r"[^\W_][ \t\r\n]")


def padded_vocab(n_vocab: int) -> int:
    """n_vocab rounded up to a multiple of VOCAB_MULTIPLE."""
    return -(-n_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def special_tokens(eot_id: int, chat: bool) -> dict[str, int]:
    """tokenizer.json's "special_tokens": end-of-text, then (chat) the chat tokens after it."""
    chat_ids = {token: eot_id + 1 + i for i, token in enumerate(CHAT_TOKENS)} if chat else {}
    return {EOT: eot_id, **chat_ids}


def chat_in(special: object, eot_id: int, source: str, damaged: str) -> bool:
    """Whether a saved "special_tokens" has the chat tokens: it must be end-of-text alone (saved
    before they were reserved) or with them; anything else is a damaged file."""
    for chat in (False, True):
        if special == special_tokens(eot_id, chat):
            return chat
    raise MyPTError(f"{source}: 'special_tokens' must be {json.dumps(special_tokens(eot_id, True))} (end-of-text, "
                    f"then the chat tokens; older files: end-of-text alone); {damaged}")


def chat_format_of(d: dict, tok: Tokenizer, source: str) -> Tokenizer:
    """tok with the "chat_format" a tokenizer.json records (the MyPT chat template a fine-tuned model
    was trained with)."""
    name = d.get("chat_format")
    if name is not None and (not isinstance(name, str) or not tok.chat):
        raise MyPTError(f"{source}: 'chat_format' must be the name of a chat template, and the tokenizer must "
                        "have the chat tokens; the file is damaged, restore it")
    tok.chat_format = name
    return tok


class Tokenizer(abc.ABC):
    """What every tokenizer offers. `what` in encode names the text in error messages.

    eot_id is the end-of-text id; None only for char tokenizers saved before it was reserved
    (their models have no row for it). chat: the chat tokens follow it (see the module docstring).
    """

    kind: str
    n_vocab: int
    eot_id: int | None
    chat: bool = False
    chat_format: str | None = None  # MyPT's chat template (its name) a fine-tune was trained with

    @property
    def chat_ids(self) -> dict[str, int]:
        """The id of each chat token (CHAT_TOKENS); empty for a tokenizer saved before they existed."""
        if not self.chat:
            return {}
        return {token: i for token, i in special_tokens(self.eot_id, True).items() if token != EOT}

    @property
    def sampled_vocab(self) -> int:
        """How many ids generation may produce (ids 0 .. this - 1): every id for a chat model; a base
        model stops at end-of-text, since it never saw the chat tokens in its text."""
        return self.eot_id + 1 if self.chat and self.chat_format is None else self.n_vocab

    def with_chat(self) -> Tokenizer:
        """This tokenizer with the chat tokens (itself if it has them): the same ids for text.
        gpt2, char and bpe add them after end-of-text; an imported model's own tokenizer (hf_bpe)
        after its last id."""
        if self.chat:
            return self
        raise MyPTError(f"a {self.kind} tokenizer has no room for MyPT's chat tokens: fine-tuning it into a MyPT "
                        "chat model is not supported")

    def _json_extra(self) -> dict:
        return {} if self.chat_format is None else {"chat_format": self.chat_format}

    @abc.abstractmethod
    def encode(self, text: str, what: str = "prompt") -> list[int]:
        """Token ids of `text` (special-token strings are ordinary text)."""

    @abc.abstractmethod
    def encode_array(self, text: str, what: str = "prompt") -> np.ndarray:
        """encode() as a numpy integer array, without a Python list in between (large texts)."""

    @abc.abstractmethod
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw UTF-8 bytes of `ids` (may end inside a multibyte character)."""

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @abc.abstractmethod
    def start_ids(self) -> list[int]:
        """The ids an empty prompt starts from."""

    @abc.abstractmethod
    def to_json(self) -> dict:
        """A JSON-serialisable dict that tokenizer_from_json() turns back into this tokenizer."""

    @abc.abstractmethod
    def id_string(self) -> str:
        """A short stable key (safe in file names) that changes whenever the ids would."""

    def model_vocab_size(self) -> int:
        """The vocab_size of a new model for this tokenizer: n_vocab padded to a multiple of 64."""
        return padded_vocab(self.n_vocab)


class StreamDecoder:
    """Turns generated ids into text piece by piece, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """The text that `token_id` completes ("" while a character is still incomplete)."""
        return self._decoder.decode(self._tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        """Whatever is held back (an incomplete character becomes U+FFFD); resets the decoder."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text
