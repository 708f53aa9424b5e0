"""Tests for `mypt serve`: the real `openai` client against a real server on 127.0.0.1.

Two tiny char-level models are trained once by train.py: 'chars' (learned positions) and 'rope'
(rotary). A server runs them in a thread of this process; the command line is tested as a
child process. Every answer is checked against what generate.py or the Python API gives for
the same prompt, seed and settings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, require, run_cli
from serving import running_server, train_models

from mypt.api import LoadedModel, load_model

openai = require("openai")
httpx = require("httpx")

PROMPT = "ROMEO:\nWhat"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_models(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def url(ckpts: Path):
    with running_server(ckpts, ["chars", "rope"], max_batch=4, max_queue=16, max_tokens=200,
                        max_prompt_tokens=128, max_body_bytes=4096) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def models(ckpts: Path) -> dict[str, LoadedModel]:
    return {name: load_model(name, ckpts, device="cpu", dtype="fp32") for name in ("chars", "rope")}


def solo(lm: LoadedModel, prompt: str, *, max_tokens: int, seed: int = 0, **options) -> str:
    """What the Python API (one continuation, alone) gives with the same settings (the server's
    defaults are generate.py's)."""
    return lm.generate(prompt, max_new_tokens=max_tokens, seed=seed, **options)


def complete(client, model: str = "chars", prompt: str = PROMPT, **kw):
    return client.completions.create(model=model, prompt=prompt, **kw)


def error_of(exc: pytest.ExceptionInfo) -> dict:
    body = exc.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# ----------------------------------------------------------------------------- the API


@pytest.mark.parametrize("name", ["chars", "rope"])
def test_greedy_completion_equals_generate_py(client, ckpts: Path, name: str) -> None:
    r = run_cli("--model_name", name, "--checkpoints_dir", str(ckpts), "--prompt", PROMPT, "--max_new_tokens", "60",
                "--temperature", "0", "--device", "cpu", script="generate.py", cwd=ckpts.parent)
    assert r.returncode == 0, r.stderr
    answer = complete(client, name, max_tokens=60, temperature=0)
    assert r.stdout == PROMPT + answer.choices[0].text + "\n"
    text = answer.choices[0].text
    assert answer.choices[0].finish_reason == ("length" if len(text) == 60 else "stop") and answer.model == name
    assert answer.usage.prompt_tokens == len(PROMPT) and answer.usage.completion_tokens == len(text)  # a char a token
    assert len(set(answer.choices[0].text)) > 3  # a trained model's text, not one repeated character


@pytest.mark.parametrize("name", ["chars", "rope"])
def test_lookup_opt_in_gives_the_same_text_greedy_and_seeded(client, models, name: str) -> None:
    """A request with lookup (generate.py's --lookup) gets plain decoding's text, past block_size,
    whether its drafts hold (a prompt that repeats) or not; sampled with a seed, the same too."""
    repeating = "To be or not to be. " * 3
    for prompt, kw in ((repeating, dict(temperature=0)), (PROMPT, dict(temperature=0)),
                       (repeating, dict(temperature=0.9, seed=3))):
        plain = complete(client, name, prompt, max_tokens=120, **kw).choices[0].text
        drafted = complete(client, name, prompt, max_tokens=120, extra_body={"lookup": 8}, **kw).choices[0].text
        assert drafted == plain == solo(models[name], prompt, max_tokens=120, **{"seed": 0, **kw})
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, name, max_tokens=5, extra_body={"lookup": 65})
    assert error_of(e)["param"] == "lookup"


def test_models_are_listed_by_name(client) -> None:
    assert sorted(m.id for m in client.models.list().data) == ["chars", "rope"]
    assert client.models.retrieve("rope").id == "rope"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_sampled_completion_repeats_with_its_seed_and_equals_solo(client, models) -> None:
    kw = dict(max_tokens=50, temperature=0.9, top_p=0.9, seed=7)
    a, b = (complete(client, **kw).choices[0].text for _ in range(2))
    assert a == b == solo(models["chars"], PROMPT, **kw)
    assert complete(client, **{**kw, "seed": 8}).choices[0].text != a
    defaults = complete(client, max_tokens=50, seed=7).choices[0].text  # temperature 0.8, top_k 200
    assert defaults == models["chars"].generate(PROMPT, max_new_tokens=50, seed=7) != a


def test_n_choices_use_consecutive_seeds(client, models) -> None:
    answer = complete(client, max_tokens=30, temperature=1.0, seed=11, n=3)
    texts = [c.text for c in sorted(answer.choices, key=lambda c: c.index)]
    assert texts == [solo(models["chars"], PROMPT, max_tokens=30, temperature=1.0, seed=11 + i) for i in range(3)]
    assert len(set(texts)) == 3 and answer.usage.completion_tokens == sum(map(len, texts))


def test_stop_string_ends_the_text(client) -> None:
    full = complete(client, max_tokens=80, temperature=0).choices[0].text
    stop = full[20:23]
    cut = complete(client, max_tokens=80, temperature=0, stop=[stop, "@@"]).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_echo_and_a_list_of_prompts(client) -> None:
    plain = complete(client, max_tokens=20, seed=2).choices[0].text
    echoed = complete(client, max_tokens=20, seed=2, echo=True).choices[0].text
    assert echoed == PROMPT + plain
    streamed = "".join(c.choices[0].text for c in complete(client, max_tokens=20, seed=2, echo=True, stream=True))
    assert streamed == echoed
    both = complete(client, prompt=[PROMPT, "JULIET:"], max_tokens=20, seed=2, n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3] and both.choices[0].text == plain
    assert both.usage.prompt_tokens == len(PROMPT) + len("JULIET:")
    assert both.usage.completion_tokens == sum(len(c.text) for c in both.choices)


