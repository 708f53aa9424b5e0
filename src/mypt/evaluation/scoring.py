"""Log-likelihoods of continuations given contexts: the numbers every task score is made of.

Tokenisation follows lm-eval's: trailing whitespace of a context moves to the front of its
continuation, context + continuation is encoded as one text, and the continuation's tokens are
those after the context's own tokens (where a subword tokenizer merges across that boundary, the
context backs off to the tokens the two encodings share: encode_choices). An empty context is
the tokenizer's start token. A request longer than block_size + 1 tokens loses the start of its
context (truncated from the left).

Requests that share their context tokens are computed once: the context (all but its last token)
is run through the model into one row of a KV cache and copied to the rows of its continuations,
which then run together, each only its own tokens (the batch is sorted by length, so padding is
short, and the output head runs on real positions only).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from mypt import dist
from mypt.errors import MyPTError
from mypt.evaluation.tasks import Item
from mypt.kvcache import KVCache
from mypt.model import GPT
from mypt.tokenizers import Tokenizer

MAX_BATCH_TOKENS = 1 << 14  # rows x cache length of one batch


@dataclass(frozen=True)
class Request:
    """Score `continuation` (token ids) after `context` (token ids, at least one)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass(frozen=True)
class Scored:
    logprob: float  # sum over the continuation's tokens, in nats
    greedy: bool  # every continuation token is the model's most likely one
    n_tokens: int


def encode_choices(tok: Tokenizer, contexts: Sequence[str], continuations: Sequence[str], what: str) -> list[Request]:
    """The request for each continuation after its context, tokenised as lm-eval tokenises them.

    Where a subword tokenizer merges across the boundary (a context that stops inside a word),
    the context's tokens are not the start of the whole text's, and lm-eval's split would score
    tokens that do not spell the continuation, or none. The context then backs off to the tokens
    both encodings share (token healing), the same for every continuation after that context, and
    the rest of the whole text's tokens are scored.
    """
    encoded = []  # (context, the whole text's tokens, how many of them start as the context's own do)
    for context, continuation in zip(contexts, continuations, strict=True):
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = tok.encode(context + continuation, what)
        encoded.append((context, whole, _shared_start(tok.encode(context, what) if context else [], whole)))
    shared: dict[str, int] = {}  # per context: the fewest, so every continuation after it backs off alike
    for context, _whole, n in encoded:
        shared[context] = min(shared.get(context, n), n)
    requests = []
    for context, whole, _n in encoded:
        n = shared[context]
        if len(whole) <= n:
            raise MyPTError(f"{what}: a choice or target has no tokens; give it some text")
        requests.append(Request(tuple(whole[:n]) or tuple(tok.start_ids()[:1]), tuple(whole[n:])))
    return requests


def _shared_start(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b have in common."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@dataclass(frozen=True)
class _Fitted:
    prefix: tuple[int, ...]  # context tokens that go into the cache (all but the last)
    tail: tuple[int, ...]  # the context's last token + the continuation's all but last
    targets: tuple[int, ...]


def _fit(r: Request, block_size: int) -> _Fitted:
    if len(r.continuation) > block_size:
        raise MyPTError(f"a continuation of {len(r.continuation)} tokens is longer than the model's block_size "
                        f"({block_size}); shorten the choices or targets")
    inputs = (r.context + r.continuation)[-(block_size + 1):][:-1]
    n = len(r.continuation)
    return _Fitted(inputs[:-n], inputs[-n:], r.continuation)


def _batches(fitted: list[_Fitted], order: list[int], block_size: int, max_tokens: int) -> list[list[int]]:
    """Runs of `order` (longest contexts first) whose cache fits block_size and max_tokens."""
    batches: list[list[int]] = []
    rows: list[int] = []
    longest_prefix = longest_tail = 0
    for i in order:
        p, t = max(longest_prefix, len(fitted[i].prefix)), max(longest_tail, len(fitted[i].tail))
        if rows and (p + t > block_size or (len(rows) + 1) * (p + t) > max_tokens):
            batches.append(rows)
            rows, p, t = [], len(fitted[i].prefix), len(fitted[i].tail)
        rows.append(i)
        longest_prefix, longest_tail = p, t
    if rows:
        batches.append(rows)
    return batches


def _padded(seqs: list[tuple[int, ...]], device: torch.device) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [0] * (width - len(s)) for s in seqs], dtype=torch.long, device=device)


def _prefill(model: GPT, cache: KVCache, batch: list[_Fitted], device: torch.device) -> None:
    """Put each distinct prefix through the model once, into the first row holding it; copy it to the others."""
    first: dict[tuple[int, ...], int] = {}
    for row, f in enumerate(batch):
        first.setdefault(f.prefix, row)
    sources = [row for prefix, row in first.items() if prefix]
    if sources:
        rows = torch.tensor(sources)
        step = cache.step(rows, max(len(batch[r].prefix) for r in sources))
        model.hidden_states(_padded([batch[r].prefix for r in sources], device), step)
    for row, f in enumerate(batch):
        src = first[f.prefix]
        if row != src and f.prefix:
            cache.k[:, row], cache.v[:, row] = cache.k[:, src], cache.v[:, src]
        cache.pos[row] = len(f.prefix)  # padding written past it is never attended to


