"""Prompt-lookup decoding: tokens drafted from the text itself, verified in one forward pass.

Owns the drafting (`Lookup`, one per continuation whose SamplingConfig has lookup N > 0), the
rule that accepts drafted tokens, the rewinding of a KV-cache row past the rejected ones, and
the back-off that stops drafting where it does not pay. `mypt.sampling.Decoder` calls it; any
caller of the Decoder (generate.py, the Python API, a server) turns it on per continuation
(SamplingConfig.lookup). torch is imported where a tensor is made, as in mypt.sampling.

Drafting: the longest of the text's last MAX_NGRAM .. 1 tokens that occurred before in the
context so far (the prompt and the new tokens) is looked up, and the N tokens that followed its
latest earlier occurrence are the draft (a match close to the end continues with the draft's own
tokens, so a repeating stretch drafts its next period). N is the most drafted tokens per step:
one forward pass then adds up to N + 1 tokens. The n-grams are indexed as the text grows, so a
draft costs a few dictionary look-ups.

Verifying: the step feeds the continuation's pending token and the draft in one forward pass
and gets the logits after each. The continuation then picks its tokens from those rows one by
one, exactly as it does one step at a time (`Continuation.choose`: the same repetition penalty,
temperature, top-k, top-p, generator draw, stop strings and end of text). While the token picked
is the draft's next one, the next row was computed from the right context and picking goes on;
the first token that differs, or the one after a wholly accepted draft, ends the step. The cache
row is then rewound past the rejected draft tokens (a full rotary row gets back the entries the
draft overwrote).

Exactness: at temperature 0 the tokens are plain greedy's. With sampling every token is drawn
from the distribution plain decoding draws it from: x ~ p is kept when it equals the draft token
t (probability p(t)), otherwise x is the token, distributed as p without t, renormalised; that
is speculative sampling's accept/reject for a proposal that puts all its mass on t. The draws
come from the same generator in the same order as without lookup, so a seed gives the same text
(up to floating point's last bits: a forward pass of several tokens sums in another order).

Back-off: a draft rejected from its first token is a miss, and drafting then pauses for a
number of steps that doubles with each miss (PAUSE up to MAX_PAUSE); a draft of which at least
PAYS tokens hold brings the pause back to PAUSE. The draft's length adapts too: up by 2 (to N)
after a wholly accepted draft, down by 1 after one cut short and by half after a miss, so a
verifying pass is not much longer than what tends to hold. Free text, where drafts rarely hold,
so runs plain steps nearly all the time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

    from mypt.kvcache import KVCache
    from mypt.sampling import Continuation

MAX_NGRAM = 3  # the longest suffix looked up
MAX_LOOKUP = 64  # the most tokens one step may draft (SamplingConfig.lookup's bound)
PAUSE, MAX_PAUSE = 4, 256  # steps of the pause after a miss; each further miss doubles it, up to MAX_PAUSE
PAYS = 2  # accepted tokens of a draft that end the back-off


class Lookup:
    """One continuation's drafting: its n-gram index, its draft for this step, its back-off.

    `drafted` and `accepted` count draft tokens proposed and accepted so far (the acceptance rate).
    """

    def __init__(self, n_draft: int, max_ngram: int = MAX_NGRAM) -> None:
        self.n_draft, self.max_ngram = n_draft, max_ngram
        self.drafts: list[int] = []  # this step's draft (empty: a plain step)
        self.drafted = self.accepted = 0
        self._next: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram)]  # [n-1]: n-gram -> index after it
        self._indexed = 0  # n-grams ending before this index are in _next
        self._length, self._pause, self._wait = n_draft, PAUSE, 0
        self._saved: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def propose(self, c: Continuation, cache: KVCache, pending: int) -> list[int]:
        """This step's draft for c, whose newest `pending` tokens are not in its cache row yet
        (empty while paused, or where no suffix matched, or with no room left)."""
        self.drafts = []
        if self._wait:
            self._wait -= 1
            return self.drafts
        room = min(self._length, c.cfg.max_new_tokens - c.n_new - 1, _space(cache, c.held, pending))
        if room > 0:
            self.drafts = self._draft(c.tokens, room)
        return self.drafts

    def _draft(self, tokens: list[int], room: int) -> list[int]:
        self._index(tokens)
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            at = self._next[n - 1].get(tuple(tokens[-n:]))
            if at is not None:
                break
        else:
            return []
        draft: list[int] = []
        for j in range(at, at + room):  # past the end: the draft's own tokens (a repeating stretch)
            draft.append(tokens[j] if j < len(tokens) else draft[j - len(tokens)])
        return draft

    def _index(self, tokens: list[int]) -> None:
        """Index every n-gram followed by a token: the latest occurrence wins."""
        for end in range(self._indexed, len(tokens) - 1):  # the n-gram is tokens[end - n + 1 : end + 1]
            for n in range(1, min(self.max_ngram, end + 1) + 1):
                self._next[n - 1][tuple(tokens[end - n + 1:end + 1])] = end + 1
        self._indexed = max(self._indexed, len(tokens) - 1)

    def keep_overwritten(self, cache: KVCache, slot: int, pending: int) -> None:
        """Before the forward pass: save what the draft will overwrite in a rotary ring row, so a
        rejected token's slot can get back the older position it held."""
        import torch

        self._saved = None
        first = int(cache.pos[slot]) + pending
        if cache.ring and self.drafts and first + len(self.drafts) > cache.capacity:  # it wraps: older positions
            slots = torch.arange(first, first + len(self.drafts), device=cache.k.device) % cache.capacity
            self._saved = (slots, cache.k[:, slot, :, slots].clone(), cache.v[:, slot, :, slots].clone())

    def verify(self, c: Continuation, logits: torch.Tensor, cache: KVCache) -> None:
        """Take c's tokens from logits (len(drafts) + 1, vocab): the rows after its pending token and
        after each draft token, while the drafts hold; then rewind c's row past the rejected ones."""
        accepted = 0
        for token in _choices(c, logits):
            if c.finish_reason is not None or accepted == len(self.drafts) or token != self.drafts[accepted]:
                break
            accepted += 1
        self._rewind(cache, c, len(self.drafts) - accepted)
        self._score(accepted)

    def _rewind(self, cache: KVCache, c: Continuation, rejected: int) -> None:
        if not rejected:
            return
        cache.pos[c.slot] -= rejected
        c.held -= rejected
        if self._saved is not None:
            slots, k, v = self._saved
            cache.k[:, c.slot, :, slots[-rejected:]] = k[:, :, -rejected:]  # (n_layer, nkv, drafts, hs)
            cache.v[:, c.slot, :, slots[-rejected:]] = v[:, :, -rejected:]
        self._saved = None

    def _score(self, accepted: int) -> None:
        self.drafted += len(self.drafts)
        self.accepted += accepted
        if accepted == len(self.drafts):
            self._length = min(self.n_draft, self._length + 2)
        else:  # a miss halves it: the text has gone where the context does not predict
            self._length = max(1, self._length - 1 if accepted else self._length // 2)
        if accepted >= PAYS:
            self._pause = PAUSE
        elif not accepted:
            self._wait, self._pause = self._pause, min(2 * self._pause, MAX_PAUSE)


def _choices(c: Continuation, logits: torch.Tensor) -> Iterator[int | None]:
    """c takes a token from each row of logits in turn (Continuation.choose) while the caller
    asks for more; each is yielded once taken (None: the logits were not finite)."""
    from mypt.sampling import greedy_tokens

    if c.cfg.temperature == 0 and c.seen is None and c.logprobs is None:
        # each row's token is its own argmax whatever was taken before it: all rows' at once
        tokens, finite = greedy_tokens(logits, c.vocab_size)
        for token, ok in zip(tokens, finite, strict=True):
            c.accept(token, ok)
            yield token if ok else None
    else:
        for row in logits:
            yield c.choose(row)


def _space(cache: KVCache, held: int, pending: int) -> int:
    """Draft tokens a cache row can take this step: a ring row any that keep one pass within
    block_size; another row (learned positions, or a rotary row sized for a short text) those
    that fit its capacity, so a learned-position window is never outgrown by a draft."""
    if cache.ring:
        return cache.capacity - pending
    return cache.capacity - held - pending
