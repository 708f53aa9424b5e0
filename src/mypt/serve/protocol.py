"""The OpenAI HTTP API's shapes: request fields checked and turned into sampling settings,
responses and stream chunks as OpenAI's clients expect them, errors in OpenAI's error JSON.

No I/O and no model here: `mypt.serve.app` reads requests, runs them and sends these shapes.
Fields beyond OpenAI's that MyPT understands (as vLLM does): `top_k`, `repetition_penalty`,
`ignore_eot` (keep going past the end-of-text token, which otherwise ends the text: "stop") and
`lookup` (prompt-lookup decoding, generate.py's --lookup: the same tokens, sooner where the text
repeats its prompt).
Sampling values are checked against mypt.sampling's ranges (BOUNDS), the same as generate.py's.
Sampling fields left out take generate.py's defaults (mypt.sampling.SamplingConfig: temperature
0.8, top_k 200, top_p 1), so a request and `generate.py` with the same settings and seed give the
same text. An unknown field is refused (400, naming it) so that a typo is never silently ignored.

A completion's prompt is a string, a list of token ids, or a list of either (one prompt each, as
OpenAI's API and lm-evaluation-harness send them). `logprobs` (completions: 0 to 20 alternatives;
chat: true, with `top_logprobs` 0 to 20) asks for each token's log-probability under the model's
raw distribution (mypt.sampling.TokenLogprob); with `echo` the prompt's tokens come first.
"""

from __future__ import annotations

import reprlib
import time
import uuid
from dataclasses import dataclass
from typing import Any

from mypt.sampling import MAX_TOP_LOGPROBS, SamplingConfig, setting_problems

MAX_STOPS = 4  # as OpenAI
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "ignore_eot", "lookup",
                 "stop", "seed", "n", "stream", "stream_options", "user", "logprobs", "frequency_penalty",
                 "presence_penalty", "logit_bias"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "response_format",
                               "parallel_tool_calls", "tools", "tool_choice"}
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """An HTTP error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the server's flags)."""

    max_tokens: int = 1024
    max_prompt_tokens: int | None = None  # None: each model's block_size
    max_n: int = 16
    max_body_bytes: int = 1 << 20


@dataclass
class Request:
    """A completion or chat request, checked: what to generate and how to answer."""

    model: str
    prompts: list[str | list[int]] | None  # completions: text, or token ids
    messages: list[dict[str, str]] | None  # chat (roles mapped to system / user / assistant)
    max_tokens: int | None  # None: as many as the server allows (chat)
    sampling: dict[str, Any]  # SamplingConfig fields except max_new_tokens and seed
    seed: int | None
    n: int
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int | None = None  # None: no logprobs; else the alternatives per token

    def sampling_config(self, max_tokens: int, extra_stop: tuple[str, ...] = ()) -> SamplingConfig:
        stop = tuple(self.sampling.get("stop", ())) + extra_stop
        return SamplingConfig(**{**self.sampling, "stop": stop, "max_new_tokens": max_tokens})


