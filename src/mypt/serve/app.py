"""The HTTP server: routes, authentication, request limits, streaming, and the page at `/`.

    GET  /                      the page (page.html): choose a model, type a prompt, watch it stream;
                                it opens in chat mode for a model with a chat template
    GET  /health                200 with each model's batch and queue once the models are loaded;
                                503 while a model's engine restarts after a failure, or once it
                                is out of service (its "error" says why)
    GET  /metrics               Prometheus metrics (mypt.serve.metrics)
    GET  /v1/models             the loaded models (the id is the model name; "chat_template" names a
                                fine-tuned model's chat template, null otherwise); /v1/models/{id}
    POST /v1/completions        OpenAI completions (a prompt of text or token ids; logprobs, echo);
                                "stream": true sends server-sent events
    POST /v1/chat/completions   OpenAI chat, the messages rendered by mypt.serve.chat

A Starlette application (ASGI) run by uvicorn. Each model has a Batcher; handlers check the
request (mypt.serve.protocol), tokenize it, queue it and relay its text. A bad request is one
OpenAI-shaped error and nothing else: the server goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import os
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mypt.api import LoadedModel
from mypt.errors import MyPTError
from mypt.sampling import fresh_seed
from mypt.serve import protocol
from mypt.serve.batcher import Batcher, Event, Job, OutOfService, Overloaded
from mypt.serve.chat import ModelTemplate, load_template
from mypt.serve.logprobs import ChoiceLogprobs, joined
from mypt.serve.metrics import CONTENT_TYPE, ServeMetrics
from mypt.serve.protocol import APIError, Limits

RETRY_AFTER_SECONDS = 1


class Server:
    """The models, their batchers and chat templates, the limits and the API key."""

    def __init__(self, models: list[LoadedModel], *, limits: Limits, max_batch: int, max_queue: int,
                 api_key: str | None, prefill_tokens: int = 512, prefix_cache_tokens: int | None = None) -> None:
        self.models = {lm.name: lm for lm in models}
        self.limits, self.api_key = limits, api_key
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = ServeMetrics()
        self.templates = {lm.name: load_template(lm.folder, lm.tokenizer) for lm in models}
        engine = dict(max_batch=max_batch, max_queue=max_queue, prefill_tokens=prefill_tokens,
                      prefix_cache_tokens=prefix_cache_tokens, metrics=self.metrics)
        self.batchers = {lm.name: _batcher(lm, engine) for lm in models}
        self.created = {lm.name: _created(lm) for lm in models}

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(b.run(), name=f"batcher {name}") for name, b in self.batchers.items()]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()

    def authorize(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>' "
                           "with the key the server was started with (--api_key or MYPT_API_KEY)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def model(self, name: str) -> LoadedModel:
        lm = self.models.get(name)
        if lm is None:
            raise APIError(404, f"The model '{name}' does not exist; this server has {', '.join(self.models)} "
                           "(GET /v1/models)", param="model", code="model_not_found")
        return lm

    def card(self, lm: LoadedModel) -> dict[str, Any]:
        """lm's model object for /v1/models."""
        trained = isinstance(self.templates[lm.name], ModelTemplate)
        return protocol.model_card(lm.name, self.created[lm.name], lm.config.block_size,
                                   lm.tokenizer.chat_format if trained else None)

    def prompt_limit(self, lm: LoadedModel) -> int:
        return self.limits.max_prompt_tokens or lm.config.block_size


def _batcher(lm: LoadedModel, engine: dict[str, Any]) -> Batcher:
    """lm's batcher with its KV cache allocated now, before the server listens."""
    try:
        return Batcher(lm, **engine)
    except (RuntimeError, MemoryError) as e:  # the cache does not fit (torch reports it as a RuntimeError)
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        max_batch = engine["max_batch"]
        raise MyPTError(f"--max_batch {max_batch}: the KV cache of '{lm.name}' for {max_batch} rows could not be "
                        f"allocated ({first}); use a smaller --max_batch") from None


def _created(lm: LoadedModel) -> int:
    try:
        return int(os.stat(lm.checkpoint.path).st_mtime)
    except OSError:
        return 0


# ----------------------------------------------------------------------------- request bodies


