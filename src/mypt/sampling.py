"""Sampling: turning a GPT's next-token logits into tokens and text, one token at a time.

Owns the sampling settings (`SamplingConfig`) and the one table of their ranges (`BOUNDS`, which
the server checks requests against too), the logits processing (repetition penalty,
temperature, top-k, top-p), the context-window policy, and the one decoding step: a `Decoder`
steps any number of `Continuation`s of one model over a batched KV cache (one forward pass for
all of them, then each picks its token with its own generator, penalty state and stop strings;
a continuation whose logits are not finite fails alone, the others go on).
A continuation may also record its tokens' log-probabilities (`TokenLogprob`), and
`prompt_logprobs` scores a whole prompt in one forward pass: both are of the model's raw
distribution (log_softmax over all its logits, before the penalty, temperature, top-k and top-p),
as vLLM reports them by default and as transformers computes them on the exported model.
With prompt lookup (SamplingConfig.lookup, mypt.lookup) a continuation may take several
tokens in one step, the same tokens it would take one step at a time.
`generate_ids` (token ids) and `TextStream` (text pieces that never split a UTF-8 character and
stop at a stop string) run one continuation through it; `mypt.serve` runs many. No I/O: nothing
here prints or reads files; `mypt.api` and the CLI do that.

The context window depends on the model's positions. With learned absolute positions a KV
cache cannot slide one token at a time: whenever the context would exceed block_size it jumps
forward to keep the last block_size // 2 tokens, and the cache is refilled from them. A rotary
model slides one token at a time instead: each token attends to the block_size tokens ending at
itself, the cache overwrites its oldest entry (`mypt.kvcache.KVCache`), nothing is refilled. The
uncached decoder computes the very same function (the same windows; for a rotary model the
model's sliding-window forward over as many tokens as can reach the next one), so both give the
same tokens.

torch is imported by the functions that run the model, so the CLI can build its --help from
SamplingConfig without loading torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import math
import random
import reprlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mypt.errors import MyPTError
from mypt.lookup import MAX_LOOKUP, Lookup
from mypt.tokenizers import StreamDecoder, Tokenizer

if TYPE_CHECKING:
    import torch

    from mypt.kvcache import KVCache, PrefixCache
    from mypt.model import GPT

AmpFactory = Callable[[], contextlib.AbstractContextManager]


MAX_COUNT = 1_000_000_000  # the most new tokens, or top_k, anyone may ask for
MAX_STOP_CHARS = 1000  # the longest stop string (the text held back while one may begin is checked each token)


@dataclass(frozen=True)
class Bound:
    """The values a numeric sampling setting accepts: from low (above it if low_open) to high."""

    low: float
    high: float
    integer: bool = False
    low_open: bool = False
    note: str = ""

    def problem(self, value: object) -> str | None:
        """What is wrong with value, as 'must be ...'; None when it is fine."""
        ok = _is_int(value) or (not self.integer and _is_number(value) and math.isfinite(value))
        if ok and (self.low < value or (value == self.low and not self.low_open)) and value <= self.high:
            return None
        kind = "an integer" if self.integer else "a number"
        low = f"above {self.low} and at most" if self.low_open else f"from {self.low} to"
        return f"must be {kind} {low} {self.high}" + (f" ({self.note})" if self.note else "")


# The one table of ranges, used by SamplingConfig (generate.py, the Python API) and the server's
# request checks. Within them a finite row of logits stays finite through the penalty and the
# temperature (a penalty of 1e-38 would scale a logit of 4 past float32's largest, 3.4e38).
BOUNDS = {
    "max_new_tokens": Bound(0, MAX_COUNT, integer=True),
    "temperature": Bound(0, 100, note="0: greedy"),
    "top_k": Bound(0, MAX_COUNT, integer=True, note="0: off"),
    "top_p": Bound(0, 1, low_open=True, note="1: off"),
    "repetition_penalty": Bound(0.01, 100, note="1: off"),
    "seed": Bound(-(2**63), 2**63 - 1, integer=True),
    "lookup": Bound(0, MAX_LOOKUP, integer=True, note="0: off"),
}


class SamplingError(MyPTError):
    """Bad sampling settings: `problems` holds (field, value, what is wrong) for each."""

    def __init__(self, problems: list[tuple[str, object, str]]) -> None:
        self.problems = problems
        super().__init__("sampling settings: " + self.named(str))

    def named(self, name: Callable[[str], str]) -> str:
        """The problems in one line, each field called name(field) (a flag, a request field)."""
        return "; ".join(f"{name(field)} ({reprlib.repr(value)}) {what}" for field, value, what in self.problems)


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
    ignore_eot: bool = False  # keep going past the end-of-text token (by default it ends the text)
    stop_ids: tuple[int, ...] = ()  # tokens that end the text, unseen, like end-of-text (a chat reply's end-of-turn)
    lookup: int = 0  # prompt-lookup decoding: up to this many drafted tokens verified per step (mypt.lookup); 0: off

    def __post_init__(self) -> None:
        if isinstance(self.stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_ids, (list, tuple)):
            object.__setattr__(self, "stop_ids", tuple(self.stop_ids))
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.seed is None:
            del values["seed"]
        problems = setting_problems(values)
        if problems:
            raise SamplingError([(field, values[field], what) for field, what in problems])

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


def setting_problems(values: dict[str, object]) -> list[tuple[str, str]]:
    """(field, 'must be ...') for each bad sampling setting among `values` (fields of SamplingConfig)."""
    problems = []
    for field, value in values.items():
        if field in BOUNDS:
            what = BOUNDS[field].problem(value)
        elif field in ("use_cache", "ignore_eot"):
            what = None if isinstance(value, bool) else "must be true or false"
        elif field == "stop":
            what = _stop_problem(value)
        elif field == "stop_ids":
            ok = isinstance(value, tuple) and all(_is_int(i) and i >= 0 for i in value)
            what = None if ok else "must be token ids (integers, 0 or more)"
        else:
            continue
        if what is not None:
            problems.append((field, what))
    if values.get("lookup") and values.get("use_cache") is False:
        problems.append(("lookup", "needs the KV cache: leave the cache on (no --no-cache, no use_cache=false), "
                                   "or set lookup to 0"))
    return problems


def _stop_problem(stop: object) -> str | None:
    if not isinstance(stop, tuple) or not all(isinstance(s, str) and s for s in stop):
        return "must be a list of non-empty strings"
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        return f"must be at most {MAX_STOP_CHARS} characters each"
    return None


def fresh_seed() -> int:
    """A random seed for runs without one (report it so the output can be repeated)."""
    return random.SystemRandom().randrange(2**31)


# ---------------------------------------------------------------------------------------------
# Logits -> token


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """CTRL repetition penalty: logits of tokens already seen shrink toward "less likely".
    penalty: a number, or (n, 1) for n rows of logits."""
    scaled = (logits / penalty).where(logits > 0, logits * penalty)
    return scaled.where(seen, logits)


def pick_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> int:
    """The next token from 1-D logits (vocab,): argmax at temperature 0, else a filtered sample."""
    return int(pick_tokens(logits[None], [cfg], [generator])[0])


def pick_tokens(logits: torch.Tensor, cfgs: Sequence[SamplingConfig],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """The next token of each row of logits (n, vocab), row i with cfgs[i] and generators[i]:
    (n,) on the logits' device, without a device sync (but on a CPU, where a sync is free).

    Rows are processed together, grouped by the shape their sample is drawn from (the argmax, the
    top_k candidates, the nucleus for top_p, or the whole vocabulary), so a step costs a few tensor
    operations whatever the batch. A sampled row draws one uniform number from its own generator
    and takes the token at that point of its cumulative distribution (inverse transform
    sampling: exact, and one draw where drawing a noise per candidate costs a millisecond a row
    over a 50k vocabulary), so a row gets the token it would get alone. logits are not changed.
    """
    import torch

    out = torch.empty(logits.size(0), dtype=torch.long, device=logits.device)
    groups: dict[str, list[int]] = {}
    vocab = logits.size(1)
    for i, cfg in enumerate(cfgs):
        kind = ("greedy" if cfg.temperature == 0 else "top_k" if 0 < cfg.top_k < vocab
                else "nucleus" if cfg.top_p < 1 else "plain")
        groups.setdefault(kind, []).append(i)
    for kind, rows in groups.items():
        every = len(rows) == logits.size(0)
        index = slice(None) if every else torch.tensor(rows, device=logits.device)
        if kind == "greedy":  # (the argmax of every row costs less than copying some)
            out[index] = argmax_rows(logits)[index]
        else:  # the group's rows copied together (a slice of padded logits is slow to read)
            x = logits.contiguous() if every else logits.index_select(0, index)
            out[index] = _sample_rows(x, kind, [cfgs[i] for i in rows], [generators[i] for i in rows])
    return out


def argmax_rows(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """x.argmax(-1) of rows (n, vocab) without NaN (the first of equal maxima), found through each
    block of `block` values' maximum: torch's argmax over a 50k vocabulary is about 7x slower than
    its max (BENCHMARKS.md, Issue 23)."""
    import torch

    n, width = x.shape
    whole = width // block * block
    if whole < 4 * block:
        return x.argmax(-1)
    maxima = x[:, :whole].unflatten(1, (-1, block)).amax(-1)
    if whole < width:
        maxima = torch.cat([maxima, x[:, whole:].amax(-1, keepdim=True)], 1)
    cols = (maxima.argmax(-1, keepdim=True) * block + torch.arange(block, device=x.device)).clamp_(max=width - 1)
    return cols.gather(1, x.gather(1, cols).argmax(-1, keepdim=True))[:, 0]


def _sample_rows(x: torch.Tensor, kind: str, cfgs: list[SamplingConfig],
                 generators: list[torch.Generator | None]) -> torch.Tensor:
    """Sampled tokens (m,) for rows x (m, vocab) of one kind ("top_k", "nucleus" or "plain")."""
    import torch

    device = x.device
    # shifted to <= 0 and the temperature kept a representable positive number: however small it
    # is, the scores become 0 and -inf (greedy), never inf - inf or 0 / 0 (NaN)
    tiny = torch.finfo(x.dtype).tiny
    temperature = torch.tensor([[max(c.temperature, tiny)] for c in cfgs], dtype=x.dtype, device=device)
    top_p = None
    if any(c.top_p < 1 for c in cfgs):
        top_p = torch.tensor([[c.top_p if c.top_p < 1 else math.inf] for c in cfgs], dtype=x.dtype, device=device)
    ids = None  # the vocabulary ids of the candidates, when they are not all of it in order
    if kind == "top_k":  # the candidates first (the scores below keep their order): the rest is over k, not vocab
        lengths = [c.top_k for c in cfgs]
        x, ids = x.topk(max(lengths))  # sorted, largest first
        x = (x - x[:, :1]) / temperature
        if min(lengths) < x.size(1):  # rows of a smaller top_k: their extra candidates cannot be drawn
            beyond = torch.arange(x.size(1), device=device) >= torch.tensor(lengths, device=device)[:, None]
            x = x.masked_fill(beyond, float("-inf"))
        probs = x.softmax(dim=-1)
    else:
        probs = ((x - x.amax(-1, keepdim=True)) / temperature).softmax(dim=-1)
        if kind == "nucleus":
            probs, ids = _nucleus_candidates(probs, top_p)
    if ids is not None and top_p is not None:
        # keep the smallest prefix of the sorted tokens whose mass reaches top_p; the likeliest
        # always (a top_p below float32's smallest number would compare as 0 and keep none)
        dropped = probs.cumsum(-1) - probs >= top_p
        dropped[:, 0] = False
        probs = probs.masked_fill(dropped, 0.0)
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    uniform = torch.cat([torch.rand((1, 1), generator=g, device=device, dtype=cdf.dtype) for g in generators])
    # the first candidate whose cumulative mass passes u * total: never one of probability 0 (the
    # point is kept below the total, which float rounding of u * total could reach)
    point = torch.minimum(uniform * total, total.nextafter(torch.zeros_like(total)))
    choice = torch.searchsorted(cdf, point, right=True)
    return choice[:, 0] if ids is None else ids.gather(1, choice)[:, 0]


def _nucleus_candidates(probs: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The likeliest tokens of rows probs (m, vocab), sorted, largest first, with their ids: on a
    CPU as few as hold every row's top_p mass (a full sort of 50k values is 5 ms a row there);
    elsewhere all of them (a partial one would need a device sync)."""
    vocab = probs.size(1)
    k = min(vocab, 256) if probs.device.type == "cpu" else vocab
    while True:
        values, ids = probs.topk(k) if k < vocab else probs.sort(descending=True)
        if k == vocab or bool((values.cumsum(-1)[:, -1:] >= top_p).all()):
            return values, ids
        k = min(vocab, 8 * k)


