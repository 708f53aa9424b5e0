"""The page at `/` in a real headless Chromium (Debian's `chromium` package; .ci/run installs it),
driven by Playwright's Python API: load it, choose a model, send a prompt, watch the text stream
in, stop a long reply, chat; a screenshot is saved under the test's tmp dir. A model fine-tuned
for chat (mypt finetune) opens in chat mode and keeps the conversation; a base model does not.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import require
from serving import running_server, train_models
from test_finetune import LINES, chat_model  # noqa: F401 (chat_model: a fixture, a fine-tune that answers "Ay.")

httpx = require("httpx")
sync_api = require("playwright.sync_api")


def chromium_path() -> str:
    path = os.environ.get("MYPT_CHROMIUM") or shutil.which("chromium")
    if not path:
        pytest.fail("Chromium is not installed: apt-get install -y --no-install-recommends chromium "
                    "(as .ci/run does), or set MYPT_CHROMIUM to a Chromium executable", pytrace=False)
    return path


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory):
    ckpts = train_models(tmp_path_factory.mktemp("page"))
    with running_server(ckpts, ["chars", "rope"], max_batch=4, max_tokens=100_000) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(browser, url: str):
    tab = browser.new_page(viewport={"width": 1100, "height": 700})
    tab.goto(url + "/")
    yield tab
    tab.close()


def record_lengths(page) -> None:
    """From now on window.lengths lists the length of the output text after each change the page makes."""
    page.evaluate("""() => {
        window.lengths = [];
        const out = document.getElementById('output');
        new MutationObserver(() => window.lengths.push(out.textContent.length)).observe(out,
            {childList: true, subtree: true, characterData: true});
    }""")


def send(page, model: str, prompt: str, **fields: str) -> None:
    """Choose the model, fill the settings (temperature, seed, max_tokens...) and the prompt, click Send."""
    page.select_option("#model", model)
    for field, value in fields.items():
        page.fill(f"#{field}", value)
    page.fill("#prompt", prompt)
    page.click("#send")


FINISHED = "document.getElementById('status').textContent.includes('finished')"


def test_page_streams_a_completion_and_takes_a_screenshot(page, url: str, tmp_path: Path) -> None:
    page.wait_for_function("document.querySelectorAll('#model option').length === 2")
    assert page.locator("#model option").all_inner_texts() == ["chars (context 32)", "rope (context 32)"]
    record_lengths(page)
    send(page, "rope", "ROMEO:\n", temperature="0.8", seed="3", max_tokens="1000")
    page.wait_for_function(FINISHED)
    shown = page.locator("#output .completion").inner_text()
    expected = httpx.post(url + "/v1/completions", json={"model": "rope", "prompt": "ROMEO:\n", "max_tokens": 1000,
                                                         "temperature": 0.8, "seed": 3},
                          timeout=120).json()["choices"][0]["text"]
    assert shown == expected and len(expected) > 200 and len(set(expected)) > 10
    lengths = page.evaluate("window.lengths")
    assert len({n for n in lengths if len("ROMEO:\n") < n < len("ROMEO:\n") + len(expected)}) >= 3  # seen growing
    assert f"{len(expected)} tokens" in page.inner_text("#status")  # a char a token
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_stop_button_ends_a_long_reply_and_frees_its_slot(page, url: str) -> None:
    def endless(route) -> None:  # the reply must outlast the click: past any end-of-text token
        route.continue_(post_data=json.dumps({**json.loads(route.request.post_data), "ignore_eot": True}))

    page.route("**/v1/completions", endless)
    send(page, "chars", "To be", temperature="1", max_tokens="100000")
    page.wait_for_function("document.querySelector('#output .completion').textContent.length > 50")
    page.click("#stop")
    page.wait_for_function("document.getElementById('status').textContent === 'stopped'")

    def active() -> int:
        return httpx.get(url + "/health").json()["models"]["chars"]["active"]

    for _ in range(50):
        if not active():
            break
        page.wait_for_timeout(100)
    page.unroute("**/v1/completions")
    assert active() == 0


def test_chat_mode_shows_both_turns(page) -> None:
    page.select_option("#mode", "chat")
    send(page, "chars", "Who art thou?", max_tokens="20")
    page.wait_for_function(FINISHED)
    turns = page.locator("#output .turn").all_inner_texts()
    assert len(turns) == 2 and turns[0] == "You: Who art thou?" and turns[1].startswith("Model: ")
    assert len(turns[1]) > len("Model: ")
    assert page.input_value("#prompt") == ""


@pytest.fixture(scope="module")
def chat_url(chat_model: Path):  # noqa: F811 (the fixture imported above)
    with running_server(chat_model, ["ay", "base"]) as base:
        yield base


@pytest.mark.slow
def test_a_chat_model_opens_in_chat_mode_and_keeps_the_conversation(browser, chat_url: str) -> None:
    cards = httpx.get(chat_url + "/v1/models").json()["data"]
    assert [(c["id"], c["chat_template"]) for c in cards] == [("ay", "mypt-chat-1"), ("base", None)]
    tab = browser.new_page()
    posted: list[tuple[str, dict]] = []
    tab.on("request", lambda r: posted.append((r.url.removeprefix(chat_url), r.post_data_json))
           if r.method == "POST" else None)
    tab.goto(chat_url + "/")
    tab.wait_for_function("document.querySelectorAll('#model option').length === 2")
    assert tab.locator("#model option").all_inner_texts() == ["ay (context 64, chat)", "base (context 64)"]
    assert tab.input_value("#model") == "ay" and tab.input_value("#mode") == "chat"
    history: list[dict] = []
    for line in (LINES[300], LINES[301]):
        send(tab, "ay", line, temperature="0", max_tokens="20")
        tab.wait_for_function(FINISHED)
        history.append({"role": "user", "content": line})
        url, body = posted[-1]
        assert url == "/v1/chat/completions" and body["messages"] == history and body["stream"] is True
        answer = httpx.post(chat_url + url, json={**body, "stream": False, "stream_options": None},
                            timeout=60).json()["choices"][0]
        assert answer["message"]["content"] == "Ay." and answer["finish_reason"] == "stop"  # the template's turn
        history.append({"role": "assistant", "content": "Ay."})
    assert "finished: stop" in tab.inner_text("#status")
    turns = tab.locator("#output .turn").all_inner_texts()
    assert turns == [f"You: {LINES[300]}", "Model: Ay.", f"You: {LINES[301]}", "Model: Ay."]
    tab.select_option("#model", "base")  # a model without a template: completion mode, a fresh page
    assert tab.input_value("#mode") == "complete" and tab.inner_text("#output") == ""
    send(tab, "base", "ROMEO:", max_tokens="5")
    tab.wait_for_function(FINISHED)
    assert posted[-1][0] == "/v1/completions" and posted[-1][1]["prompt"] == "ROMEO:"
    tab.select_option("#model", "ay")
    assert tab.input_value("#mode") == "chat"
    tab.close()