async def read_body(request: HTTPRequest, limit: int) -> Any:
    """The JSON body, at most `limit` bytes (413 beyond)."""
    too_big = APIError(413, f"The request body is larger than this server accepts ({limit:,} bytes; "
                       "--max_body_bytes)", code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    data = bytearray()
    try:
        async for part in request.stream():
            data += part
            if len(data) > limit:
                raise too_big
    except ClientDisconnect:  # gone, or closed by --request_timeout: nobody to answer
        raise APIError(400, "The client went away before its request body arrived") from None
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, a 5,000-digit number, deep nesting
        raise APIError(400, f"The body is not valid JSON ({e}); send a JSON object", code="invalid_json") from None


def encode(lm: LoadedModel, text: str | list[int], where: str, limit: int) -> list[int]:
    """A prompt's ids (given as ids, or rendered as ids by a fine-tuned model's chat template, they
    are checked against the vocabulary), checked against the limit. where: "prompt", "prompt[1]"..."""
    param = where.partition("[")[0]
    try:
        ids = lm.encode_prompt(text, where) if isinstance(text, str) else text
    except MyPTError as e:  # its message names `where` already
        raise APIError(400, str(e), param=param, code="invalid_value") from None
    n_vocab = lm.tokenizer.n_vocab
    outside = next((i for i, t in enumerate(ids) if t >= n_vocab), None)
    if outside is not None:
        raise APIError(400, f"{where}[{outside}]: token id {ids[outside]} is not in the vocabulary of '{lm.name}' "
                       f"(ids 0 to {n_vocab - 1})", param=param, code="invalid_value")
    if len(ids) > limit:
        raise APIError(400, f"{where}: {len(ids)} tokens, more than this server accepts for '{lm.name}' "
                       f"({limit}; its context is {lm.config.block_size} tokens)", param=param,
                       code="context_length_exceeded")
    return ids


# ----------------------------------------------------------------------------- generation


class Generation:
    """One checked request queued on its model's batcher: one job per prompt, n choices each."""

    def __init__(self, server: Server, req: protocol.Request, chat: bool) -> None:
        self.req, self.chat = req, chat
        self.status = 200  # the request's HTTP status, once it fails
        lm = server.model(req.model)
        self.batcher = server.batchers[lm.name]
        self.id = protocol.new_id(chat)
        extra_stop: tuple[str, ...] = ()
        stop_ids: tuple[int, ...] = ()
        if chat:
            template = server.templates[lm.name]
            try:
                prompts: list[Any] = [template.render(req.messages)]
            except MyPTError as e:  # a fine-tuned model's template encodes the messages; its message names them
                raise APIError(400, str(e), param="messages", code="invalid_value") from None
            extra_stop, stop_ids = template.stop, template.stop_ids
        else:
            prompts = req.prompts
            if len(prompts) > self.batcher.max_queue:  # could never all wait at once: not worth a retry
                raise APIError(400, f"prompt: {len(prompts)} prompts in one request, more than this server queues "
                               f"({self.batcher.max_queue}; --max_queue); send them in smaller requests",
                               param="prompt", code="invalid_value")
        ids = self._prompt_ids(server, lm, prompts)
        echo = req.echo and not chat
        self.echo = [(p if isinstance(p, str) else lm.tokenizer.decode(p)) if echo else "" for p in prompts]
        self.tokenizer = lm.tokenizer
        self.prompt_tokens = sum(len(i) for i in ids)
        max_tokens = server.limits.max_tokens if req.max_tokens is None else req.max_tokens
        cfg = dataclasses.replace(req.sampling_config(max_tokens, extra_stop), stop_ids=stop_ids)
        seed = fresh_seed() if req.seed is None else req.seed
        self.jobs: list[Job] = []
        self.queue: asyncio.Queue = asyncio.Queue()  # the text of every choice, as the batcher steps
        try:
            for j, p in enumerate(ids):
                self.jobs.append(self.batcher.submit(p, cfg, [seed + i for i in range(req.n)], self.queue, j * req.n,
                                                     logprobs=req.logprobs, echo=req.echo))
        except Overloaded as e:
            self.cancel()
            raise APIError(503, f"The server is busy ({e}); retry after {RETRY_AFTER_SECONDS} s", type="server_error",
                           code="overloaded", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except OutOfService as e:
            self.cancel()
            raise APIError(503, f"The model '{lm.name}' is out of service: {e}; restart the server",
                           type="server_error", code="model_unavailable") from None
        self.strip = [chat] * (len(ids) * req.n)  # a chat reply's leading spaces are dropped

    def _prompt_ids(self, server: Server, lm: LoadedModel, prompts: list[Any]) -> list[list[int]]:
        """Each prompt's ids, checked against the server's limit (and the model's block_size when
        its logprobs are scored)."""
        param = "messages" if self.chat else "prompt"
        names = [param] if len(prompts) == 1 else [f"{param}[{j}]" for j in range(len(prompts))]
        ids = [encode(lm, p, name, server.prompt_limit(lm)) for p, name in zip(prompts, names, strict=True)]
        longest = max(map(len, ids))
        scored = self.req.logprobs is not None and self.req.echo
        if scored and lm.config.position != "rope" and longest > lm.config.block_size:
            raise APIError(400, f"prompt: {longest} tokens; echo with logprobs scores at most {lm.config.block_size} "
                           f"on '{lm.name}' (its block_size: learned positions cannot slide)", param="prompt",
                           code="context_length_exceeded")
        return ids

    @property
    def choices(self) -> int:
        return len(self.jobs) * self.req.n

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()
        self.batcher.wake()

    def text(self, index: int, text: str) -> str:
        if self.strip[index] and text:
            text = text.lstrip()
            self.strip[index] = not text
        return text

    def formatter(self) -> ChoiceLogprobs:
        """A choice's logprobs in OpenAI's shape for this request."""
        return ChoiceLogprobs(self.tokenizer, self.chat)

    async def events(self) -> AsyncIterator[Event]:
        """The batcher's events (their text as the choice shows it) until every choice is done."""
        open_choices = self.choices
        while open_choices:
            ev = await self.queue.get()
            if ev.finish_reason == "error":
                self.status = ev.status
                raise APIError(ev.status, ev.text, type="server_error",
                               code="model_unavailable" if ev.status == 503 else "internal_error")
            if ev.finish_reason is not None:
                open_choices -= 1
            yield dataclasses.replace(ev, text=self.text(ev.index, ev.text))


async def _until_disconnect(request: HTTPRequest) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def answer_whole(request: HTTPRequest, gen: Generation) -> Response:
    """Wait for every choice (the request is cancelled if the client goes away first)."""
    texts, reasons, completion = [""] * gen.choices, [""] * gen.choices, 0
    scored: list[list] = [[] for _ in range(gen.choices)]  # each choice's prompt TokenLogprobs (echo)
    new: list[list] = [[] for _ in range(gen.choices)]  # and its new tokens'

    async def collect() -> None:
        nonlocal completion
        async for ev in gen.events():
            texts[ev.index] += ev.text
            (scored if ev.prompt else new)[ev.index].extend(ev.logprobs)
            if ev.finish_reason is not None:
                reasons[ev.index], completion = ev.finish_reason, completion + ev.completion_tokens

    work, gone = asyncio.create_task(collect()), asyncio.create_task(_until_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        work.cancel()  # a no-op when it finished
        gen.cancel()  # finished: a no-op; failed or abandoned: its waiting prompts leave the queue too
    if not work.done() or work.cancelled():
        return Response(status_code=499)  # nobody is listening
    work.result()  # raises the request's APIError, if any
    echoes = [e for e in gen.echo for _ in range(gen.req.n)]
    logprobs = None
    if gen.req.logprobs is not None:
        logprobs = [_whole_logprobs(gen.formatter(), s, n, len(e)) for s, n, e in zip(scored, new, echoes, strict=True)]
    texts = [e + t for e, t in zip(echoes, texts, strict=True)]
    body = protocol.response(gen.chat, gen.id, gen.req.model, texts, reasons,
                             protocol.usage(gen.prompt_tokens, completion), logprobs)
    return JSONResponse(body)


def _whole_logprobs(formatter: ChoiceLogprobs, scored: list, new: list, echo_chars: int) -> dict:
    """A choice's logprobs: the echoed prompt's tokens (if any), then the new ones from echo_chars on."""
    if not scored:
        return formatter.format(new)
    prompt = formatter.format(scored)
    formatter.restart(echo_chars)
    return joined(prompt, formatter.format(new))


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def counted(stream: AsyncIterator[str], gen: Generation, metrics: ServeMetrics) -> AsyncIterator[str]:
    """The stream, counted in mypt_requests_total when it ends (499 if its client went away)."""
    status = 499
    try:
        async for piece in stream:
            yield piece
        status = gen.status
    finally:
        metrics.answered(status)


async def stream_events(gen: Generation) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text, a finish per choice, then data: [DONE]."""
    chat, rid, model = gen.chat, gen.id, gen.req.model
    completion = 0
    scoring = gen.req.logprobs is not None
    formatters = [gen.formatter() for _ in range(gen.choices)]
    try:
        for index in range(gen.choices):
            echo = gen.echo[index // gen.req.n]
            if chat:
                yield _sse(protocol.chunk(True, rid, model, index, role=True))
            elif echo and not scoring:  # else sent with the prompt's logprobs
                yield _sse(protocol.chunk(False, rid, model, index, echo))
        async for ev in gen.events():
            index, lp = ev.index, None
            if ev.logprobs:
                lp = formatters[index].format(ev.logprobs)
            if ev.prompt:
                formatters[index].restart(len(gen.echo[index // gen.req.n]))
                yield _sse(protocol.chunk(False, rid, model, index, gen.echo[index // gen.req.n], logprobs=lp))
            elif ev.text or lp:
                yield _sse(protocol.chunk(chat, rid, model, index, ev.text, logprobs=lp))
            if ev.finish_reason is not None:
                completion += ev.completion_tokens
                yield _sse(protocol.chunk(chat, rid, model, index, None, ev.finish_reason))
        if gen.req.include_usage:
            yield _sse(protocol.chunk(chat, rid, model, None, use=protocol.usage(gen.prompt_tokens, completion)))
    except APIError as e:
        yield _sse(e.body())
    finally:
        gen.cancel()  # finished: a no-op; the client went away: its rows are freed before the next step
    yield _sse("[DONE]")


# ----------------------------------------------------------------------------- routes


def create_app(server: Server) -> Starlette:
    """The ASGI application serving `server`'s models."""

    page_html = resources.files("mypt.serve").joinpath("page.html").read_text(encoding="utf-8")

    async def page(request: HTTPRequest) -> Response:
        return HTMLResponse(page_html)

    async def health(request: HTTPRequest) -> Response:
        ok = all(b.healthy for b in server.batchers.values())
        return JSONResponse({"status": "ok" if ok else "error",
                             "models": {name: b.stats() for name, b in server.batchers.items()}},
                            status_code=200 if ok else 503)

    async def metrics(request: HTTPRequest) -> Response:
        return Response(server.metrics.text(), media_type=CONTENT_TYPE)

    async def models(request: HTTPRequest) -> Response:
        server.authorize(request)
        return JSONResponse({"object": "list", "data": [server.card(lm) for lm in server.models.values()]})

    async def one_model(request: HTTPRequest) -> Response:
        server.authorize(request)
        lm = server.model(request.path_params["model"])
        return JSONResponse(server.card(lm))

    def generation_route(chat: bool):
        async def handle(request: HTTPRequest) -> Response:
            status = 500
            try:
                server.authorize(request)
                body = await read_body(request, server.limits.max_body_bytes)
                gen = Generation(server, protocol.parse_request(body, chat, server.limits), chat)
                if gen.req.stream:
                    status = None  # counted when the stream ends
                    return StreamingResponse(counted(stream_events(gen), gen, server.metrics),
                                             media_type="text/event-stream",
                                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
                response = await answer_whole(request, gen)
                status = response.status_code
                return response
            except APIError as e:
                status = e.status
                raise
            finally:
                if status is not None:
                    server.metrics.answered(status)

        return handle

    routes = [
        Route("/", page),
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/models", models),
        Route("/v1/models/{model:path}", one_model),
        Route("/v1/completions", generation_route(False), methods=["POST"]),
        Route("/v1/chat/completions", generation_route(True), methods=["POST"]),
    ]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=server.lifespan)


async def _api_error(request: HTTPRequest, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: HTTPRequest, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    what = {404: f"No route {request.url.path}; the API is under /v1 (GET /v1/models)",
            405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return JSONResponse(APIError(exc.status_code, what, code="not_found" if exc.status_code == 404 else None).body(),
                        status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: HTTPRequest, exc: Exception) -> Response:
    return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body(),
                        status_code=500)
