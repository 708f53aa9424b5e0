"""What several commands print the same way: notes on stderr, a prompt and its continuation,
the parts of a model's report (its size, its tokenizer) and the exit status after Ctrl-C."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from mypt.api import LoadedModel
    from mypt.sampling import TextStream
    from mypt.tokenizers import Tokenizer

INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def write_sample(stream: TextStream, prompt: str, out: TextIO, live: bool) -> None:
    """Print prompt and continuation; live: piece by piece as they are generated. Interrupted
    (Ctrl-C), what was generated so far is printed all the same."""
    out.write(prompt)
    out.flush()
    pieces: list[str] = []
    try:
        for piece in stream:
            if live:
                out.write(piece)
                out.flush()
            else:
                pieces.append(piece)
    finally:
        out.write("".join(pieces) + "\n")
        out.flush()


def used_prompt(lm: LoadedModel, prompt: str, what: str) -> str:
    """The part of prompt the model sees (its last block_size tokens), with a note when that is not all."""
    ids, block = lm.encode_prompt(prompt, what), lm.config.block_size
    if len(ids) <= block or not prompt:
        return prompt
    note(f"note: the {what} is {len(ids)} tokens long; '{lm.name}' sees at most {block}, "
         f"so only its last {block} tokens are used (and shown)")
    return lm.tokenizer.decode(ids[-block:])


def format_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def tokenizer_summary(tok: Tokenizer) -> str:
    """One line: kind, size, end-of-text and chat ids, a fine-tune's chat template and cache key
    (mypt tokenizer inspect and mypt inspect)."""
    eot = "no end-of-text id (saved by an older MyPT)" if tok.eot_id is None else f"end-of-text {tok.eot_id}"
    chat = f", chat tokens {min(tok.chat_ids.values())}-{max(tok.chat_ids.values())}" if tok.chat else ""
    template = f", chat template {tok.chat_format}" if tok.chat_format else ""
    return f"{tok.kind}, {tok.n_vocab:,} tokens ({eot}{chat}{template}; {tok.id_string()})"