# ---------------------------------------------------------------------------------------------
# Log-probabilities

MAX_TOP_LOGPROBS = 20  # the most alternatives per token anyone may ask for (as OpenAI)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model's raw distribution, and the `top` likeliest
    tokens as (id, logprob), likeliest first. logprob is None for a text's first token, which
    nothing predicts."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, top: int, vocab_size: int) -> list[TokenLogprob]:
    """TokenLogprob of tokens (n,) under the raw logits (n, model vocab): log_softmax over every
    row of the model's head; the `top` alternatives among the tokenizer's ids (below vocab_size)."""
    logprobs = logits.float().log_softmax(-1)
    chosen = logprobs.gather(-1, tokens[:, None])[:, 0].tolist()
    if top == 0:
        return [TokenLogprob(t, lp) for t, lp in zip(tokens.tolist(), chosen, strict=True)]
    values, ids = logprobs[:, :vocab_size].topk(min(top, vocab_size), dim=-1)
    return [TokenLogprob(t, lp, tuple(zip(i, v, strict=True)))
            for t, lp, i, v in zip(tokens.tolist(), chosen, ids.tolist(), values.tolist(), strict=True)]


def prompt_logprobs(model: GPT, ids: Sequence[int], top: int, vocab_size: int,
                    amp: AmpFactory = contextlib.nullcontext, chunk: int = 256) -> list[TokenLogprob]:
    """Each prompt token's TokenLogprob given the tokens before it, from one forward pass (the
    first token's logprob is None). A learned-position model takes at most block_size tokens; a
    rotary one more, each token seeing the block_size tokens ending at itself (as generation)."""
    import torch

    cfg = model.config
    if not ids:
        raise MyPTError("a prompt to score needs at least one token")
    if cfg.position != "rope" and len(ids) > cfg.block_size:
        raise MyPTError(f"{len(ids)} prompt tokens are more than this model scores at once (its block_size "
                        f"{cfg.block_size}; learned positions cannot slide)")
    device = model.lm_head.weight.device
    idx = torch.tensor([list(ids)], dtype=torch.long, device=device)
    out = [TokenLogprob(ids[0], None)]
    with torch.inference_mode(), amp():
        hidden = model.hidden_states(idx)[0, :-1]  # (T - 1, n_embd): position t predicts token t + 1
        for i in range(0, hidden.size(0), chunk):  # (chunk, vocab) logits at a time, not (T, vocab)
            out += logprobs_of(model.lm_head(hidden[i: i + chunk]), idx[0, i + 1: i + 1 + chunk], top, vocab_size)
    return out


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


