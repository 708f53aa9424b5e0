"""Token logprobs (mypt.sampling.TokenLogprob) in OpenAI's shapes, one choice at a time.

Completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"}, a list each: the
token's text; its logprob (null for the first token of an echoed prompt, which nothing
predicts); {text: logprob} of the requested alternatives plus the token itself (so up to
logprobs + 1 entries, as OpenAI's); and where the token's text begins in the choice's text.
Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}.

A token's text is its bytes decoded as UTF-8; a token holding only part of a character is
written "bytes:\\xe2\\x80" as OpenAI does, and text_offset counts the characters completed before
it. Every token the model produced is listed, the one that ended the text (end-of-text,
end-of-turn, the last of a stop string) included, so an echoed prompt of P tokens with
max_tokens 1 always has P + 1 entries.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Any

from mypt.sampling import TokenLogprob
from mypt.tokenizers import Tokenizer


class ChoiceLogprobs:
    """Formats one choice's TokenLogprobs, piece by piece (a stream) or at once, keeping the
    text offset running across pieces."""

    def __init__(self, tokenizer: Tokenizer, chat: bool) -> None:
        self.tokenizer, self.chat = tokenizer, chat
        self.offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def restart(self, offset: int) -> None:
        """The next token's text begins at `offset` (the new text, after an echoed prompt)."""
        self.offset = offset
        self._decoder.reset()

    def text(self, token: int) -> str:
        data = self.tokenizer.decode_bytes([token])
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)

    def format(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        return self._chat(entries) if self.chat else self._completion(entries)

    def _completion(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            out["tokens"].append(self.text(e.token))
            out["token_logprobs"].append(e.logprob)
            out["text_offset"].append(self.offset)
            self.offset += len(self._decoder.decode(self.tokenizer.decode_bytes([e.token])))
            if e.logprob is None:
                out["top_logprobs"].append(None)
                continue
            top: dict[str, float] = {}
            for token, logprob in e.top:
                top.setdefault(self.text(token), logprob)
            top.setdefault(self.text(e.token), e.logprob)
            out["top_logprobs"].append(top)
        return out

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        return {"token": self.text(token), "logprob": logprob, "bytes": list(self.tokenizer.decode_bytes([token]))}

    def _chat(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        return {"content": [{**self._entry(e.token, e.logprob), "top_logprobs": [self._entry(t, lp) for t, lp in e.top]}
                            for e in entries]}


def joined(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two formatted pieces of one choice as one (each list continued)."""
    return {key: first[key] + second[key] for key in first}
