"""Continuous batching for one loaded model: the server's scheduler around mypt.sampling.Decoder.

Requests wait in a bounded queue; between decoding steps the waiting continuations take the
free rows of the KV cache (at most `prefill_tokens` prompt tokens join per step, at least one
request), each step gives every active continuation one token from one forward pass, and a
continuation leaves as soon as it finishes or its client goes away, so a long request never
holds up a short one. The step itself is the one in mypt.sampling that generate.py uses too.
A job that asks for its prompt's logprobs (echo) gets them from one forward pass over the prompt
(mypt.sampling.prompt_logprobs) as it joins, before its first token; its continuations record
their tokens' logprobs as they step.

A continuation whose logits are not finite fails its own request (500) while the others go
on; a step that raises fails the requests in it (500) and the cache is zeroed; should the loop
itself stop, the model is out of service: every request gets 503 and /health says why.

Everything here runs on the server's event loop, `Decoder.step` included: between two steps the
loop sends the new text and takes new requests, and nothing else touches the decoder, so no lock
is needed. (A worker thread for the step was measured slower under load: its Python work and
the loop's contend for the GIL; BENCHMARKS.md.) A request hears of its text through the
asyncio.Queue of `Event`s it gave to `submit`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from mypt import dist
from mypt.api import LoadedModel
from mypt.sampling import Continuation, Decoder, SamplingConfig, TokenLogprob, prompt_logprobs

log = logging.getLogger("mypt.serve")


class Overloaded(Exception):
    """The queue is full: the request is refused (HTTP 503 with Retry-After)."""


class OutOfService(Exception):
    """The scheduling loop stopped on an error: no request can be served until a restart."""


@dataclass(frozen=True)
class Event:
    """New text of choice `index` and its new tokens' logprobs (when asked for); finish_reason set
    when that choice is done ("stop" or "length"). finish_reason "error": the whole request
    failed (the message in text; `status` 500, or 503 when the model went out of service).
    `prompt`: the event holds the prompt's logprobs (echo), sent once before any new text."""

    index: int
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    status: int = 500
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt: bool = False


class Job:
    """One prompt of a request: its continuations (choices first_index, first_index + 1, ...) and
    the queue its handler reads events from."""

    def __init__(self, continuations: list[Continuation], events: asyncio.Queue[Event], first_index: int,
                 prompt_logprobs: int | None = None) -> None:
        self.continuations = continuations
        self.events, self.first_index = events, first_index
        self.prompt_logprobs = prompt_logprobs  # None, or the alternatives per prompt token (echo)
        self.cancelled = False
        self.admitted = 0  # continuations that have a row (they join in order)
        self.open = len(continuations)  # continuations not finished yet

    def cancel(self) -> None:
        """The client went away: the job's rows are freed before the next step."""
        self.cancelled = True