def _score_batch(model: GPT, batch: list[_Fitted], device: torch.device, dtype: str) -> list[Scored]:
    longest = max(len(f.prefix) for f in batch) + max(len(f.tail) for f in batch)
    cache = model.new_cache(len(batch), device, dist.TORCH_DTYPES[dtype], capacity=longest)  # the compute dtype
    _prefill(model, cache, batch, device)
    tails = _padded([f.tail for f in batch], device)
    h = model.hidden_states(tails, cache.step(None, tails.size(1)))  # (R, T, n_embd)
    lengths = torch.tensor([len(f.tail) for f in batch], device=device)
    real = torch.arange(tails.size(1), device=device)[None, :] < lengths[:, None]  # (R, T)
    logprobs = torch.log_softmax(model.lm_head(h[real]).float(), dim=-1)  # (N, vocab): real positions only
    targets = torch.tensor([t for f in batch for t in f.targets], device=device)
    picked = logprobs.gather(1, targets[:, None])[:, 0]
    greedy = logprobs.argmax(-1) == targets
    out = []
    for lp, gr, f in zip(picked.split(lengths.tolist()), greedy.split(lengths.tolist()), batch, strict=True):
        out.append(Scored(lp.sum().item(), bool(gr.all()), len(f.targets)))
    return out


def loglikelihoods(model: GPT, requests: list[Request], device: torch.device, dtype: str,
                   max_tokens: int = MAX_BATCH_TOKENS) -> list[Scored]:
    """The log-likelihood of each request's continuation, in the order given. model is in eval mode."""
    block_size = model.config.block_size
    fitted = [_fit(r, block_size) for r in requests]
    order = sorted(range(len(fitted)), key=lambda i: (-len(fitted[i].prefix), fitted[i].prefix, -len(fitted[i].tail)))
    results: list[Scored | None] = [None] * len(fitted)
    for rows in _batches(fitted, order, block_size, max_tokens):
        with torch.inference_mode(), dist.autocast(device, dtype):
            scored = _score_batch(model, [fitted[i] for i in rows], device, dtype)
        for i, s in zip(rows, scored, strict=True):
            results[i] = s
    return results  # type: ignore[return-value]


@dataclass(frozen=True)
class ItemResult:
    """One item's scores: a log-likelihood per choice (a cloze has one), and what was picked."""

    line: int
    logprobs: tuple[float, ...]
    greedy: tuple[bool, ...]
    answer: int
    pred: int  # the choice of highest log-likelihood (the first of equals, as numpy's argmax)
    pred_norm: int  # the same per UTF-8 byte of the choice

    @property
    def acc(self) -> float:
        """Right (1.0) or wrong: a multiple choice's pred is the answer; a cloze's greedy continuation is its target."""
        if len(self.logprobs) == 1:
            return float(self.greedy[0])
        return float(self.pred == self.answer)

    @property
    def acc_norm(self) -> float:
        return float(self.pred_norm == self.answer)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def score_items(model: GPT, tok: Tokenizer, items: tuple[Item, ...], device: torch.device, dtype: str,
                what: str) -> list[ItemResult]:
    """Every choice of every item scored in one pass over batched, shared contexts."""
    requests = []
    for item in items:
        where = f"{what} line {item.line}" if item.line else what
        requests += encode_choices(tok, item.contexts, item.choices, where)
    scored = loglikelihoods(model, requests, device, dtype)
    out, at = [], 0
    for item in items:
        mine = scored[at:at + len(item.choices)]
        at += len(item.choices)
        lls = [s.logprob for s in mine]
        per_byte = [ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(lls, item.choices, strict=True)]
        out.append(ItemResult(item.line, tuple(lls), tuple(s.greedy for s in mine), item.answer,
                              _argmax(lls), _argmax(per_byte)))
    return out


def _windows(ids: torch.Tensor, block_size: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) covering ids[1:] once: non-overlapping windows, full ones batched."""
    n = ids.numel() - 1  # tokens to predict
    full = n // block_size
    x = ids[: full * block_size].view(full, block_size)
    y = ids[1 : full * block_size + 1].view(full, block_size)
    for i in range(0, full, batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]
    if n > full * block_size:
        yield ids[full * block_size : n][None], ids[full * block_size + 1 :][None]


def text_nats(model: GPT, tok: Tokenizer, text: str, device: torch.device, dtype: str, what: str,
              batch_size: int = 8) -> tuple[int, float]:
    """(tokens predicted, their total nats) of text after the start token, in non-overlapping
    block_size windows (so early tokens of a window see little context)."""
    if not text:
        raise MyPTError(f"{what} is empty: there is nothing to evaluate")
    ids = torch.tensor(tok.start_ids()[:1] + tok.encode(text, what), device=device)
    total = 0.0
    for x, y in _windows(ids, model.config.block_size, batch_size):
        with torch.inference_mode(), dist.autocast(device, dtype):
            _, loss = model(x, y)
        total += loss.item() * y.numel()
    return ids.numel() - 1, total