def test_streaming_sends_the_same_text_then_done(client, url: str) -> None:
    kw = dict(max_tokens=40, temperature=0.8, seed=3)
    whole = complete(client, **kw).choices[0].text
    chunks = list(complete(client, stream=True, stream_options={"include_usage": True}, **kw))
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 5  # piece by piece
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == len(whole)
    raw = httpx.post(url + "/v1/completions", json={"model": "chars", "prompt": PROMPT, "stream": True, **kw}).text
    assert raw.startswith("data: {") and raw.endswith("data: [DONE]\n\n")


def test_chat_renders_the_documented_template(client) -> None:
    messages = [{"role": "system", "content": "A play."}, {"role": "user", "content": "Who art thou?"},
                {"role": "assistant", "content": "A friend."}, {"role": "user", "content": "Speak!"}]
    reply = client.chat.completions.create(model="rope", messages=messages, max_tokens=60, temperature=0.7, seed=5)
    rendered = "A play.\n\nUser: Who art thou?\nAssistant: A friend.\nUser: Speak!\nAssistant:"
    same = complete(client, "rope", rendered, max_tokens=60, temperature=0.7, seed=5, stop=["\nUser:"]).choices[0]
    assert reply.choices[0].message.content == same.text.lstrip()
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == same.finish_reason
    streamed = client.chat.completions.create(model="rope", messages=messages, max_tokens=60, temperature=0.7,
                                              seed=5, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == reply.choices[0].message.content


def test_a_models_own_chat_template(ckpts: Path) -> None:
    from mypt.errors import MyPTError
    from mypt.serve.chat import ChatTemplate, load_template

    folder = ckpts / "chars"
    assert load_template(folder) == ChatTemplate()
    (folder / "chat_template.json").write_text('{"user": "Q: {content}\\n", "generation_prompt": "A:", '
                                               '"stop": ["\\nQ:"]}', encoding="utf-8")
    try:
        template = load_template(folder)
        assert template.render([{"role": "user", "content": "Why?"}]) == "Q: Why?\nA:"
        assert template.stop == ("\nQ:",)
        (folder / "chat_template.json").write_text('{"user": "Q:"}', encoding="utf-8")
        with pytest.raises(MyPTError, match=r"chat_template.json: 'user' must contain \{content\}"):
            load_template(folder)
    finally:
        (folder / "chat_template.json").unlink()


# ----------------------------------------------------------------------------- logprobs


def reference_logprobs(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    """(T, vocab) log_softmax of a direct full forward pass: row t scores the token after ids[t]."""
    with torch.no_grad():
        logits, _ = lm.model(torch.tensor([ids]))
    return logits[0].float().log_softmax(-1)


def check_offsets(lp, text: str) -> None:
    """Each token's text sits at its text_offset in the choice's text (a char tokenizer: one char a token)."""
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
        assert text[offset: offset + len(token)] == token


@pytest.mark.parametrize("name", ["chars", "rope"])
def test_echoed_token_id_prompt_logprobs_equal_a_full_forward_pass(client, models, name: str) -> None:
    lm = models[name]
    ids = lm.tokenizer.encode("ROMEO:\nWhat say you, my lord?")
    answer = complete(client, name, prompt=ids, echo=True, logprobs=3, max_tokens=0, temperature=0)
    choice = answer.choices[0]
    lp, ref = choice.logprobs, reference_logprobs(lm, ids)
    assert choice.text == lm.tokenizer.decode(ids) and choice.finish_reason == "length"
    assert lp.tokens == [lm.tokenizer.decode([t]) for t in ids] and lp.text_offset == list(range(len(ids)))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), expected, atol=1e-4)
    for t, top, row in zip(lp.tokens[1:], lp.top_logprobs[1:], ref[:-1], strict=True):
        best = row[: lm.tokenizer.n_vocab].topk(3)
        assert list(top.values())[:3] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert t in top and len(top) in (3, 4)  # the 3 likeliest, and the token itself
    assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == 0