def _int(body: dict, key: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad(key, f"must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        raise bad(key, f"must be from {low} to {high}, got {value}" if high is not None else
                  f"must be {low} or more, got {value}")
    return value


def _setting(body: dict, key: str, default: Any) -> Any:
    """A sampling setting, checked against mypt.sampling's one table of ranges (as generate.py's)."""
    value = body.get(key)
    if value is None:
        return default
    problems = setting_problems({key: value})
    if problems:
        raise bad(key, f"{problems[0][1]}, got {reprlib.repr(value)}")
    return value


def _bool(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(key, f"must be true or false, got {value!r}")
    return value


def _unsupported(body: dict, key: str, allowed: tuple[Any, ...], hint: str = "") -> None:
    if key in body and body[key] not in allowed:
        raise APIError(400, f"{key}: not supported by this server{hint}", param=key, code="unsupported_parameter")


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise bad("stop", f"must be a string or a list of at most {MAX_STOPS} strings")
    return _setting({"stop": tuple(s for s in stops if s)}, "stop", ())


def _stream_options(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad("stream_options", "is only allowed with stream: true")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad("stream_options", 'must be an object like {"include_usage": true}')
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad("stream_options.include_usage", f"must be true or false, got {include!r}")
    return include


def parse_request(body: Any, chat: bool, limits: Limits) -> Request:
    """Check a request body field by field; the first problem raises APIError(400) naming it."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    known = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for key in body:
        if key not in known:
            raise APIError(400, f"Unrecognized request argument supplied: {key}", param=key,
                           code="unrecognized_argument")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "is required: the name of a model from GET /v1/models", "missing_required_parameter")
    _unsupported(body, "frequency_penalty", (None, 0), " (use repetition_penalty, e.g. 1.2)")
    _unsupported(body, "presence_penalty", (None, 0), " (use repetition_penalty, e.g. 1.2)")
    _unsupported(body, "logit_bias", (None, {}))
    _unsupported(body, "suffix", (None, ""))
    _unsupported(body, "tools", (None, []))
    _unsupported(body, "tool_choice", (None, "none", "auto"))
    _unsupported(body, "response_format", (None, {"type": "text"}))
    stream = _bool(body, "stream")
    n = _int(body, "n", 1, 1, limits.max_n)
    _unsupported(body, "best_of", (None, n))
    max_tokens = _int(body, "max_tokens", None if chat else 16, 0, limits.max_tokens)
    if chat and body.get("max_completion_tokens") is not None:  # the newer name wins
        max_tokens = _int(body, "max_completion_tokens", None, 0, limits.max_tokens)
    d = SamplingConfig()
    top_k = 0 if body.get("top_k") == -1 else body.get("top_k")  # -1: off, as vLLM
    sampling = dict(temperature=_setting(body, "temperature", d.temperature), top_p=_setting(body, "top_p", d.top_p),
                    top_k=_setting({"top_k": top_k}, "top_k", d.top_k), stop=_stop(body),
                    repetition_penalty=_setting(body, "repetition_penalty", d.repetition_penalty),
                    ignore_eot=_bool(body, "ignore_eot"), lookup=_setting(body, "lookup", d.lookup))
    seed = _setting(body, "seed", None)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("user", "must be a string")
    return Request(model=model, prompts=None if chat else _prompts(body), messages=_messages(body) if chat else None,
                   max_tokens=max_tokens, sampling=sampling, seed=seed, n=n, stream=stream,
                   include_usage=_stream_options(body, stream), echo=False if chat else _bool(body, "echo"),
                   logprobs=_chat_logprobs(body) if chat else _int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS))


def _chat_logprobs(body: dict) -> int | None:
    """Chat's logprobs (true or false) and top_logprobs (0-20, only with logprobs true)."""
    wanted = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise bad("top_logprobs", "needs logprobs: true")
    return (top or 0) if wanted else None


def _token_ids(value: list, where: str) -> list[int]:
    if not value:
        raise bad(where, "must not be empty: a prompt of token ids needs at least one")
    for i, t in enumerate(value):
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise bad(f"{where}[{i}]", f"must be a token id (an integer, 0 or more), got {reprlib.repr(t)}")
    return value


def _prompts(body: dict) -> list[str | list[int]]:
    """A string, a list of token ids, or a non-empty list of strings or of lists of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        return [_token_ids(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    if isinstance(prompt, list) and prompt and not any(isinstance(p, (str, list)) for p in prompt):
        return [_token_ids(prompt, "prompt")]
    raise bad("prompt", "is required: a string, a list of token ids, or a list of strings or of token-id lists",
              "missing_required_parameter" if prompt is None else "invalid_value")


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise bad(where, "must be a string or a list of text parts (images and audio are not supported)")


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "is required: a non-empty list of {\"role\", \"content\"} objects",
                  "missing_required_parameter" if messages is None else "invalid_value")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, "must be an object with a role and a content")
        role = CHAT_ROLES.get(m["role"]) if isinstance(m.get("role"), str) else None
        if role is None:
            raise bad(f"{where}.role", f"must be one of {', '.join(CHAT_ROLES)}, got {m.get('role')!r}")
        out.append({"role": role, "content": _content(m.get("content"), f"{where}.content")})
    return out


# ----------------------------------------------------------------------------- responses


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(chat: bool, rid: str, model: str, texts: list[str], reasons: list[str], use: dict,
             logprobs: list[dict | None] | None = None) -> dict:
    """The whole answer of a non-streaming request (logprobs: each choice's, in mypt.serve.logprobs' shapes)."""
    logprobs = logprobs or [None] * len(texts)
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": lp,
                    "finish_reason": r} for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs, strict=True))]
    else:
        choices = [{"index": i, "text": t, "logprobs": lp, "finish_reason": r}
                   for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs, strict=True))]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": use}


def chunk(chat: bool, rid: str, model: str, index: int | None, text: str | None = None,
          finish_reason: str | None = None, use: dict | None = None, role: bool = False,
          logprobs: dict | None = None) -> dict:
    """One streamed chunk: new text and its tokens' logprobs (or the role, or the finish) of choice
    `index`; with index None the closing usage chunk."""
    choices = []
    if index is not None:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choices = [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]
        else:
            choices = [{"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}]
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
           "created": int(time.time()), "model": model, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out


def model_card(name: str, created: int, context: int, chat_template: str | None) -> dict[str, Any]:
    """A model object: OpenAI's fields, vLLM's max_model_len, and chat_template: the name of the chat
    template the model was fine-tuned with (null for a model that continues text)."""
    return {"id": name, "object": "model", "created": created, "owned_by": "mypt", "max_model_len": context,
            "chat_template": chat_template}