class Continuation:
    """One prompt's continuation while a Decoder steps it: its tokens and context window, its own
    random generator and repetition-penalty state, and (given a tokenizer) its text and stop strings.

    `finish_reason` becomes "length" after cfg.max_new_tokens tokens, "stop" at a stop string, at
    eot_id (the end-of-text token, not taken into the text; unless cfg.ignore_eot) or at one of
    cfg.stop_ids (also not taken), "error" when its logits are not finite (`error` says so; the
    other continuations go on);
    `take_text()` hands over the text produced since it was last called; with `logprobs` (the
    number of alternatives, 0 to MAX_TOP_LOGPROBS) `take_logprobs()` its tokens' TokenLogprobs.
    """

    def __init__(self, prompt_ids: Sequence[int], cfg: SamplingConfig, *, seed: int, vocab_size: int,
                 tokenizer: Tokenizer | None = None, eot_id: int | None = None, logprobs: int | None = None) -> None:
        if not prompt_ids:
            raise MyPTError("generation needs at least one prompt token (an empty prompt uses the start token)")
        self.cfg, self.seed, self.vocab_size = cfg, seed, vocab_size
        self.logprobs = logprobs  # None: not recorded; else each new token's TokenLogprob with this many alternatives
        self._logprobs: list[TokenLogprob] = []
        self._chosen: int | None = None  # the token choose() took last
        self.eot_id = None if cfg.ignore_eot else eot_id
        self.tokens = list(prompt_ids)  # the context so far; Decoder.add keeps the last block_size
        self.n_new = 0
        self.finish_reason: str | None = None if cfg.max_new_tokens > 0 else "length"
        self.error: str | None = None  # why, when finish_reason is "error"
        self.text = TextOut(tokenizer, cfg.stop) if tokenizer is not None else None
        self._pieces: list[str] = []
        # set by Decoder.add: the cache row, the tokens of the window it holds, the window's start
        self.slot: int | None = None
        self.held = 0
        self.start = 0
        self.generator: torch.Generator | None = None
        self.seen: torch.Tensor | None = None  # tokens already in the text (repetition penalty)
        self.reused: int | None = None  # prompt tokens the prefix cache supplied (None: no prefix cache)
        self.lookup = Lookup(cfg.lookup) if cfg.lookup else None  # drafts tokens to verify (mypt.lookup)

    @property
    def last(self) -> int:
        return self.tokens[-1]

    def choose(self, logits: torch.Tensor) -> int | None:
        """Pick the next token from this continuation's logits (vocab,) and take it (as
        choose_tokens does for a batch); None when they were not all finite."""
        choose_tokens([self], logits[None])
        return None if self.finish_reason == "error" else self._chosen

    def accept(self, token: int, finite: bool) -> None:
        """Take the token `choose_tokens` picked. Logits that were not all finite end this
        continuation alone: finish_reason "error", the reason in `error`."""
        if not finite:
            self.finish_reason = "error"
            self.error = (f"the model's next-token scores are not finite (NaN or infinite) at new token "
                          f"{self.n_new + 1}")
            return
        self._chosen = token
        if token == self.eot_id or token in self.cfg.stop_ids:
            self.finish_reason = "stop"
            if self.text is not None:
                self._pieces.append(self.text.finish())
        else:
            self._take(token)

    def _take(self, token: int) -> None:
        if self.seen is not None:
            self.seen[token] = True
        self.tokens.append(token)
        self.n_new += 1
        if self.text is not None:
            self._pieces.append(self.text.feed(token))
            if self.text.stopped:
                self.finish_reason = "stop"
                return
        if self.n_new >= self.cfg.max_new_tokens:
            self.finish_reason = "length"
            if self.text is not None:
                self._pieces.append(self.text.finish())
                self.finish_reason = "stop" if self.text.stopped else "length"

    def take_text(self) -> str:
        out, self._pieces = "".join(self._pieces), []
        return out

    def take_logprobs(self) -> list[TokenLogprob]:
        """The TokenLogprobs of the tokens produced since this was last called (when recorded)."""
        out, self._logprobs = self._logprobs, []
        return out


