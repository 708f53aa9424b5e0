"""The serving engine of one loaded model: continuous batching in a thread of its own.

`Batcher` owns a `mypt.sampling.Decoder` (the decoding step generate.py uses too) and runs it in
a dedicated engine thread, so the event loop never waits for the model: /health, the page and
every stream stay responsive while a step runs. The loop and the engine meet in two places
only: `submit` puts a job on the waiting queue (under a lock) and wakes the engine; the engine
hands each job its text through the job's asyncio.Queue, with `loop.call_soon_threadsafe`, once
per step.

Between steps the engine drops the jobs whose clients went away and gives waiting continuations
the free rows of the KV cache. Each step gives every continuation whose prompt is in the cache
one token. Prompts enter the cache at most a chunk of tokens a step (chunked prefill): whole
prompts in arrival order while they fit, a longer one cut. So a long prompt delays the streams'
next token by one chunk at most, and of many prompts arriving at once the first start streaming
after one chunk's step, not after all of them. While some rows stream, the chunk is steered by
measured step times so that a step with prefill takes about STALL times a plain decoding step
(at least MIN_CHUNK tokens, at most `prefill_tokens`; ChunkSizer); it is `prefill_tokens`
while more rows wait for their prompt than stream. A prefix cache
(mypt.kvcache.PrefixCache, `prefix_cache_tokens`) keeps the keys and values of prompt starts
seen before. A job that asks for its prompt's logprobs (echo) gets them from one forward pass
over the prompt (mypt.sampling.prompt_logprobs) as it joins, before its first token; its
continuations record their tokens' logprobs as they step.

Failures. A continuation whose logits are not finite fails its own request (500) while the
others go on. Anything the engine raises (a step, an allocation) is an engine failure: the
requests in the batch get a 500 in OpenAI's shape, /health says 503 with the reason, and the
engine restarts with a fresh decoder and cache; the waiting requests are then served. A second
failure puts the model out of service: every request waiting gets 503, later ones are refused
with 503 at once, and /health stays 503 with the reason. Nothing waits for an engine that is gone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from mypt import dist
from mypt.api import LoadedModel
from mypt.kvcache import PrefixCache
from mypt.sampling import Continuation, Decoder, SamplingConfig, TokenLogprob, prompt_logprobs
from mypt.serve.metrics import ServeMetrics

log = logging.getLogger("mypt.serve")

MAX_RESTARTS = 1  # a failed engine restarts once; the next failure puts the model out of service
PREFIX_BLOCK = 16  # tokens per prefix-cache block
STALL = 2.5  # a step that prefills may take this many plain decoding steps' time
MIN_CHUNK = 8  # prompt tokens per step at least, however slow the prefill


class Overloaded(Exception):
    """The queue is full: the request is refused (HTTP 503 with Retry-After)."""


class OutOfService(Exception):
    """The engine failed more often than it may restart: no request can be served until a restart."""


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
        self.submitted = time.perf_counter()
        self.first_token: float | None = None  # when its first token came
        self.tokens = [0] * len(continuations)  # tokens seen so far per continuation, and when the last came
        self.last = [0.0] * len(continuations)

    def cancel(self) -> None:
        """The client went away: the job's rows are freed before the next step."""
        self.cancelled = True


class ChunkSizer:
    """The prefill chunk: prompt tokens a step may feed, in all.

    Each step is measured in two parts: the forward passes that fed prompt tokens and the rest,
    which is what the step would have taken without them (the decoding rows' pass, sampling).
    From running means of the rest (`decode_s`) and of the seconds per prompt token (`token_s`:
    it includes each prefill pass's fixed cost, so a small chunk measures dear and the next one
    is larger, until a step with prefill takes STALL plain steps), the chunk is the number of
    prompt tokens that keeps a step within STALL plain steps: (STALL - 1) * decode_s / token_s,
    within MIN_CHUNK .. `largest`; MIN_CHUNK before a prompt token was measured. It follows
    the batch: more rows decoding make a longer plain step and a larger chunk. `largest` while
    nothing streams, or while more rows wait for their prompt than stream (63 new requests must
    not queue behind one stream).
    """

    def __init__(self, largest: int) -> None:
        self.largest, self.smallest = largest, min(MIN_CHUNK, largest)
        self.decode_s: float | None = None  # running mean of a step without its prefill
        self.token_s: float | None = None  # running mean of prefill seconds per prompt token

    @property
    def chunk(self) -> int:
        if self.decode_s is None or self.token_s is None:
            return self.smallest
        return max(self.smallest, min(self.largest, int((STALL - 1) * self.decode_s / max(self.token_s, 1e-9))))

    def size(self, streaming: int, prefilling: int) -> int:
        return self.chunk if 0 < streaming and prefilling <= streaming else self.largest

    def observe(self, seconds: float, prefilled: int, prefill_seconds: float) -> None:
        """A step took `seconds`, of which `prefill_seconds` fed `prefilled` prompt tokens."""
        plain = max(seconds - prefill_seconds, 1e-6)
        self.decode_s = plain if self.decode_s is None else 0.7 * self.decode_s + 0.3 * plain
        if prefilled:
            per = prefill_seconds / prefilled
            self.token_s = per if self.token_s is None else 0.5 * self.token_s + 0.5 * per


