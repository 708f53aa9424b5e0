"""Sampling: turning a GPT's next-token logits into tokens and text, one token at a time.

Owns the sampling settings (`SamplingConfig`), the logits processing (repetition penalty,
temperature, top-k, top-p), the context-window policy that the cached and the uncached decoders
share, and the streams built on them: `generate_ids` (token ids) and `TextStream` (text pieces
that never split a UTF-8 character and stop at a stop string). No I/O: nothing here prints or
reads files; `mypt.api` and the CLI do that.

The context window depends on the model's positions. With learned absolute positions a KV
cache cannot slide one token at a time: whenever the context would exceed block_size it jumps
forward to keep the last block_size // 2 tokens, and the cache is refilled from them. A rotary
model slides one token at a time instead: each token attends to the block_size tokens ending at
itself, the cache overwrites its oldest entry (`mypt.model.KVCache`), nothing is refilled. The
uncached decoder computes the very same function (the same windows; for a rotary model the
model's sliding-window forward over as many tokens as can reach the next one), so both give the
same tokens.

torch is imported by the functions that run the model, so the CLI can build its --help from
SamplingConfig without loading torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mypt.errors import MyPTError
from mypt.tokenizers import StreamDecoder, Tokenizer

if TYPE_CHECKING:
    import torch

    from mypt.model import GPT, KVCache

AmpFactory = Callable[[], contextlib.AbstractContextManager]


@dataclass(frozen=True)
class SamplingConfig:
    """How to continue a prompt. temperature 0 is greedy; top_k 0 and top_p 1 switch those off."""

    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 200
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: a fresh random seed each call
    stop: tuple[str, ...] = ()
    use_cache: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        problems = _problems(self)
        if problems:
            raise MyPTError("sampling settings: " + "; ".join(problems))

    @classmethod
    def from_options(cls, options: dict) -> SamplingConfig:
        """A config from keyword options; an unknown option is named with the known ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise MyPTError(f"unknown sampling option(s) {', '.join(unknown)}; the options are {', '.join(known)}")
        return cls(**options)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _problems(cfg: SamplingConfig) -> list[str]:
    problems = []
    if not _is_int(cfg.max_new_tokens) or cfg.max_new_tokens < 0:
        problems.append(f"max_new_tokens ({cfg.max_new_tokens}) must be an integer, 0 or more")
    if not _is_number(cfg.temperature) or not 0 <= cfg.temperature < float("inf"):
        problems.append(f"temperature ({cfg.temperature}) must be 0 (greedy) or more")
    if not _is_int(cfg.top_k) or cfg.top_k < 0:
        problems.append(f"top_k ({cfg.top_k}) must be an integer, 0 (off) or more")
    if not _is_number(cfg.top_p) or not 0 < cfg.top_p <= 1:
        problems.append(f"top_p ({cfg.top_p}) must be above 0 and at most 1 (1: off)")
    if not _is_number(cfg.repetition_penalty) or not 0 < cfg.repetition_penalty < float("inf"):
        problems.append(f"repetition_penalty ({cfg.repetition_penalty}) must be above 0 (1: off)")
    if cfg.seed is not None and not _is_int(cfg.seed):
        problems.append(f"seed ({cfg.seed!r}) must be an integer")
    if not all(isinstance(s, str) and s for s in cfg.stop):
        problems.append(f"stop strings ({list(cfg.stop)!r}) must be non-empty text")
    return problems


def fresh_seed() -> int:
    """A random seed for runs without one (report it so the output can be repeated)."""
    return random.SystemRandom().randrange(2**31)