class Batcher:
    """Schedules the requests of one model onto a Decoder of `max_batch` rows."""

    def __init__(self, lm: LoadedModel, *, max_batch: int, max_queue: int, prefill_tokens: int = 512) -> None:
        self.lm = lm
        self.max_queue, self.prefill_tokens = max_queue, prefill_tokens
        self.decoder = Decoder(lm.model, max_batch, amp=lambda: dist.autocast(lm.device, lm.dtype))
        self.decoder.cache  # noqa: B018 - allocate the KV cache now, not on the first request
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self._wake = asyncio.Event()
        self.steps = 0
        self.failed_steps = 0
        self.stopped: str | None = None  # why the loop stopped (out of service), if it did

    def submit(self, prompt_ids: Sequence[int], cfg: SamplingConfig, seeds: Sequence[int],
               events: asyncio.Queue[Event], first_index: int = 0, *, logprobs: int | None = None,
               echo: bool = False) -> Job:
        """Queue one prompt of len(seeds) choices (choice first_index + i samples with seeds[i]);
        their text arrives in `events`. logprobs: None, or the alternatives per token recorded for
        the new tokens, and with echo for the prompt's too."""
        if self.stopped is not None:
            raise OutOfService(self.stopped)
        if len(self.waiting) >= self.max_queue:
            raise Overloaded(f"'{self.lm.name}' has {self.max_queue} requests waiting already")
        tok = self.lm.tokenizer
        job = Job([Continuation(prompt_ids, cfg, seed=seed, vocab_size=tok.sampled_vocab, tokenizer=tok,
                                eot_id=tok.eot_id, logprobs=logprobs) for seed in seeds], events, first_index,
                  logprobs if echo else None)
        self.waiting.append(job)
        self._wake.set()
        return job

    def wake(self) -> None:
        self._wake.set()

    def stats(self) -> dict[str, int | str | None]:
        return {"slots": self.decoder.slots, "active": len(self.decoder.active), "waiting": len(self.waiting),
                "steps": self.steps, "failed_steps": self.failed_steps, "error": self.stopped}

    async def run(self) -> None:
        """The scheduling loop (a task for the server's lifetime), supervised: should it stop on an
        error, every request waiting or running gets that error and later ones are refused
        (OutOfService), instead of waiting for a loop that is gone."""
        try:
            await self._loop()
        except Exception as e:
            log.exception("the scheduling loop of '%s' stopped", self.lm.name)
            self.stopped = f"its decoding loop stopped ({type(e).__name__}: {e})"
            for job in dict.fromkeys([*self.running, *self.waiting]):  # a job may be in both
                job.events.put_nowait(Event(job.first_index, f"The model '{self.lm.name}' is out of service: "
                                            f"{self.stopped}; restart the server", "error", status=503))
            self.running, self.waiting = [], deque()

    async def _loop(self) -> None:
        while True:
            self._drop_cancelled()
            self._admit()
            if not self.decoder.active:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                done = self.decoder.step()
            except Exception as e:  # a failing step fails its requests, never the server
                log.exception("decoding step failed")
                self.failed_steps += 1
                self.decoder.reset()
                self._fail_all(f"decoding failed: {type(e).__name__}: {e}")
                continue
            self.steps += 1
            self._publish(done)
            await asyncio.sleep(0.001)  # the loop sends the text, takes new requests, notices gone clients

    def _admit(self) -> None:
        """Waiting continuations take free rows, in arrival order, within the prefill budget."""
        budget = self.prefill_tokens
        while self.waiting and self.decoder.free_slots:
            job = self.waiting[0]
            c = job.continuations[job.admitted]
            cost = min(len(c.tokens), self.lm.config.block_size)
            if job.admitted == 0 and job.prompt_logprobs is not None:
                cost += len(c.tokens)
            if cost > budget and budget < self.prefill_tokens:
                break  # the rest joins at the next step
            budget -= cost
            if job.admitted == 0 and job.prompt_logprobs is not None and not self._send_prompt_logprobs(job, c.tokens):
                self.waiting.popleft()  # failed alone
                continue
            self.decoder.add(c)
            job.admitted += 1
            if job.admitted == 1:
                self.running.append(job)
            if job.admitted == len(job.continuations):
                self.waiting.popleft()
            if c.finish_reason is not None:  # max_tokens 0: done without a step
                self._publish([c])

    def _send_prompt_logprobs(self, job: Job, prompt_ids: list[int]) -> bool:
        """Score the job's prompt (one forward pass) and send it to each of its choices; False
        when that failed (the job is then failed alone, with 500)."""
        lm = self.lm
        try:
            scored = tuple(prompt_logprobs(lm.model, prompt_ids, job.prompt_logprobs, lm.tokenizer.n_vocab,
                                           amp=lambda: dist.autocast(lm.device, lm.dtype)))
        except Exception as e:
            log.exception("scoring a prompt failed")
            job.events.put_nowait(Event(job.first_index, f"scoring the prompt failed: {type(e).__name__}: {e}",
                                        "error"))
            job.cancel()
            return False
        for i in range(job.first_index, job.first_index + len(job.continuations)):
            job.events.put_nowait(Event(i, "", logprobs=scored, prompt=True))
        return True

    def _drop_cancelled(self) -> None:
        for job in [j for j in self.waiting if j.cancelled]:
            self.waiting.remove(job)
        for job in [j for j in self.running if j.cancelled]:
            for c in job.continuations[: job.admitted]:
                if c.slot is not None:
                    self.decoder.remove(c)
            self._forget(job)

    def _publish(self, done: list[Continuation]) -> None:
        """Hand each running job its new text; finished continuations say so."""
        finished = {id(c) for c in done}
        for job in list(self.running):
            for i, c in enumerate(job.continuations[: job.admitted], start=job.first_index):
                text, logprobs = c.take_text(), tuple(c.take_logprobs())
                if id(c) in finished and c.error is not None:  # this request alone fails; its rows are freed
                    job.events.put_nowait(Event(i, f"decoding failed: {c.error}", "error"))
                    job.cancel()
                    break
                if id(c) in finished:
                    job.events.put_nowait(Event(i, text, c.finish_reason, c.n_new, logprobs=logprobs))
                    job.open -= 1
                elif text or logprobs:
                    job.events.put_nowait(Event(i, text, logprobs=logprobs))
            if job.open == 0:
                self._forget(job)

    def _fail_all(self, message: str) -> None:
        for job in list(self.running):
            job.events.put_nowait(Event(job.first_index, message, "error"))
            job.cancel()
        self._drop_cancelled()

    def _forget(self, job: Job) -> None:
        if job in self.running:
            self.running.remove(job)