def choose_tokens(group: Sequence[Continuation], logits: torch.Tensor) -> None:
    """Each continuation of `group` picks its next token from its row of logits (n, vocab) and
    takes it: every row at once, with one host sync for the whole group.

    A row whose logits are not all finite samples from zeros instead: no NaN reaches the
    sampler (on a GPU a device-side assert that would end every row); that continuation alone
    ends with an error.
    """
    import torch

    raw = logits
    vocab = min(c.vocab_size for c in group)
    if any(c.vocab_size != vocab for c in group):  # one model serves one tokenizer; but be exact anyway
        for c, row in zip(group, logits, strict=True):
            choose_tokens([c], row[None])
        return
    logits = logits[:, :vocab].float()  # padded ids beyond the tokenizer's are never produced
    penalized = [i for i, c in enumerate(group) if c.seen is not None]
    if penalized:  # on a copy: the logprobs are of the raw logits
        logits = logits.clone()
        index = torch.tensor(penalized, device=logits.device)
        penalty = torch.tensor([[group[i].cfg.repetition_penalty] for i in penalized], device=logits.device)
        seen = torch.stack([group[i].seen for i in penalized])
        logits[index] = penalize(logits[index], seen, penalty)
    if all(c.cfg.temperature == 0 for c in group):  # each row's argmax (in one pass on a CPU)
        tokens, finite = greedy_tokens(logits, vocab)
    else:
        finite = _finite_rows(logits)
        if logits.device.type != "cpu" or not bool(finite.all()):  # (reading a CPU tensor is no device sync)
            logits = logits.where(finite[:, None], 0.0)
        tokens = pick_tokens(logits, [c.cfg for c in group], [c.generator for c in group])
        tokens, finite = torch.stack((tokens, finite.long())).tolist()  # the one sync
    for i, (c, token, ok) in enumerate(zip(group, tokens, finite, strict=True)):
        if ok and c.logprobs is not None:  # every token produced, the one that ends the text included
            c._logprobs += logprobs_of(raw[i][None], torch.tensor([token], device=raw.device), c.logprobs,
                                       c.vocab_size)
        c.accept(token, bool(ok))