# ---------------------------------------------------------------------------------------------
# Logits -> token


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL repetition penalty: logits of tokens already seen shrink toward "less likely"."""
    scaled = (logits / penalty).where(logits > 0, logits * penalty)
    return scaled.where(seen, logits)


def pick_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> int:
    """The next token from 1-D logits (vocab,): argmax at temperature 0, else a filtered sample."""
    import torch

    if cfg.temperature == 0:
        return int(logits.argmax())
    # shifted to <= 0 and the temperature kept a representable positive number: however small it
    # is, the scores become 0 and -inf (greedy), never inf - inf or 0 / 0 (NaN)
    temperature = max(cfg.temperature, torch.finfo(logits.dtype).tiny)
    logits = (logits - logits.max()) / temperature
    if 0 < cfg.top_k < logits.numel():
        logits, ids = logits.topk(cfg.top_k)  # sorted, largest first
    elif cfg.top_p < 1:
        logits, ids = logits.sort(descending=True)
    else:
        ids = None
    probs = logits.softmax(dim=-1)
    if cfg.top_p < 1:
        # keep the smallest prefix of the sorted tokens whose mass reaches top_p
        before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(before >= cfg.top_p, 0.0)
    choice = probs.multinomial(1, generator=generator)
    return int(ids[choice] if ids is not None else choice)


# ---------------------------------------------------------------------------------------------
# Context window and decoding


def window_start(length: int, start: int, block_size: int) -> int:
    """Where the context of the next token begins, for a sequence of `length` tokens.

    The context is tokens[start:]. When it would exceed block_size it jumps forward to keep the
    last block_size // 2 tokens (at least one).
    """
    if length - start <= block_size:
        return start
    return length - max(1, block_size // 2)


class _CachedDecoder:
    """Next-token logits with a KV cache: one position per step, a refill when the window jumps."""

    def __init__(self, model: GPT, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.cache: KVCache | None = None
        self.start = -1

    def __call__(self, seq: list[int], start: int) -> torch.Tensor:
        if self.cache is None:
            self.cache = self.model.new_cache(1, self.device, self.model.lm_head.weight.dtype)
        if start != self.start:
            self.cache.reset()
            self.start = start
            new = seq[start:]
        else:
            assert int(self.cache.pos[0]) == len(seq) - start - 1, "cache out of step with the sequence"
            new = seq[-1:]
        return self.model.next_logits(_batch(new, self.device), self.cache)


def _uncached_decoder(model: GPT, device: torch.device) -> Callable[[list[int], int], torch.Tensor]:
    """Next-token logits by running the whole window every step (the reference for the cache).

    For a rotary model the window is every token that can reach the next one through the
    layers' sliding windows: n_layer * (block_size - 1) + 1 tokens, at their own positions.
    """
    cfg = model.config
    reach = cfg.n_layer * (cfg.block_size - 1) + 1

    def step(seq: list[int], start: int) -> torch.Tensor:
        if cfg.position != "rope":  # a learned-position window starts again at position 0
            return model.next_logits(_batch(seq[start:], device))
        start = max(start, len(seq) - reach)
        return model.next_logits(_batch(seq[start:], device), start=start)

    return step


def _batch(ids: list[int], device: torch.device) -> torch.Tensor:
    import torch

    return torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)


def generate_ids(
    model: GPT,
    prompt_ids: Sequence[int],
    cfg: SamplingConfig,
    *,
    vocab_size: int,
    seed: int,
    amp: AmpFactory = contextlib.nullcontext,
) -> Iterator[int]:
    """Yield up to cfg.max_new_tokens new token ids after prompt_ids (of which the last
    block_size are used).

    vocab_size is the tokenizer's: padded ids beyond it are never produced. `amp` makes the
    context (autocast) each forward step runs in; it is entered per step, never across a yield.
    """
    import torch

    block_size = model.config.block_size
    if not prompt_ids:
        raise MyPTError("generation needs at least one prompt token (an empty prompt uses the start token)")
    seq = list(prompt_ids[-block_size:])
    device = model.lm_head.weight.device
    generator = torch.Generator(device).manual_seed(seed)
    decode = _CachedDecoder(model, device) if cfg.use_cache else _uncached_decoder(model, device)
    seen = None
    if cfg.repetition_penalty != 1:
        seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        seen[torch.tensor(seq, device=device)] = True
    start = 0
    slides = model.config.position == "rope"  # one token at a time: the window never jumps
    for _ in range(cfg.max_new_tokens):
        if not slides:
            start = window_start(len(seq), start, block_size)
        with torch.inference_mode(), amp():
            logits = decode(seq, start)[0, :vocab_size].float()
            if seen is not None:
                logits = penalize(logits, seen, cfg.repetition_penalty)
            token = pick_token(logits, cfg, generator)
        if seen is not None:
            seen[token] = True
        seq.append(token)
        yield token


# ---------------------------------------------------------------------------------------------
# Text


class StopFilter:
    """Passes text through until a stop string appears; holds back what may begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to show, whether a stop string was reached). After a stop, drop the rest."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = self._held_back()
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def _held_back(self) -> int:
        """Length of the longest end of pending text that starts some stop string."""
        for n in range(min(len(self.pending), max((len(s) for s in self.stops), default=0)), 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextStream:
    """The text of one continuation, piece by piece; counts tokens and seconds as it goes.

        stream = TextStream(ids, tokenizer, stop=("\\n\\n",), seed=1)
        for piece in stream:
            print(piece, end="", flush=True)
        stream.tokens_per_second
    """

    def __init__(self, ids: Iterator[int], tokenizer: Tokenizer, stop: Sequence[str], seed: int) -> None:
        self.seed = seed
        self.n_tokens = 0
        self.seconds = 0.0
        self.stopped = False  # True when a stop string ended the text
        self._pieces = self._run(ids, StreamDecoder(tokenizer), StopFilter(stop))

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else 0.0

    def text(self) -> str:
        """The rest of the stream as one string."""
        return "".join(self)

    def _run(self, ids: Iterator[int], decoder: StreamDecoder, stops: StopFilter) -> Iterator[str]:
        ids = iter(ids)
        while True:
            t0 = time.perf_counter()  # time spent by the consumer between pieces is not counted
            token = next(ids, None)
            if token is None:
                break
            self.seconds += time.perf_counter() - t0
            self.n_tokens += 1
            out, self.stopped = stops.feed(decoder.feed(token))
            if out:
                yield out
            if self.stopped:
                return
        out, self.stopped = stops.feed(decoder.flush())
        rest = out if self.stopped else out + stops.flush()
        if rest:
            yield rest