def test_a_batch_of_token_id_lists_as_lm_eval_sends_it(url: str, models) -> None:
    """lm-evaluation-harness 0.4's local-completions request: one choice per list, in order, each
    with the prompt's logprobs and one new token's."""
    tok = models["chars"].tokenizer
    prompts = [tok.encode("ROMEO:\nWhat"), tok.encode("JULIET:\nO Romeo, Romeo"), tok.encode("A")]
    body = {"model": "chars", "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    choices = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    for ids, choice in zip(prompts, choices, strict=True):
        lp = choice["logprobs"]
        ref = reference_logprobs(models["chars"], ids)
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(ids) + 1
        assert lp["token_logprobs"][1:-1] == pytest.approx(ref[range(len(ids) - 1), ids[1:]].tolist(), abs=1e-4)
        best = ref[-1, : tok.n_vocab].max().item()  # the greedy new token is the likeliest after the prompt
        assert lp["token_logprobs"][-1] == pytest.approx(best, abs=1e-4)
        assert max(lp["top_logprobs"][-1].values()) == lp["token_logprobs"][-1]
        assert choice["text"] == tok.decode(ids) + lp["tokens"][-1]


@pytest.mark.parametrize("name", ["chars", "rope"])
def test_new_tokens_logprobs_are_their_steps(client, models, name: str) -> None:
    lm = models[name]
    choice = complete(client, name, max_tokens=15, temperature=0, logprobs=2).choices[0]
    lp = choice.logprobs
    ids = lm.tokenizer.encode(PROMPT)
    new = [lm.tokenizer.encode(t)[0] for t in lp.tokens]
    ref = reference_logprobs(lm, ids + new)[len(ids) - 1: -1]  # the step before each new token
    assert torch.allclose(torch.tensor(lp.token_logprobs), ref[range(len(new)), new], atol=1e-4)
    for t, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert list(top)[0] == t and top[t] == logprob and len(top) == 2  # greedy: the likeliest, in its top 2
    assert "".join(lp.tokens) == choice.text
    check_offsets(lp, choice.text)
    echoed = complete(client, name, max_tokens=15, temperature=0, logprobs=2, echo=True).choices[0]
    assert echoed.logprobs.token_logprobs[len(ids):] == lp.token_logprobs and echoed.logprobs.tokens[0] == "R"
    check_offsets(echoed.logprobs, echoed.text)


def test_sampled_logprobs_are_of_the_raw_distribution(client, models) -> None:
    """Not the tempered, penalised or top-k-filtered one: those change the token, not its logprob."""
    lm = models["chars"]
    choice = complete(client, max_tokens=10, temperature=1.5, extra_body={"top_k": 5, "repetition_penalty": 1.5},
                      seed=3, logprobs=0).choices[0]
    ids = lm.tokenizer.encode(PROMPT)
    new = [lm.tokenizer.encode(t)[0] for t in choice.logprobs.tokens]
    ref = reference_logprobs(lm, ids + new)[len(ids) - 1: -1]
    assert choice.logprobs.token_logprobs == pytest.approx(ref[range(len(new)), new].tolist(), abs=1e-4)
    assert [list(top) for top in choice.logprobs.top_logprobs] == [[t] for t in choice.logprobs.tokens]
    assert choice.text == solo(lm, PROMPT, max_tokens=10, temperature=1.5, top_k=5, repetition_penalty=1.5, seed=3)


def test_chat_logprobs(client) -> None:
    messages = [{"role": "user", "content": "Who art thou?"}]
    kw = dict(model="rope", messages=messages, max_tokens=20, temperature=0)
    reply = client.chat.completions.create(logprobs=True, top_logprobs=3, **kw).choices[0]
    content = reply.logprobs.content
    assert reply.message.content == client.chat.completions.create(**kw).choices[0].message.content
    assert "".join(e.token for e in content).lstrip().startswith(reply.message.content)
    for e in content:
        assert e.bytes == list(e.token.encode()) and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob  # greedy
    plain = client.chat.completions.create(logprobs=True, **kw).choices[0].logprobs.content
    # the same tokens and numbers; a repeated prompt's start comes from the prefix cache and its
    # rest goes through another path (mypt.decode_step), so only up to the last bits
    assert [e.token for e in plain] == [e.token for e in content]
    assert [e.logprob for e in plain] == pytest.approx([e.logprob for e in content], abs=1e-5)
    assert all(e.top_logprobs == [] for e in plain)
    chunks = client.chat.completions.create(logprobs=True, top_logprobs=3, stream=True, **kw)
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [e.logprob for piece in streamed for e in piece.content] == pytest.approx([e.logprob for e in content],
                                                                                   abs=1e-5)


def test_streamed_logprobs_equal_the_whole_answer(client, models) -> None:
    ids = models["chars"].tokenizer.encode(PROMPT)
    kw = dict(prompt=[ids, ids[:4]], max_tokens=12, temperature=0.8, seed=5, logprobs=2, echo=True)
    whole = complete(client, **kw).choices
    pieces: dict[int, dict[str, list]] = {0: {}, 1: {}}
    texts = {0: "", 1: ""}
    for c in complete(client, stream=True, **kw):
        for choice in c.choices:
            texts[choice.index] += choice.text
            if choice.logprobs is not None:
                for key, values in choice.logprobs.to_dict().items():
                    pieces[choice.index].setdefault(key, []).extend(values)
    for choice in whole:
        assert texts[choice.index] == choice.text
        assert pieces[choice.index] == choice.logprobs.to_dict()


@pytest.mark.parametrize("name", ["chars", "rope"])
def test_concurrent_requests_with_and_without_logprobs(url: str, models, name: str) -> None:
    lm = models[name]

    async def one(client, prompt: str, kw: dict, logprobs: int | None):
        extra = {k: kw[k] for k in ("top_k", "repetition_penalty") if k in kw}
        plain = {k: v for k, v in kw.items() if k not in extra}
        ids = lm.tokenizer.encode(prompt)
        return await client.completions.create(model=name, prompt=ids, extra_body=extra, logprobs=logprobs,
                                               echo=logprobs is not None, **plain)

    async def all_at_once() -> list:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, p, kw, lp) for (p, kw), lp in
                                          zip(MIXED + MIXED, [1, None, 0, 5, None, 2] * 2, strict=True)))

    answers = asyncio.run(all_at_once())
    expected = [solo(lm, p, **{**kw, "stop": tuple(kw.get("stop", ()))}) for p, kw in MIXED]
    for (prompt, _), answer, text in zip(MIXED + MIXED, answers, expected + expected, strict=True):
        choice = answer.choices[0]
        if choice.logprobs is None:
            assert choice.text == text
            continue
        assert choice.text == prompt + text
        ids = lm.tokenizer.encode(prompt)
        logprobs = choice.logprobs.token_logprobs[1: len(ids)]
        ref = reference_logprobs(lm, ids)
        assert logprobs == pytest.approx(ref[range(len(ids) - 1), ids[1:]].tolist(), abs=1e-4)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("field", "value"), [("temperature", "hot"), ("temperature", 101), ("max_tokens", 201),
                                              ("n", 0), ("top_p", 0), ("stop", [1]), ("frequency_penalty", 0.5),
                                              ("seed", 1.5), ("seed", 2**63), ("repetition_penalty", 1e-38),
                                              ("repetition_penalty", 1e38), ("top_k", -2), ("stop", ["x" * 1001]),
                                              ("temperature", 10**400)])