def greedy_tokens(logits: torch.Tensor, vocab: int) -> tuple[list[int], list[bool]]:
    """The argmax of each row of logits (n, vocab or more) among the first `vocab` ids, and
    whether the row was all finite (else its token means nothing), with one host sync: the pick
    of rows at temperature 0 (choose_tokens, after any repetition penalty; mypt.lookup takes a
    draft's rows this way at once where no penalty makes a row depend on the tokens before it)."""
    import torch

    from mypt import kernels

    logits = logits[:, :vocab].float()
    picked = kernels.greedy_rows(logits)  # one pass on a CPU
    if picked is not None:
        return picked
    tokens, finite = torch.stack((argmax_rows(logits), _finite_rows(logits).long())).tolist()
    return tokens, [bool(ok) for ok in finite]


def _finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """(n,) bool: whether each row of logits (n, vocab) is all finite (NaN propagates to the extremes)."""
    import torch

    return torch.isfinite(logits.amax(-1)) & torch.isfinite(logits.amin(-1))


class Decoder:
    """Steps continuations of one model together over one KV cache of `slots` rows.

    Every `step()` gives each active continuation whose prompt is in the cache one token: one
    forward pass for all those decoding (one new token each, rows at their own lengths), plus one
    per distinct number of prompt tokens being prefilled or learned-position window being
    refilled, then one pass through the output layer for every row that takes a token;
    then every continuation picks its token from its own logits with its own generator,
    all rows at once (`choose_tokens`, one host sync). generate_ids runs one continuation
    through it, a server many: the tokens are the same either way, up to the last bits of
    floating-point sums that a batched matrix product orders differently. A continuation with
    prompt lookup also feeds its drafted tokens (one forward pass per distinct draft length) and
    takes the ones its logits confirm (mypt.lookup), row by row.

    `amp` makes the context (autocast) each step runs in; it is entered per step. `capacity`
    (tokens a row holds, at most block_size) sizes the cache for continuations known to stay
    shorter; `dtype` is the cache's (the compute dtype: bf16 under bf16 autocast; default the
    weights'). `prefill_chunk`: at most that many prompt tokens enter the cache per step, in
    all: whole prompts in the order they came while they fit, and a prompt longer than that is
    cut into chunks of it, so a long prompt is prefilled over several steps while the other rows
    go on decoding, and of many prompts waiting the first get their tokens first (a row whose
    prompt is not all in yet gets no token that step; rows fed the same number of tokens share
    one forward pass); `prefilled` counts the prompt tokens the last step fed and
    `prefill_seconds` the time of their forward passes.
    `prefix_cache`: keys and values of prompt starts seen before are copied in instead of
    computed (mypt.kvcache.PrefixCache).
    """

    def __init__(self, model: GPT, slots: int = 1, amp: AmpFactory = contextlib.nullcontext,
                 capacity: int | None = None, *, dtype: torch.dtype | None = None, prefill_chunk: int | None = None,
                 prefix_cache: PrefixCache | None = None) -> None:
        self.model, self.slots, self.amp, self.capacity = model, slots, amp, capacity
        self.device = model.transformer.wte.weight.device
        self.dtype = dtype or model.transformer.wte.weight.dtype
        self.prefill_chunk, self.prefix_cache = prefill_chunk, prefix_cache
        self.prefilled, self.prefill_seconds = 0, 0.0
        self.active: list[Continuation] = []
        self._free = list(range(slots))  # a heap: the lowest free row is taken next, so the rows in use stay
        # together and a step reads them in place (CacheStep.span)
        self._cache: KVCache | None = None

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def cache(self) -> KVCache:
        if self._cache is None:
            self._cache = self.model.new_cache(self.slots, self.device, self.dtype, self.capacity)
        return self._cache

    def add(self, c: Continuation) -> None:
        """Give c a free row; its prompt is prefilled by the next steps (its last block_size
        tokens), after what the prefix cache holds of it."""
        import torch

        if not self._free:
            raise RuntimeError("no free slot: check free_slots before adding")
        c.tokens = c.tokens[-self.model.config.block_size:]
        c.generator = torch.Generator(self.device).manual_seed(c.seed % 2**64)  # torch's 64 bits: -1 is 2**64 - 1
        if c.cfg.repetition_penalty != 1:
            c.seen = torch.zeros(c.vocab_size, dtype=torch.bool, device=self.device)
            c.seen[torch.tensor(c.tokens, device=self.device)] = True
        c.slot, c.held, c.start = heapq.heappop(self._free), 0, 0  # taken last: a failure above leaves no row lost
        self.active.append(c)
        if c.finish_reason is not None:  # nothing to generate
            self.remove(c)
        elif self.prefix_cache is not None and c.cfg.use_cache:
            with torch.inference_mode():
                c.held = c.reused = self.prefix_cache.load(c.tokens, self.cache, c.slot)

    def remove(self, c: Continuation) -> None:
        """Take c out of the batch (finished, or its client went away); its row is free again.

        The row of a continuation that failed is zeroed: masked cache entries still enter the
        attention product (times 0), and a NaN left there would spoil the next row's output.
        """
        self.active.remove(c)
        if c.finish_reason == "error":
            self._zero(c.slot)
        heapq.heappush(self._free, c.slot)
        c.slot = None

    def reset(self) -> None:
        """Remove every continuation and zero the cache: after a step that raised part-way."""
        for c in self.active:
            heapq.heappush(self._free, c.slot)
            c.slot = None
        self.active = []
        self._zero(slice(None))
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    def _zero(self, rows: int | slice) -> None:
        import torch

        if self._cache is not None:
            with torch.inference_mode():  # the cache may have been made in it
                self._cache.k[:, rows] = 0
                self._cache.v[:, rows] = 0

    def step(self) -> list[Continuation]:
        """One token (with lookup, maybe several) for every active continuation whose prompt is
        in; returns those that finished (now removed)."""
        import torch

        with torch.inference_mode(), self.amp():
            ready, logits, drafted = self._logits()
            first = [c for c in ready if c.n_new == 0 and c.reused is not None]
            if ready:
                choose_tokens(ready, logits)
            for c, rows in drafted:  # after its pending token and after each drafted one
                c.lookup.verify(c, rows, self.cache)
            if self.prefix_cache is not None:
                for c in first:
                    if c.finish_reason != "error" and c.start == 0:
                        self.prefix_cache.store(c.tokens[:c.held], self.cache, c.slot)
        done = [c for c in self.active if c.finish_reason is not None]
        for c in done:
            self.remove(c)
        return done

    def _logits(self) -> tuple[list[Continuation], torch.Tensor | None, list[tuple[Continuation, torch.Tensor]]]:
        """The continuations that get one token this step and their next-token logits (n, vocab);
        and those with drafted tokens to verify, each with its (drafts + 1, vocab) logits."""
        import torch

        block_size, slides = self.model.config.block_size, self.model.config.position == "rope"
        budget = self.prefill_chunk  # prompt tokens this step may still feed (None: no limit)
        self.prefilled, self.prefill_seconds = 0, 0.0
        ready: list[Continuation] = []
        hidden: list[torch.Tensor] = []  # final hidden states of `ready`, in order
        uncached: list[tuple[Continuation, torch.Tensor]] = []  # rows without a cache, with their logits
        drafted: list[tuple[Continuation, torch.Tensor]] = []
        feeds: dict[tuple[int, int], list[Continuation]] = {}  # (tokens fed, drafted) per row -> its continuations
        complete: set[int] = set()  # rows whose pending tokens are all fed this step
        for c in self.active:
            if not slides:  # a learned-position window jumps; its row is then refilled
                start = window_start(len(c.tokens), c.start, block_size)
                if start != c.start:
                    c.start, c.held = start, 0
            if not c.cfg.use_cache:
                uncached.append((c, _uncached_logits(self.model, c.tokens, c.start, self.device)[None]))
                continue
            pending = fed = len(c.tokens) - c.start - c.held
            if budget is not None and pending > 1:  # a prompt (or a refill): within the step's budget
                if pending > budget:
                    if self.prefilled:  # it waits for a later step, whole
                        continue
                    fed = budget  # the first prompt of a step is cut to the budget
                budget -= fed
            if fed == pending:
                complete.add(id(c))
            n_drafts = 0 if c.lookup is None or fed < pending else len(c.lookup.propose(c, self.cache, fed))
            feeds.setdefault((fed, n_drafts), []).append(c)
            self.prefilled += fed if fed > 1 else 0
        for (n_new, n_drafts), group in feeds.items():
            started = time.perf_counter()
            h = self._feed(group, n_new, n_drafts)
            if n_new > 1:
                if h.device.type == "cuda":  # the time of the work, not of queueing it
                    torch.cuda.synchronize(h.device)
                self.prefill_seconds += time.perf_counter() - started
            if n_drafts:
                drafted += list(zip(group, self.model.head_logits(h, self.cache), strict=True))
                continue
            fed = [i for i, c in enumerate(group) if id(c) in complete]
            if fed:
                ready += [group[i] for i in fed]
                hidden.append(h if len(fed) == len(group) else h[fed])
        # one pass through the head for every row that takes a token (not one per forward pass)
        parts = [self.model.head_logits(torch.cat(hidden), self.cache)] if hidden else []
        ready += [c for c, _ in uncached]
        parts += [logits for _, logits in uncached]
        logits = torch.cat(parts) if len(parts) > 1 else (parts[0] if parts else None)
        return ready, logits, drafted

    def _feed(self, group: list[Continuation], n_new: int, n_drafts: int = 0) -> torch.Tensor:
        """One forward pass of each continuation's next n_new tokens into its row: the final
        hidden states (n, n_embd); followed by its n_drafts drafted tokens, (n, n_drafts + 1, n_embd)."""
        import torch

        cache = self.cache
        slots = [c.slot for c in group]
        fresh = [c.slot for c in group if c.held == 0]
        if fresh:
            cache.reset(torch.tensor(fresh))
        idx = torch.tensor([c.tokens[c.start + c.held:][:n_new] + (c.lookup.drafts if n_drafts else [])
                            for c in group], dtype=torch.long, device=self.device)
        rows = None if slots == list(range(self.slots)) else torch.tensor(slots)  # host: the cache plans on it
        for c in group:
            if n_drafts:
                c.lookup.keep_overwritten(cache, c.slot, n_new)
            c.held += n_new + n_drafts  # verify() rewinds past the rejected drafts
        return self.model.next_hidden(idx, cache, rows, last=n_drafts + 1 if n_drafts else 0)


