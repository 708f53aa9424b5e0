"""The "bpe" tokenizer: a byte-level BPE trained on the user's own text.

Training uses `rustbpe` (measured against Hugging Face `tokenizers` in bench/bench_tokenizer.py:
faster on 2 cores, and it yields tiktoken's mergeable ranks directly); encoding uses tiktoken,
so a bpe tokenizer encodes as fast as gpt2. Text is first split with SPLIT_PATTERN, a GPT-4
(cl100k)-style pattern, so no token crosses a word, number or whitespace boundary. Byte-level:
the 256 single bytes are tokens, so every text is encodable and there is no unknown token.

Ids: the mergeable ranks (0 .. n-6, the 256 bytes first) then end-of-text (n-5) and the four
chat tokens (n-4 .. n-1), so a vocabulary of N = a multiple of 64 fills the model's embedding
with no padding. A file saved before the chat tokens existed ends at end-of-text (n-1).

tokenizer.json holds the ranks (base64, in rank order), the split pattern, the special tokens
and the sha256 of that content; loading recomputes the hash, so an edited or corrupted file is
refused by name. id_string (the token cache key) comes from the same hash. A fine-tuned model's
"chat_format" name sits beside them, outside the hash (it changes no id).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence

import tiktoken

from mypt.errors import MyPTError
from mypt.tokenizers.base import CHAT_TOKENS, NEWLINE_CUT, chat_format_of, chat_in, special_tokens
from mypt.tokenizers.gpt2 import TiktokenTokenizer

# cl100k-style: contractions, letters (with one leading non-letter), numbers of up to 3 digits,
# punctuation runs (with the newlines after them), newlines, other whitespace runs.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
FORMAT_VERSION = 1
N_BYTES = 256
N_SPECIAL = 1 + len(CHAT_TOKENS)  # end-of-text and the chat tokens
MIN_VOCAB = N_BYTES + N_SPECIAL
MAX_VOCAB = 1 << 24
TRAIN_PIECE_CHARS = 1 << 16  # rustbpe counts pieces of about this size in parallel
TRAIN_BUFFER = 64  # pieces handed to rustbpe at a time: about 4M characters in memory
_DAMAGED = "the file is damaged or was edited; restore it or train the tokenizer again"


def bpe_parts(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
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


class BPETokenizer(TiktokenTokenizer):
    """Byte-level BPE from mergeable ranks (ranks[i] is the bytes of token i) and a split pattern."""

    kind = "bpe"

    def __init__(self, ranks: Sequence[bytes], pattern: str = SPLIT_PATTERN, chat: bool = True) -> None:
        self.ranks = list(ranks)
        self.pattern = pattern
        self.chat = chat
        self.eot_id = len(self.ranks)
        special = special_tokens(self.eot_id, chat)
        self.n_vocab = self.eot_id + len(special)
        self.sha256 = _content_sha256(_content(self.ranks, pattern, special))
        self._enc = tiktoken.Encoding(
            name=f"mypt-bpe-{self.sha256[:12]}",
            pat_str=pattern,
            mergeable_ranks={token: i for i, token in enumerate(self.ranks)},
            special_tokens=special,
        )

    def start_ids(self) -> list[int]:
        return [self.ranks.index(b"\n")]

    def with_chat(self) -> BPETokenizer:
        return self if self.chat else BPETokenizer(self.ranks, self.pattern)

    def to_json(self) -> dict:
        special = special_tokens(self.eot_id, self.chat)
        return {**_content(self.ranks, self.pattern, special), "sha256": self.sha256, **self._json_extra()}

    def id_string(self) -> str:
        return "bpe-" + self.sha256[:12]


def _content(ranks: Sequence[bytes], pattern: str, special: dict[str, int]) -> dict:
    return {
        "kind": "bpe",
        "version": FORMAT_VERSION,
        "pattern": pattern,
        "special_tokens": special,
        "ranks": [base64.b64encode(token).decode("ascii") for token in ranks],
    }


def _content_sha256(content: dict) -> str:
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Loading


def bpe_from_json(d: dict, source: str) -> BPETokenizer:
    """The bpe tokenizer of a tokenizer.json dict, after checking its hash and its structure."""
    content = {k: v for k, v in d.items() if k not in ("sha256", "chat_format")}
    if _content_sha256(content) != d.get("sha256"):
        raise MyPTError(f"{source}: its content does not match its sha256; {_DAMAGED}")
    if d.get("version") != FORMAT_VERSION:
        raise MyPTError(f"{source}: bpe tokenizer format version {d.get('version')!r} is not one this "
                        f"MyPT reads ({FORMAT_VERSION}); upgrade MyPT or train the tokenizer again")
    unknown = sorted(set(d) - {*_content([], "", {}), "sha256", "chat_format"})
    if unknown:
        raise MyPTError(f"{source}: unknown key '{unknown[0]}' in a bpe tokenizer file; {_DAMAGED}")
    ranks = _ranks_from_json(d.get("ranks"), source)
    pattern = d.get("pattern")
    if not isinstance(pattern, str) or not pattern:
        raise MyPTError(f"{source}: 'pattern' must be the split pattern (a regular expression); {_DAMAGED}")
    problem = pattern_problem(pattern)
    if problem:
        raise MyPTError(f"{source}: {problem}; {_DAMAGED}")
    chat = chat_in(d.get("special_tokens"), len(ranks), source, _DAMAGED)
    try:
        tok = BPETokenizer(ranks, pattern, chat)
    except ValueError as e:  # tiktoken refuses the pattern
        raise MyPTError(f"{source}: tiktoken cannot use its split pattern ({e}); {_DAMAGED}") from None
    return chat_format_of(d, tok, source)


# Texts a split pattern must cut into non-empty pieces that join back into the whole text: the
# kinds of character the pattern tells apart (letters, digits, punctuation, spaces, line ends,
# other scripts, emoji), alone and in a row.
PATTERN_PROBES = ("a", "1", "!", " ", "\n", "\t", "\r\n", "é", "日", "😀", "'s",
                  "Hello, world! It's 2024.\n\n  Tabs\tand   spaces \r\nnaïve 日本語 😀 x=y+1;  \n")


def pattern_problem(pattern: str) -> str | None:
    """Why tiktoken cannot split text with `pattern` (None: it can).

    It must compile, never match the empty string (tiktoken panics on an empty piece) and
    cover every character of a text (tiktoken silently drops what no piece matches).
    """
    import regex  # tiktoken's own dependency; it reads \p{L} and possessive quantifiers as tiktoken does

    try:
        compiled = regex.compile(pattern)
    except (regex.error, RecursionError, OverflowError) as e:
        return f"its split pattern is not a regular expression MyPT can use ({e})"
    for text in PATTERN_PROBES:
        try:
            pieces = [m.group() for m in compiled.finditer(text, timeout=1.0)]
        except TimeoutError:
            return f"its split pattern takes more than a second to split {text!r}"
        if "" in pieces:
            return f"its split pattern matches the empty string (in {text!r}), which tiktoken cannot split with"
        if "".join(pieces) != text:
            return f"its split pattern leaves characters of {text!r} out of every piece, so they would be lost"
    return None


def _ranks_from_json(ranks: object, source: str) -> list[bytes]:
    if not isinstance(ranks, list) or not all(isinstance(r, str) for r in ranks):
        raise MyPTError(f"{source}: 'ranks' must be a list of base64 strings; {_DAMAGED}")
    if not MIN_VOCAB - N_SPECIAL <= len(ranks) <= MAX_VOCAB - N_SPECIAL:
        raise MyPTError(f"{source}: 'ranks' holds {len(ranks):,} tokens; a bpe tokenizer has {MIN_VOCAB - N_SPECIAL} "
                        f"to {MAX_VOCAB - N_SPECIAL:,}; {_DAMAGED}")
    try:
        tokens = [base64.b64decode(r, validate=True) for r in ranks]
    except binascii.Error:
        raise MyPTError(f"{source}: 'ranks' holds a string that is not base64; {_DAMAGED}") from None
    problem = ranks_problem(tokens)
    if problem:
        raise MyPTError(f"{source}: {problem}; {_DAMAGED}")
    return tokens


def ranks_problem(tokens: Sequence[bytes]) -> str | None:
    """Why `tokens` are not byte-level BPE ranks (None: they are).

    Every single byte must be a token, no token may repeat, and BPE on each longer token's bytes
    with the lower-ranked merges must end in exactly two parts: the merge that made it.
    """
    ranks = {token: i for i, token in enumerate(tokens)}
    if len(ranks) != len(tokens) or b"" in ranks:
        return "'ranks' holds an empty or repeated token"
    missing = [b for b in range(N_BYTES) if bytes([b]) not in ranks]
    if missing:
        return f"'ranks' lacks {len(missing)} of the 256 single bytes (byte {missing[0]} first)"
    for i, token in enumerate(tokens):
        if len(token) > 1 and len(bpe_parts(token, ranks, i)) != 2:
            return f"token {i} ({token!r}) is not a merge of two lower-ranked tokens"
    return None


# ---------------------------------------------------------------------------------------------
# Training


def check_vocab_size(vocab_size: int, flag: str = "--vocab_size") -> None:
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise MyPTError(f"{flag} {vocab_size} is out of range for a bpe tokenizer: it needs at least "
                        f"{MIN_VOCAB} (the {N_BYTES} bytes, end-of-text and the chat tokens) and at most "
                        f"{MAX_VOCAB:,}; "
                        "a few thousand suits most texts (e.g. 4096)")


def train_bpe(texts: Iterable[str], vocab_size: int, source: str) -> BPETokenizer:
    """A bpe tokenizer of vocab_size ids (the end-of-text one included) trained on `texts`.

    `source` names the text in errors: an empty one, or one with fewer distinct pairs to merge
    than vocab_size asks for.
    """
    check_vocab_size(vocab_size)
    import rustbpe  # a core dependency; imported here so that commands that train none start faster
    n_chars = 0

    def counted() -> Iterator[str]:
        nonlocal n_chars
        for text in texts:
            n_chars += len(text)
            yield text

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(_small_pieces(counted()), vocab_size - N_SPECIAL, buffer_size=TRAIN_BUFFER,
                                pattern=SPLIT_PATTERN)
    if n_chars == 0:
        raise MyPTError(f"{source} is empty: there is no text to train a bpe tokenizer on")
    ranks = [bytes(token) for token, _ in sorted(trainer.get_mergeable_ranks(), key=lambda item: item[1])]
    if len(ranks) + N_SPECIAL < vocab_size:
        raise MyPTError(f"{source} is too short for a bpe tokenizer of {vocab_size} tokens: its {n_chars:,} "
                        f"characters support only {len(ranks) + N_SPECIAL} (no pair of tokens is left to "
                        f"merge); use --vocab_size {len(ranks) + N_SPECIAL} or less, or a longer text")
    return BPETokenizer(ranks)


def _small_pieces(texts: Iterable[str]) -> Iterator[str]:
    """texts cut into pieces of about TRAIN_PIECE_CHARS, where SPLIT_PATTERN would split anyway.

    rustbpe splits each piece with the pattern on its own, so pieces are cut only where that
    changes nothing (NEWLINE_CUT); a piece with no such place is passed whole.
    """
    for text in texts:
        start = 0
        while len(text) - start > TRAIN_PIECE_CHARS:
            found = NEWLINE_CUT.search(text, start + TRAIN_PIECE_CHARS)
            if found is None:
                break
            yield text[start:found.start() + 1]
            start = found.start() + 1
        yield text[start:]