def test_a_bad_field_is_400_naming_it(client, field: str, value: object) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, max_tokens=5, extra_body={field: value})
    assert error_of(e)["param"] == field
    assert complete(client, max_tokens=5).choices[0].text  # still serving


def test_sampling_ranges_are_generate_pys() -> None:
    """The server checks sampling fields against the one table generate.py's settings use."""
    from mypt.sampling import BOUNDS, SamplingConfig
    from mypt.serve.protocol import APIError, Limits, parse_request

    for field, bound in BOUNDS.items():
        if field == "max_new_tokens":
            continue  # the server's own --max_tokens caps it
        for value in (bound.low, bound.high):
            ok = not (bound.low_open and value == bound.low)
            body = {"model": "m", "prompt": "a", field: value}
            if ok:
                req = parse_request(body, False, Limits())
                assert req.sampling_config(5) == SamplingConfig(**{**req.sampling, "max_new_tokens": 5})
            else:
                with pytest.raises(APIError):
                    parse_request(body, False, Limits())


def test_unknown_field_unknown_model_and_bad_json(client, url: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, max_tokens=5, extra_body={"temprature": 0.5})
    assert error_of(e)["param"] == "temprature"
    with pytest.raises(openai.NotFoundError) as e:
        complete(client, model="nope", max_tokens=5)
    error = error_of(e)
    assert error["code"] == "model_not_found" and "chars, rope" in error["message"]
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="chars", messages=[{"role": "robot", "content": "hi"}])
    assert error_of(e)["param"] == "messages[0].role"
    r = httpx.get(url + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_hostile_bodies_are_400s_naming_the_field(url: str) -> None:
    def post(body: object | bytes, path: str = "/v1/completions") -> dict:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(url + path, content=content, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        return r.json()["error"]

    assert post(b"[" * 1500 + b"]" * 1500)["code"] == "invalid_json"  # nested past json's recursion limit
    chat = {"model": "chars", "max_tokens": 2}
    assert post({**chat, "messages": [{"role": ["user"], "content": "hi"}]}, "/v1/chat/completions")["param"] \
        == "messages[0].role"
    assert post({**chat, "messages": [{"role": "user", "content": "hi"}], "user": 5},
                "/v1/chat/completions")["param"] == "user"
    assert post({**chat, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                 "stream_options": {"include_usage": "yes"}}, "/v1/chat/completions")["param"] \
        == "stream_options.include_usage"
    many = post({"model": "chars", "prompt": ["ROMEO:"] * 17, "max_tokens": 2})  # --max_queue 16: never fits
    assert many["param"] == "prompt" and "--max_queue" in many["message"]
    unknown = post({"model": "chars", "prompt": "ROMEO: €", "max_tokens": 2})
    assert unknown["param"] == "prompt" and not unknown["message"].startswith("prompt: prompt")


@pytest.mark.parametrize(("chat", "fields", "param"), [
    (False, {"logprobs": 21}, "logprobs"), (False, {"logprobs": -1}, "logprobs"),
    (False, {"logprobs": "1"}, "logprobs"), (False, {"logprobs": True}, "logprobs"),
    (False, {"logprobs": 1.0}, "logprobs"), (False, {"echo": "yes"}, "echo"),
    (False, {"prompt": []}, "prompt"), (False, {"prompt": [[]]}, "prompt[0]"),
    (False, {"prompt": [5, -1]}, "prompt[1]"), (False, {"prompt": [5, 2.5]}, "prompt[1]"),
    (False, {"prompt": [5, True]}, "prompt[1]"),
    (False, {"prompt": [[5], [5, "a"]]}, "prompt[1][1]"), (False, {"prompt": ["a", [5]]}, "prompt"),
    (False, {"prompt": [5, 64]}, "prompt"), (False, {"prompt": [[5], [5, 10**6]]}, "prompt"),
    (True, {"logprobs": 1}, "logprobs"), (True, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (True, {"logprobs": True, "top_logprobs": -1}, "top_logprobs"), (True, {"top_logprobs": 2}, "top_logprobs"),
    (True, {"logprobs": False, "top_logprobs": 1}, "top_logprobs"), (True, {"echo": True}, "echo"),
])
def test_bad_logprobs_echo_and_token_ids_are_400s_naming_the_field(url: str, chat: bool, fields: dict,
                                                                    param: str) -> None:
    base = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": PROMPT}
    r = httpx.post(url + ("/v1/chat/completions" if chat else "/v1/completions"),
                   json={"model": "chars", "max_tokens": 2, **base, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if fields.get("prompt") == [[5], [5, 10**6]]:
        assert "prompt[1][1]: token id 1000000 is not in the vocabulary of 'chars'" in error["message"]


def test_echo_logprobs_beyond_block_size(client, models) -> None:
    """A rotary model scores a prompt longer than its block_size through its sliding window
    exactly; a learned-position model cannot, and says so."""
    ids = models["rope"].tokenizer.encode("ROMEO:\nWhat say you, my lord? Speak, speak, I pray thee.")
    assert len(ids) > 32
    lp = complete(client, "rope", prompt=ids, echo=True, logprobs=0, max_tokens=0).choices[0].logprobs
    ref = reference_logprobs(models["rope"], ids)
    assert lp.token_logprobs[1:] == pytest.approx(ref[range(len(ids) - 1), ids[1:]].tolist(), abs=1e-4)
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, "chars", prompt=ids, echo=True, logprobs=0, max_tokens=0)
    assert error_of(e)["code"] == "context_length_exceeded" and "block_size" in error_of(e)["message"]
    assert complete(client, "chars", prompt=ids, max_tokens=1).choices[0].text  # generation still slides


def test_too_long_prompt_and_too_big_body(client, url: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, prompt="a" * 129, max_tokens=5)  # --max_prompt_tokens 128
    assert error_of(e)["code"] == "context_length_exceeded"
    with pytest.raises(openai.APIStatusError) as e:
        complete(client, prompt="a" * 5000, max_tokens=5)  # body over --max_body_bytes 4096
    assert e.value.status_code == 413 and error_of(e)["code"] == "request_too_large"
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, prompt="ROMEO: €", max_tokens=5)  # not in the char vocabulary
    assert error_of(e)["param"] == "prompt"
    assert complete(client, max_tokens=5).choices[0].text


def test_full_queue_is_503_with_retry_after_and_a_gone_client_frees_its_slot(ckpts: Path) -> None:
    """One row, one waiting place: A decodes, B waits, C is refused; A's client leaves, B runs."""
    with running_server(ckpts, ["chars"], max_batch=1, max_queue=1, max_tokens=100_000) as base:
        body = {"model": "chars", "prompt": PROMPT, "max_tokens": 100_000, "stream": True, "ignore_eot": True}
        with httpx.Client(base_url=base, timeout=30) as a, httpx.Client(base_url=base, timeout=30) as b:
            with a.stream("POST", "/v1/completions", json=body) as stream_a:
                lines_a = stream_a.iter_lines()  # kept: dropping a half-read iterator closes the connection
                assert next(lines_a).startswith("data: {")
                with b.stream("POST", "/v1/completions", json=body) as stream_b:
                    wait_for(base, active=1, waiting=1)
                    c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
                    with pytest.raises(openai.APIStatusError) as e:
                        c.completions.create(model="chars", prompt=PROMPT, max_tokens=5)
                    assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
                    assert error_of(e)["code"] == "overloaded"
                    assert stream_b.status_code == 200
                    stream_a.close()  # A's client goes away
                    wait_for(base, active=1, waiting=0)
                    assert next(stream_b.iter_lines()).startswith("data: {")  # B got A's row
            wait_for(base, active=0, waiting=0)
            assert c.completions.create(model="chars", prompt=PROMPT, max_tokens=5).choices[0].text


def wait_for(base: str, **expected: int) -> None:
    deadline = time.monotonic() + 20
    while True:
        stats = httpx.get(base + "/health").json()["models"]["chars"]
        if all(stats[k] == v for k, v in expected.items()):
            return
        assert time.monotonic() < deadline, f"health stayed {stats}, expected {expected}"
        time.sleep(0.05)


# ----------------------------------------------------------------------------- batching


MIXED = [  # different prompt lengths, lengths and settings, decoded together
    ("ROMEO:", dict(max_tokens=70, temperature=0)),
    ("JULIET:\nO", dict(max_tokens=25, temperature=1.0, seed=1)),
    ("First Citizen:\nWe are", dict(max_tokens=50, temperature=0.7, top_p=0.8, top_k=0, seed=2)),
    ("A", dict(max_tokens=90, temperature=1.2, top_k=5, seed=3, repetition_penalty=1.3)),
    ("MENENIUS:\n", dict(max_tokens=10, temperature=0)),
    ("All:\nSpeak, speak.", dict(max_tokens=60, temperature=0.5, seed=4, stop=["\n\n"])),
]


@pytest.mark.parametrize("name", ["chars", "rope"])
def test_concurrent_requests_each_equal_their_solo_output(url: str, models, name: str) -> None:
    async def one(client, prompt: str, kw: dict) -> str:
        extra = {k: kw[k] for k in ("top_k", "repetition_penalty") if k in kw}
        plain = {k: v for k, v in kw.items() if k not in extra}
        r = await client.completions.create(model=name, prompt=prompt, extra_body=extra, **plain)
        return r.choices[0].text

    async def all_at_once() -> list[str]:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, p, kw) for p, kw in MIXED + MIXED))

    before = httpx.get(url + "/health").json()["models"][name]["steps"]
    texts = asyncio.run(all_at_once())
    steps = httpx.get(url + "/health").json()["models"][name]["steps"] - before
    expected = [solo(models[name], p, **{**kw, "stop": tuple(kw.get("stop", ()))}) for p, kw in MIXED]
    assert texts == expected + expected
    assert steps < sum(kw["max_tokens"] for _, kw in MIXED)  # decoded together, not one after another