def _uncached_logits(model: GPT, tokens: list[int], start: int, device: torch.device) -> torch.Tensor:
    """Next-token logits (vocab,) from the whole window, no cache (the reference for the cache).

    For a rotary model the window is every token that can reach the next one through the
    layers' sliding windows: n_layer * (block_size - 1) + 1 tokens, at their own positions.
    """
    import torch

    cfg = model.config
    if cfg.position != "rope":  # a learned-position window starts again at position 0
        return model.next_logits(torch.tensor([tokens[start:]], device=device))[0]
    start = max(start, len(tokens) - (cfg.n_layer * (cfg.block_size - 1) + 1))
    return model.next_logits(torch.tensor([tokens[start:]], device=device), start=start)[0]


def generate_ids(
    model: GPT,
    prompt_ids: Sequence[int],
    cfg: SamplingConfig,
    *,
    vocab_size: int,
    seed: int,
    amp: AmpFactory = contextlib.nullcontext,
    dtype: torch.dtype | None = None,
    eot_id: int | None = None,
) -> Iterator[int]:
    """Yield up to cfg.max_new_tokens new token ids after prompt_ids (of which the last
    block_size are used): one Continuation stepped by a Decoder of one row. Stops before eot_id
    unless cfg.ignore_eot. Logits that are not finite raise MyPTError.

    vocab_size is the tokenizer's: padded ids beyond it are never produced. `amp` makes the
    context (autocast) each forward step runs in; it is entered per step, never across a yield.
    `dtype` is the KV cache's: the compute dtype (bf16 under bf16 autocast), default the weights'.
    """
    c = Continuation(prompt_ids, cfg, seed=seed, vocab_size=vocab_size, eot_id=eot_id)
    longest = min(len(prompt_ids), model.config.block_size) + cfg.max_new_tokens
    decoder = Decoder(model, 1, amp, capacity=longest, dtype=dtype)  # a cache no longer than the text will be
    decoder.add(c)
    while c.finish_reason is None:
        before = c.n_new
        decoder.step()
        # the tokens taken (with lookup, several; not the end-of-text token, which ends the text unseen)
        yield from c.tokens[len(c.tokens) - (c.n_new - before):]
    if c.error is not None:
        raise MyPTError(f"generation stopped: {c.error}; the checkpoint's weights may hold NaN or infinite values, "
                        "or a 16-bit dtype overflowed (try dtype fp32)")


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


class TextOut:
    """Token ids -> text pieces that never split a UTF-8 character and end at a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]) -> None:
        self._decoder = StreamDecoder(tokenizer)
        self._stops = StopFilter(stop)
        self.stopped = False  # True once a stop string ended the text

    def feed(self, token: int) -> str:
        out, self.stopped = self._stops.feed(self._decoder.feed(token))
        return out

    def finish(self) -> str:
        """The text held back at the end (an incomplete character, a partial stop string)."""
        out, self.stopped = self._stops.feed(self._decoder.flush())
        return out if self.stopped else out + self._stops.flush()


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
        self._pieces = self._run(ids, TextOut(tokenizer, stop))

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

    def _run(self, ids: Iterator[int], text: TextOut) -> Iterator[str]:
        ids = iter(ids)
        while True:
            t0 = time.perf_counter()  # time spent by the consumer between pieces is not counted
            token = next(ids, None)
            if token is None:
                break
            self.seconds += time.perf_counter() - t0
            self.n_tokens += 1
            out = text.feed(token)
            self.stopped = text.stopped
            if out:
                yield out
            if self.stopped:
                return
        rest = text.finish()
        self.stopped = text.stopped
        if rest:
            yield rest
