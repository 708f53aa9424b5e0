"""MyPT's chat template: a conversation as token ids, which of them are trained on, and the same
template as a Jinja string that transformers renders to exactly those ids.

Template "mypt-chat-1": each message is its role's start token, its content tokenized as
ordinary text, and the end-of-turn token; nothing between them (no newline, no space):

    <|system|>Be brief.<|end|><|user|>Who speaks?<|end|><|assistant|>ROMEO<|end|>

A reply is generated after `<|assistant|>` and ends at `<|end|>` (or at a role's token). The special tokens are ids
of the tokenizer (`Tokenizer.chat_ids`), never text: a message containing the string
"<|end|>" is that string's characters. Trained on: the content of each assistant message and
the `<|end|>` closing it; the system and user messages and every role token are context only.

A fine-tuned model's tokenizer.json names its template ("chat_format"); generation, the
server and `mypt export --format hf` look it up here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mypt.errors import MyPTError
from mypt.tokenizers import END_OF_TURN, ROLE_TOKENS, Tokenizer

TEMPLATE = "mypt-chat-1"
ROLES = tuple(ROLE_TOKENS)  # system, user, assistant
# transformers' apply_chat_template renders this to the text of the ids below (the special
# tokens as added tokens), then tokenizes it: the same ids as `encode` for any content.
JINJA = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class Turn:
    """One message as ids; `trained`: an assistant message (its ids after the role token are targets)."""

    ids: list[int]
    trained: bool


def check_template(tok: Tokenizer, where: str) -> None:
    """tok must carry a template this MyPT renders (a fine-tuned model's)."""
    if tok.chat_format is None:
        raise MyPTError(f"{where} has no chat template: it was not fine-tuned for chat (mypt finetune makes one)")
    if tok.chat_format != TEMPLATE:
        raise MyPTError(f"{where}: chat template {tok.chat_format!r} is not one this MyPT knows ({TEMPLATE}); "
                        "upgrade MyPT")


def turn(tok: Tokenizer, message: Message, what: str = "message") -> Turn:
    """One message: its role token, its content, the end-of-turn token."""
    ids = tok.chat_ids
    body = tok.encode(message.content, what) if message.content else []
    return Turn([ids[ROLE_TOKENS[message.role]], *body, ids[END_OF_TURN]], message.role == "assistant")


def turns(tok: Tokenizer, messages: Sequence[Message], what: str = "message") -> list[Turn]:
    return [turn(tok, m, what) for m in messages]


def trained_mask(parts: Sequence[Turn]) -> np.ndarray:
    """Per token of the joined turns: True where it is a target the loss counts (an assistant
    message's content and its end-of-turn, not its role token)."""
    mask = np.zeros(sum(len(t.ids) for t in parts), dtype=bool)
    at = 0
    for t in parts:
        if t.trained:
            mask[at + 1:at + len(t.ids)] = True
        at += len(t.ids)
    return mask


def encode(tok: Tokenizer, messages: Sequence[Message]) -> tuple[list[int], np.ndarray]:
    """(ids, trained mask) of a whole conversation."""
    parts = turns(tok, messages)
    return [i for t in parts for i in t.ids], trained_mask(parts)


def prompt_ids(tok: Tokenizer, messages: Sequence[Message], what: str = "message") -> list[int]:
    """The ids a reply is generated after: the messages, then the assistant's start token."""
    return [i for t in turns(tok, messages, what) for i in t.ids] + [tok.chat_ids[ROLE_TOKENS["assistant"]]]


def stop_ids(tok: Tokenizer) -> tuple[int, ...]:
    """The ids that end a reply besides end-of-text (which ends any text): end-of-turn, and a role's
    start token (a model that opens another message has ended its own)."""
    return tuple(tok.chat_ids.values())


def fit_history(tok: Tokenizer, messages: Sequence[Message], budget: int) -> tuple[list[Message], list[int]]:
    """The conversation whose prompt fits in `budget` tokens: the leading system messages and the
    latest exchanges (the oldest user/assistant messages dropped first, at least the last message
    kept), and its prompt ids."""
    system = 0
    while system < len(messages) and messages[system].role == "system":
        system += 1
    lengths = [len(t.ids) for t in turns(tok, messages)]
    start = system
    while start < len(messages) - 1 and sum(lengths[:system]) + sum(lengths[start:]) + 1 > budget:
        start += 1
        while start < len(messages) - 1 and messages[start].role == "assistant":  # a reply without its question
            start += 1
    kept = [*messages[:system], *messages[start:]]
    return kept, prompt_ids(tok, kept)