# ----------------------------------------------------------------------------- failures stay contained


def test_a_request_whose_logits_turn_nan_fails_alone(ckpts: Path, models) -> None:
    """B's prompt holds a character whose embedding is NaN (a forward hook, as a broken weight
    row would be): B gets 500 while A, decoding in the same steps, streams its solo text, and C,
    which reuses B's row, gets its own."""
    lm = load_model("chars", ckpts, device="cpu", dtype="fp32")
    kw = dict(max_tokens=100, temperature=0.8, seed=4, ignore_eot=True)
    solo_a = solo(models["chars"], "ROMEO:", **kw)
    solo_c = solo(models["chars"], "KING", max_tokens=10, temperature=0)
    unused = [i for i in range(lm.tokenizer.n_vocab) if i != lm.tokenizer.eot_id
              and lm.tokenizer.decode([i]) not in "To ROMEO:KING" + solo_a + solo_c]
    bad_id = unused[0]
    mark = lm.tokenizer.decode([bad_id])
    lm.model.transformer.wte.register_forward_hook(
        lambda module, inputs, out: out.masked_fill((inputs[0] == bad_id)[..., None], float("nan")))
    with running_server(ckpts, ["chars"], loaded=[lm]) as base, httpx.Client(base_url=base, timeout=60) as http:
        body = {"model": "chars", "prompt": "ROMEO:", "stream": True, **kw}
        with http.stream("POST", "/v1/completions", json=body) as stream_a:
            lines = stream_a.iter_lines()
            first = next(lines)  # A is decoding
            b = http.post("/v1/completions", json={"model": "chars", "prompt": "To " + mark, "max_tokens": 20})
            rest = list(lines)
        assert b.status_code == 500 and "not finite" in b.json()["error"]["message"]
        chunks = [json.loads(line[len("data: "):]) for line in [first, *rest] if line.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks) == solo_a
        c = http.post("/v1/completions", json={"model": "chars", "prompt": "KING", "max_tokens": 10, "temperature": 0})
        assert c.json()["choices"][0]["text"] == solo_c