class Batcher:
    """Schedules the requests of one model onto a Decoder of `max_batch` rows, in an engine thread."""

    def __init__(self, lm: LoadedModel, *, max_batch: int, max_queue: int, prefill_tokens: int = 512,
                 prefix_cache_tokens: int | None = None, metrics: ServeMetrics | None = None) -> None:
        self.lm, self.max_batch = lm, max_batch
        self.max_queue, self.prefill_tokens = max_queue, prefill_tokens
        block = lm.config.block_size
        self.prefix_cache_tokens = 8 * block if prefix_cache_tokens is None else prefix_cache_tokens
        self.metrics = metrics or ServeMetrics()
        self.decoder = self._new_decoder()
        self.waiting: deque[Job] = deque()  # shared with the loop: under _lock
        self.running: list[Job] = []  # the engine's own
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._outbox: list[tuple[Job, Event]] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.steps = 0
        self.failed_steps = 0
        self.restarts = 0
        self.error: str | None = None  # the latest engine failure
        self.restarting: str | None = None  # why, while the engine restarts
        self.stopped: str | None = None  # why the model is out of service, if it is
        self.chunks = ChunkSizer(prefill_tokens)

    def _new_decoder(self) -> Decoder:
        """A decoder with its KV cache allocated now (not on the first request), in the compute dtype."""
        lm = self.lm
        prefix = None
        if self.prefix_cache_tokens >= PREFIX_BLOCK:
            prefix = PrefixCache(PREFIX_BLOCK, self.prefix_cache_tokens)
        decoder = Decoder(lm.model, self.max_batch, amp=lambda: dist.autocast(lm.device, lm.dtype),
                          dtype=dist.TORCH_DTYPES[lm.dtype], prefill_chunk=self.prefill_tokens, prefix_cache=prefix)
        decoder.cache  # noqa: B018 - allocate it now
        return decoder

    # ------------------------------------------------------------------ the event loop's side

    def submit(self, prompt_ids: Sequence[int], cfg: SamplingConfig, seeds: Sequence[int],
               events: asyncio.Queue[Event], first_index: int = 0, *, logprobs: int | None = None,
               echo: bool = False) -> Job:
        """Queue one prompt of len(seeds) choices (choice first_index + i samples with seeds[i]);
        their text arrives in `events`. logprobs: None, or the alternatives per token recorded for
        the new tokens, and with echo for the prompt's too."""
        if self.stopped is not None:
            raise OutOfService(self.stopped)
        tok = self.lm.tokenizer
        job = Job([Continuation(prompt_ids, cfg, seed=seed, vocab_size=tok.sampled_vocab, tokenizer=tok,
                                eot_id=tok.eot_id, logprobs=logprobs) for seed in seeds], events, first_index,
                  logprobs if echo else None)
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                raise Overloaded(f"'{self.lm.name}' has {self.max_queue} requests waiting already")
            self.waiting.append(job)
        self._wake.set()
        return job

    def wake(self) -> None:
        self._wake.set()

    def stats(self) -> dict[str, int | str | None]:
        return {"slots": self.decoder.slots, "active": len(self.decoder.active), "waiting": len(self.waiting),
                "steps": self.steps, "failed_steps": self.failed_steps, "restarts": self.restarts,
                "error": self.stopped or self.restarting, "last_error": self.error}

    @property
    def healthy(self) -> bool:
        return self.stopped is None and self.restarting is None

    async def run(self) -> None:
        """Start the engine thread and keep it for the server's lifetime (cancel this to stop it)."""
        self.loop = asyncio.get_running_loop()
        thread = threading.Thread(target=self._supervise, name=f"mypt engine {self.lm.name}", daemon=True)
        thread.start()
        try:
            await asyncio.Future()  # until the server shuts down
        finally:
            self._closing = True
            self._wake.set()

    def _deliver(self, batch: list[tuple[Job, Event]]) -> None:
        for job, event in batch:
            job.events.put_nowait(event)

    # ------------------------------------------------------------------ the engine thread

    def _post(self, job: Job, event: Event) -> None:
        self._outbox.append((job, event))

    def _flush(self) -> None:
        """Hand the loop this step's events, in one callback."""
        if self._outbox and self.loop is not None:
            batch, self._outbox = self._outbox, []
            try:
                self.loop.call_soon_threadsafe(self._deliver, batch)
            except RuntimeError:  # the loop is closed: the server is gone
                self._closing = True

    def _supervise(self) -> None:
        """The engine thread: run the loop; on a failure fail its requests and restart it once."""
        while not self._closing:
            try:
                self._loop()
            except BaseException as e:  # noqa: BLE001 - whatever it is, the requests must hear of it
                if not self._recover(f"{type(e).__name__}: {e}"):
                    return

    def _recover(self, reason: str) -> bool:
        """After an engine failure: fail the batch's requests (500), then restart with a fresh
        decoder (True), or, past MAX_RESTARTS, put the model out of service (False)."""
        log.exception("the engine of '%s' failed", self.lm.name)
        self.failed_steps += 1
        self.error = self.restarting = reason
        for job in self.running:
            self._post(job, Event(job.first_index, f"decoding failed: {reason}", "error"))
        with self._lock:
            for job in self.running:
                if job in self.waiting:  # some of its choices were still waiting for a row
                    self.waiting.remove(job)
        self.running = []
        if self.restarts < MAX_RESTARTS:
            try:
                self.decoder.reset()
                self.decoder = self._new_decoder()
                self.restarts += 1
                self.restarting = None
                self._flush()
                return True
            except BaseException as e:  # noqa: BLE001
                reason = f"{reason}; its restart failed too ({type(e).__name__}: {e})"
        self.stopped = f"its engine failed {self.failed_steps} times, the last time with {reason}"
        self.restarting = None
        with self._lock:
            waiting, self.waiting = list(self.waiting), deque()
        for job in waiting:
            self._post(job, Event(job.first_index, f"The model '{self.lm.name}' is out of service: {self.stopped}; "
                                  "restart the server", "error", status=503))
        self._flush()
        return False

    def _loop(self) -> None:
        while not self._closing:
            self._drop_cancelled()
            self._admit()
            if not self.decoder.active:
                self._flush()
                self._wake.clear()
                if not self.waiting:
                    self._wake.wait(timeout=1.0)
                continue
            self.metrics.batch_size.set(len(self.decoder.active))
            streaming = sum(c.n_new > 0 for c in self.decoder.active)
            self.decoder.prefill_chunk = self.chunks.size(streaming, len(self.decoder.active) - streaming)
            started = time.perf_counter()
            done = self.decoder.step()
            self.chunks.observe(time.perf_counter() - started, self.decoder.prefilled, self.decoder.prefill_seconds)
            self.steps += 1
            self._publish(done)
            self._flush()

    def _admit(self) -> None:
        """Waiting continuations take the free rows, in arrival order (the decoder meters their
        prefill); a prompt start found in the prefix cache is copied in."""
        now = time.perf_counter()
        while self.decoder.free_slots:
            with self._lock:
                if not self.waiting:
                    return
                job = self.waiting[0]
                if job.admitted + 1 == len(job.continuations):
                    self.waiting.popleft()
            c = job.continuations[job.admitted]
            if job.admitted == 0:  # running before its row is taken: should that fail, the job hears of it
                self.running.append(job)
                self.metrics.queue_time.observe(now - job.submitted)
                if job.prompt_logprobs is not None and not self._send_prompt_logprobs(job, c.tokens):
                    continue  # failed alone
            self.decoder.add(c)
            job.admitted += 1
            if c.reused:
                self.metrics.prefix_hits.inc()
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
            self._post(job, Event(job.first_index, f"scoring the prompt failed: {type(e).__name__}: {e}", "error"))
            job.cancel()
            self._forget(job)
            with self._lock:
                if job in self.waiting:
                    self.waiting.remove(job)
            return False
        for i in range(job.first_index, job.first_index + len(job.continuations)):
            self._post(job, Event(i, "", logprobs=scored, prompt=True))
        return True

    def _drop_cancelled(self) -> None:
        with self._lock:
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
        now = time.perf_counter()
        for job in list(self.running):
            for j, c in enumerate(job.continuations[: job.admitted]):
                i = job.first_index + j
                self._timing(job, j, c.n_new, now)
                text, logprobs = c.take_text(), tuple(c.take_logprobs())
                if id(c) in finished and c.error is not None:  # this request alone fails; its rows are freed
                    self._post(job, Event(i, f"decoding failed: {c.error}", "error"))
                    job.cancel()
                    break
                if id(c) in finished:
                    self._post(job, Event(i, text, c.finish_reason, c.n_new, logprobs=logprobs))
                    job.open -= 1
                elif text or logprobs:
                    self._post(job, Event(i, text, logprobs=logprobs))
            if job.open == 0:
                self._forget(job)

    def _timing(self, job: Job, j: int, n_new: int, now: float) -> None:
        """Observe time to first token and the gaps between tokens of continuation j of job."""
        if n_new > job.tokens[j]:
            if job.first_token is None:
                job.first_token = now
                self.metrics.ttft.observe(now - job.submitted)
            if job.tokens[j]:
                self.metrics.inter_token.observe(now - job.last[j])
            job.tokens[j], job.last[j] = n_new, now

    def _forget(self, job: Job) -> None:
        if job in self.running:
            self.running.remove(job)