class Injected(RuntimeError):
    """The failure a test injects into the engine's step."""


def failing_forward(lm: LoadedModel) -> list[int]:
    """A forward hook on the model's first block: while the returned list holds a number, the
    step raises Injected (and the number counts down); empty, the model runs as usual."""
    armed: list[int] = []

    def hook(module, inputs, out):
        if armed:
            armed[0] -= 1
            if armed[0] <= 0:
                armed.clear()
            raise Injected("injected failure")

    lm.model.transformer.h[0].register_forward_hook(hook)
    return armed


def test_an_engine_failure_fails_its_requests_restarts_once_then_the_model_is_out_of_service(
        ckpts: Path, models) -> None:
    """A step raises: its request gets a prompt 500 in OpenAI's shape and the engine restarts
    (the next request is served as usual, /health counts the restart). The second failure hits
    A's stream while B waits for the one row: A gets the error in its stream, B a 503, /health
    says 503 and why, and later requests are refused with 503 at once. Nothing hangs."""
    lm = load_model("chars", ckpts, device="cpu", dtype="fp32")
    armed = failing_forward(lm)
    with running_server(ckpts, ["chars"], loaded=[lm], max_batch=1, max_queue=4, max_tokens=100_000) as base:
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=30)
        armed.append(1)
        with pytest.raises(openai.InternalServerError) as e:
            complete(c, max_tokens=5)
        assert "decoding failed: Injected: injected failure" in error_of(e)["message"]
        health = httpx.get(base + "/health")
        assert health.status_code == 200 and health.json()["models"]["chars"]["restarts"] == 1
        assert "injected" in health.json()["models"]["chars"]["last_error"]
        assert complete(c, max_tokens=20, temperature=0).choices[0].text == solo(models["chars"], PROMPT, max_tokens=20,
                                                                                 temperature=0)
        body = {"model": "chars", "prompt": PROMPT, "max_tokens": 100_000, "stream": True, "ignore_eot": True}
        with httpx.Client(base_url=base, timeout=30) as a, httpx.Client(base_url=base, timeout=30) as b:
            with a.stream("POST", "/v1/completions", json=body) as stream_a:
                lines_a = stream_a.iter_lines()
                assert next(lines_a).startswith("data: {")
                with b.stream("POST", "/v1/completions", json=body) as stream_b:
                    wait_for(base, active=1, waiting=1)
                    armed.append(1)
                    rest_a = list(lines_a)
                    rest_b = list(stream_b.iter_lines())
        errors = [json.loads(line[6:])["error"] for line in rest_a if line.startswith('data: {"error"')]
        assert len(errors) == 1 and "Injected" in errors[0]["message"] and errors[0]["type"] == "server_error"
        assert "data: [DONE]" in rest_a[-2:] and "data: [DONE]" in rest_b[-2:]
        b_error = json.loads(next(line for line in rest_b if line.startswith("data: {"))[6:])["error"]
        assert b_error["code"] == "model_unavailable" and "out of service" in b_error["message"]
        health = httpx.get(base + "/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert "Injected" in health.json()["models"]["chars"]["error"]
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            complete(c, max_tokens=5)
        assert e.value.status_code == 503 and error_of(e)["code"] == "model_unavailable"
        assert time.monotonic() - started < 5


def test_a_model_that_cannot_run_fails_twice_then_answers_503(ckpts: Path) -> None:
    """A model on the meta device (what `serve --device meta` loaded): every step raises. The
    first two requests get 500 (the engine restarts once in between), later ones 503 at once,
    and /health says why."""
    lm = load_model("chars", ckpts, device="cpu", dtype="fp32")
    lm.model.to("meta")
    lm = dataclasses.replace(lm, device=torch.device("meta"))
    with running_server(ckpts, ["chars"], loaded=[lm]) as base:
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
        statuses = []
        for _ in range(4):
            with pytest.raises(openai.APIStatusError) as e:
                complete(c, max_tokens=5)
            statuses.append(e.value.status_code)
        assert statuses == [500, 500, 503, 503] and "out of service" in error_of(e)["message"]
        health = httpx.get(base + "/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert "META" in health.json()["models"]["chars"]["error"]


def test_health_answers_at_once_during_a_long_step(ckpts: Path) -> None:
    """A step that takes 3 s (a slow forward, as a long prefill would be): /health and the page
    answer within a fraction of it, since the step runs in the engine's thread, not the event loop."""
    lm = load_model("chars", ckpts, device="cpu", dtype="fp32")
    slow: list[int] = []
    lm.model.transformer.h[0].register_forward_hook(lambda *_: time.sleep(3) if slow and not slow.pop() else None)
    with running_server(ckpts, ["chars"], loaded=[lm]) as base, httpx.Client(base_url=base, timeout=30) as http:
        slow.append(0)
        body = {"model": "chars", "prompt": PROMPT, "max_tokens": 5, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as stream:
            wait_for(base, active=1)  # the slow step has begun (or is about to)
            time.sleep(0.3)
            started = time.monotonic()
            assert http.get("/health").status_code == 200 and http.get("/").status_code == 200
            assert time.monotonic() - started < 1.0
            assert "data: [DONE]" in list(stream.iter_lines())[-2:]


def test_prefill_chunk_follows_the_measured_step_times() -> None:
    """Nothing streaming, or more rows prefilling than streaming: the largest chunk. Otherwise
    MIN_CHUNK until a prompt token is measured; then as many prompt tokens as keep a step within
    STALL plain steps by the measured costs, converging where a pass's fixed cost makes small
    chunks dear, following the plain step as the batch changes, within MIN_CHUNK .. largest."""
    from mypt.serve.batcher import MIN_CHUNK, STALL, ChunkSizer

    sizer = ChunkSizer(512)
    assert sizer.size(0, 5) == 512 and sizer.size(1, 63) == 512
    assert sizer.size(1, 1) == MIN_CHUNK  # nothing measured yet
    fixed, per_token, plain = 0.007, 0.0005, 0.0115  # a prefill pass: 7 ms + 0.5 ms a token
    for _ in range(40):
        chunk = sizer.size(1, 1)
        sizer.observe(plain + fixed + per_token * chunk, chunk, fixed + per_token * chunk)
    step = plain + fixed + per_token * sizer.size(1, 1)
    assert step <= STALL * plain * 1.02 and step >= STALL * plain * 0.9  # the fixed point: STALL plain steps
    small = sizer.size(1, 1)
    assert small > 2 * MIN_CHUNK
    for _ in range(20):  # 40 rows decoding: plain steps of 100 ms; the chunk grows with them
        sizer.observe(0.100, 0, 0.0)
    big = sizer.size(40, 1)
    assert big == int((STALL - 1) * 0.100 / sizer.token_s) and big > 5 * small
    for _ in range(20):
        sizer.observe(3.0, 100, 2.9)  # very dear prompt tokens (29 ms each): still MIN_CHUNK a step
    assert sizer.size(1, 1) == MIN_CHUNK
    for _ in range(20):
        sizer.observe(1.0, 100, 0.001)  # nearly free ones: at most the largest
    assert sizer.size(1, 1) == 512


def test_metrics_parse_with_prometheus_and_count_the_requests(ckpts: Path, models) -> None:
    """/metrics after 3 answered requests (one streamed, two sharing a 16-token prompt start), a
    400 and a 404: prometheus_client's own parser reads the fixed names, and the counts match.
    The second prompt began from the prefix cache and its text is its solo text all the same.
    (This server's registry is its own: the module's server runs in the same process.)"""
    from prometheus_client.parser import text_string_to_metric_families

    start = "ROMEO:\nWhat say you, my"  # 23 characters: one 16-token block
    with running_server(ckpts, ["chars"], max_batch=2) as base:
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=30)
        tails = (" lord", " lady")
        texts = [complete(c, prompt=start + tail, max_tokens=12, temperature=0).choices[0].text for tail in tails]
        assert texts == [solo(models["chars"], start + tail, max_tokens=12, temperature=0) for tail in tails]
        streamed = list(complete(c, max_tokens=8, seed=1, stream=True))
        assert streamed
        with pytest.raises(openai.BadRequestError):
            complete(c, max_tokens=-1)
        with pytest.raises(openai.NotFoundError):
            complete(c, model="nope", max_tokens=1)
        time.sleep(0.2)  # the stream is counted as it closes
        text = httpx.get(base + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert value[("mypt_requests_total", (("status", "200"),))] == 3
    assert value[("mypt_requests_total", (("status", "400"),))] == 1
    assert value[("mypt_requests_total", (("status", "404"),))] == 1
    for name in ("mypt_time_to_first_token_seconds", "mypt_queue_time_seconds"):
        assert families[name].type == "histogram" and value[(name + "_count", ())] == 3
    gaps = 11 + 11 + 7  # tokens after each choice's first
    assert value[("mypt_inter_token_latency_seconds_count", ())] == gaps
    assert value[("mypt_prefix_cache_hits_total", ())] == 1
    assert families["mypt_batch_size"].type == "gauge" and value[("mypt_batch_size", ())] >= 1


# ----------------------------------------------------------------------------- connections


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_half_sent_requests_time_out_and_health_still_answers(ckpts: Path) -> None:
    """50 clients send part of their headers or part of their body and stop: /health answers
    meanwhile, and each gets 408 and is closed after --request_timeout; a long stream is not cut."""
    with running_server(ckpts, ["chars"], request_timeout=1.0) as base:
        port = int(base.rsplit(":", 1)[1])
        slow, started = [], time.monotonic()
        for i in range(50):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + (b"Content-Length: 100\r\n\r\n{\"model\"" if i % 2 else b"Content-Le"))
            slow.append(sock)
        assert httpx.get(base + "/health", timeout=10).json()["status"] == "ok"
        body = {"model": "chars", "prompt": PROMPT, "stream": True, "max_tokens": 300, "ignore_eot": True}
        streamed = httpx.post(base + "/v1/completions", json=body, timeout=60).text
        assert streamed.endswith("data: [DONE]\n\n") and '"finish_reason": "length"' in streamed
        for sock in slow:
            with sock:
                answer = read_until_closed(sock)
            assert answer.startswith(b"HTTP/1.1 408 ") and b'"code": "request_timeout"' in answer
        assert time.monotonic() - started >= 1.0
        assert httpx.get(base + "/health", timeout=10).status_code == 200


def test_connections_beyond_the_limit_get_503_at_once(ckpts: Path) -> None:
    with running_server(ckpts, ["chars"], max_connections=8) as base:
        port = int(base.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(8)]
        try:
            for _ in range(4):
                with socket.create_connection(("127.0.0.1", port), timeout=30) as extra:
                    answer = read_until_closed(extra)  # before it sends anything
                assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in answer
            r = httpx.get(base + "/health", timeout=10)
            assert r.status_code == 503 and r.json()["error"]["code"] == "too_many_connections"
        finally:
            for sock in idle:
                sock.close()
        deadline = time.monotonic() + 20
        while httpx.get(base + "/health", timeout=10).status_code != 200:  # the server notices the closes
            assert time.monotonic() < deadline
            time.sleep(0.05)


# ----------------------------------------------------------------------------- the command line


@pytest.mark.slow
@pytest.mark.parametrize("key_from", ["flag", "environment"])
def test_mypt_serve_command_with_an_api_key(ckpts: Path, key_from: str) -> None:
    from mypt.cli.serve import bind

    port = bind("127.0.0.1", 0).getsockname()[1]  # closed again: free for the server
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MYPT_API_KEY", None)
    key = ["--api_key", "s3cret"] if key_from == "flag" else []
    if key_from == "environment":
        env["MYPT_API_KEY"] = "s3cret"
    cmd = [sys.executable, "-m", "mypt", "serve", "--model_name", "chars", "rope", "--checkpoints_dir", str(ckpts),
           "--port", str(port), "--log_level", "warning", *key]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(base + "/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.1)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        keyless = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            keyless.models.list()
        assert error_of(e)["code"] == "invalid_api_key"
        keyed = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert keyed.completions.create(model="chars", prompt=PROMPT, max_tokens=5).choices[0].text
        assert keyed.completions.create(model="rope", prompt=PROMPT, max_tokens=5).choices[0].text
        assert httpx.get(base + "/").text.startswith("<!doctype html>")  # the page itself needs no key
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err  # Ctrl-C: a clean stop
    assert f"serving chars, rope at {base}/" in out and "API key required" in out


def test_serve_flags_are_checked_before_anything_starts(ckpts: Path) -> None:
    base = ["--checkpoints_dir", str(ckpts)]
    r = run_cli("serve", "--model_name", "chars", "chars", "--max_batch", "0", *base, script="src/mypt/__main__.py",
                cwd=ckpts.parent)
    assert r.returncode == 2
    assert "--max_batch (0) must be from 1 to 65,536" in r.stderr and "lists chars more than once" in r.stderr
    r = run_cli("serve", "--model_name", "nope", *base, script="src/mypt/__main__.py", cwd=ckpts.parent)
    assert r.returncode == 2 and "nope" in r.stderr and "chars" in r.stderr and "Traceback" not in r.stderr
    from mypt.cli.serve import bind

    taken = bind("127.0.0.1", 0)
    r = run_cli("serve", "--model_name", "chars", "--port", str(taken.getsockname()[1]), *base,
                script="src/mypt/__main__.py", cwd=ckpts.parent)
    taken.close()
    assert r.returncode == 2 and "cannot listen on 127.0.0.1" in r.stderr
    r = run_cli("serve", "--model_name", "chars", "--max_batch", str(10**9), "--max_connections", "0",
                "--request_timeout", "nan", "--max_body_bytes", str(2**40), "--prefill_tokens", "0",
                "--prefix_cache_tokens", "-1", "--port", "0", *base,
                script="src/mypt/__main__.py", cwd=ckpts.parent)  # once: a list of 10**9 free rows, then 8 GB later
    assert r.returncode == 2 and "--max_batch (1000000000) must be from 1 to 65,536" in r.stderr
    assert "--max_connections (0)" in r.stderr and "--request_timeout (nan)" in r.stderr
    assert "--max_body_bytes (1099511627776)" in r.stderr and "--prefill_tokens (0) must be from 1" in r.stderr
    assert "--prefix_cache_tokens (-1) must be from 0" in r.stderr
    assert "serving" not in r.stdout and "Traceback" not in r.stderr
    for device in ("meta", "xpu"):  # meta once started and then hung every request
        r = run_cli("serve", "--model_name", "chars", "--device", device, "--port", "0", *base,
                    script="src/mypt/__main__.py", cwd=ckpts.parent)
        assert r.returncode == 2 and f"--device {device}" in r.stderr and "serving" not in r.stdout, r.stderr
    few_files = subprocess.run(  # a process that may open 200 files cannot hold 512 connections
        [sys.executable, "-m", "mypt", "serve", "--model_name", "chars", "--port", "0", *base], cwd=ckpts.parent,
        capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200)))
    assert few_files.returncode == 2 and "--max_connections 512: this process may open at most 200 files" \
        in few_files.stderr and "serving" not in few_files.stdout


def test_readme_examples_work_as_written(url: str, client, capsys: pytest.CaptureFixture) -> None:
    import re
    import shlex

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    python = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "from openai import" in b)
    exec(compile(python.replace("http://127.0.0.1:8000", url).replace("demo_tiny", "chars"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    # the seeded completion first (the same text again), then the chat reply, unseeded: any length
    again = client.completions.create(model="chars", prompt="ROMEO:", max_tokens=50, seed=1).choices[0].text
    assert again and out.startswith(again + "\n")
    curl = shlex.split(next(b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if b.startswith("curl "))
                       .replace("\\\n", " "))
    assert curl[1] == "http://127.0.0.1:8000/v1/completions"
    body = json.loads(curl[curl.index("-d") + 1].replace("demo_tiny", "chars"))
    r = httpx.post(url + "/v1/completions", json=body)
    assert r.status_code == 200 and 0 < len(r.json()["choices"][0]["text"]) <= 50
