"""Load test of `mypt serve` on 127.0.0.1: continuous batching under 1, 4, 16 and 64 clients.

    python bench/bench_serve.py                          # trains the small preset briefly first (once)
    python bench/bench_serve.py --model_name NAME --checkpoints_dir checkpoints
    python bench/bench_serve.py --screenshot docs/serve-page.png --screenshot_model sc

The real command (`python -m mypt serve`) runs in its own process; the clients are one asyncio
process streaming completions (server-sent events) over httpx. At every level the same
`--requests` requests are sent (prompts of 16-64 tokens from tinyshakespeare, max_tokens from
16 to 128, half greedy, half sampled with a seed), each client sending its next request when the
previous one ends. The 1-client run is each request alone: every response at the other levels
must equal it, token for token (a mixed-up or failed response is counted and fails the run).

Reported per level: aggregate completion tokens/s (and its ratio to 1 client), time to first
token (p50, p99) and time per output token after the first (p50, p99). Then: a short request
while a long one decodes, against the short one alone (a long request must not hold it up);
a burst beyond the queue limit, which may only get complete answers or clean 503s with
Retry-After; and the time from starting the server process to its first answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import header  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
LEVELS = (1, 4, 16, 64)


@dataclass
class Result:
    status: int
    text: str = ""
    tokens: int = 0
    ttft: float = 0.0  # seconds to the first text
    per_token: float | None = None  # seconds per token after the first
    seconds: float = 0.0
    retry_after: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_small(root: Path) -> str:
    """The small preset (GPT-2 tokenizer), trained briefly on tinyshakespeare: the speed is what counts.
    Kept in root/bench_serve_small and reused by later runs."""
    name = "bench_serve_small"
    if (root / name).is_dir():
        return name
    cmd = [sys.executable, str(REPO / "train.py"), "--config_file", "small", "--model_name", name,
           "--input_file", str(CORPUS), "--max_iters", "10", "--eval_interval", "10", "--eval_iters", "1",
           "--checkpoints_dir", str(root)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return name


THREADS = {"OMP_NUM_THREADS": "1"}  # set by --threads


def start_server(names: list[str], ckpts: str, port: int, *extra: str,
                 src: str | None = None) -> tuple[subprocess.Popen, float]:
    """`mypt serve` in its own process (the mypt package of `src`, a source folder, if given);
    returns it and the seconds until its first answer."""
    t0 = time.perf_counter()
    env = {**os.environ, **THREADS, **({"PYTHONPATH": src} if src else {})}
    proc = subprocess.Popen([sys.executable, "-m", "mypt", "serve", "--model_name", *names, "--checkpoints_dir", ckpts,
                             "--port", str(port), "--log_level", "warning", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    body = {"model": names[0], "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    while True:
        try:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30)
            r.raise_for_status()
            return proc, time.perf_counter() - t0
        except httpx.TransportError:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited: {proc.stderr.read()}") from None
            time.sleep(0.05)


def make_requests(model: str, n: int, seed: int = 0) -> list[dict]:
    text = CORPUS.read_text(encoding="utf-8")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        start = rng.randrange(len(text) - 400)
        prompt = text[start: start + rng.randrange(60, 250)]  # about 16-64 GPT-2 tokens
        body = {"model": model, "prompt": prompt, "max_tokens": rng.choice((16, 32, 64, 96, 128)), "stream": True,
                "ignore_eot": True}  # every request its full length
        body.update({"temperature": 0} if i % 2 == 0 else {"temperature": 0.9, "top_p": 0.95, "seed": i})
        out.append(body)
    return out


async def one(client: httpx.AsyncClient, body: dict) -> Result:
    t0 = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return Result(r.status_code, r.text, retry_after=r.headers.get("retry-after"))
        texts, first, last, tokens = [], None, None, 0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if "error" in msg:
                return Result(500, msg["error"]["message"])
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
            for c in msg["choices"]:
                if c["text"]:
                    last = time.perf_counter()
                    first = first or last
                    texts.append(c["text"])
    seconds = time.perf_counter() - t0
    per_token = (last - first) / (tokens - 1) if first and tokens > 1 else None
    return Result(200, "".join(texts), tokens, (first or t0) - t0, per_token, seconds)


async def load(base: str, bodies: list[dict], clients: int) -> tuple[list[Result], float]:
    """`clients` clients share the bodies, each sending its next when its last one ends."""
    results: list[Result | None] = [None] * len(bodies)
    queue = list(enumerate(bodies))[::-1]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            i, body = queue.pop()
            results[i] = await one(client, {**body, "stream_options": {"include_usage": True}})

    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        return results, time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def load_table(base: str, model: str, n: int) -> float:
    bodies = make_requests(model, n)
    print("\n| clients | requests | tokens | seconds | tokens/s | vs 1 client | TTFT p50 | TTFT p99 | "
          "per token p50 | per token p99 | failed | mixed up |")
    print("|" + "---:|" * 12)
    solo, single, failures = None, None, 0
    for clients in LEVELS:
        results, seconds = asyncio.run(load(base, bodies, clients))
        ok = [r for r in results if r.status == 200]
        failed = len(results) - len(ok)
        solo = solo or [r.text for r in results]
        mixed = sum(r.status == 200 and r.text != s for r, s in zip(results, solo, strict=True))
        if failed:
            print(f"first failure: {next(r for r in results if r.status != 200)}")
        tokens = sum(r.tokens for r in ok)
        rate = tokens / seconds or float("nan")
        single = single or rate
        ttft = [r.ttft * 1e3 for r in ok]
        per = [r.per_token * 1e3 for r in ok if r.per_token is not None]
        print(f"| {clients} | {len(results)} | {tokens} | {seconds:.1f} | {rate:.1f} | {rate / single:.2f}x | "
              f"{pct(ttft, .5):.0f} ms | {pct(ttft, .99):.0f} ms | {pct(per, .5):.1f} ms | {pct(per, .99):.1f} ms | "
              f"{failed} | {mixed} |", flush=True)
        failures += failed + mixed
    return failures


def long_vs_short(base: str, model: str) -> None:
    """A 16-token request alone, then while a 1024-token request decodes."""
    short = {"model": model, "prompt": "ROMEO:", "max_tokens": 16, "temperature": 0, "stream": True, "ignore_eot": True}
    long = {"model": model, "prompt": "JULIET:", "max_tokens": 1024, "temperature": 0, "stream": True,
            "ignore_eot": True}

    async def run() -> tuple[Result, Result, Result, float]:
        async with httpx.AsyncClient(base_url=base, timeout=600) as client:
            alone = await one(client, short)
            started = time.perf_counter()
            long_task = asyncio.create_task(one(client, long))
            await asyncio.sleep(1.0)  # the long request is decoding
            during = await one(client, short)
            short_done = time.perf_counter() - started
            return alone, during, await long_task, short_done

    alone, during, long_result, short_done = asyncio.run(run())
    print(f"\nshort request (16 tokens) alone: {alone.seconds * 1e3:.0f} ms; while a 1024-token request decodes: "
          f"{during.seconds * 1e3:.0f} ms (finished {short_done:.1f} s after the long one started, which took "
          f"{long_result.seconds:.1f} s); same text: {alone.text == during.text}")


def burst(names: list[str], ckpts: str, model: str) -> int:
    """64 requests at once at a server with 4 rows and 4 queue places: answers or clean 503s only."""
    port = free_port()
    proc, _ = start_server(names, ckpts, port, "--max_batch", "4", "--max_queue", "4")
    base = f"http://127.0.0.1:{port}"
    try:
        bodies = [{**b, "max_tokens": 32} for b in make_requests(model, 64, seed=1)]
        results, _ = asyncio.run(load(base, bodies, 64))
        answered = [(b, r) for b, r in zip(bodies, results, strict=True) if r.status == 200]
        alone, _ = asyncio.run(load(base, [b for b, _ in answered], 1))
    finally:
        proc.terminate()
        proc.wait()
    ok = sum(r.tokens == 32 and r.text == a.text for (_, r), a in zip(answered, alone, strict=True))
    refused = sum(r.status == 503 and r.retry_after == "1" and json.loads(r.text)["error"]["code"] == "overloaded"
                  for r in results)
    print(f"\nburst of 64 at --max_batch 4 --max_queue 4: {ok} answered in full (each equal to it alone), "
          f"{refused} refused with 503 + Retry-After, {len(results) - ok - refused} other")
    return len(results) - ok - refused


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", help="serve this model (default: train the small preset briefly)")
    p.add_argument("--checkpoints_dir", default="checkpoints")
    p.add_argument("--requests", type=int, default=64, help="requests per level (default: %(default)s)")
    p.add_argument("--max_batch", type=int, default=64, help="the server's --max_batch (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads (OMP_NUM_THREADS); on a "
                   "shared 2-core machine a second thread mostly spins (default: %(default)s)")
    p.add_argument("--screenshot", help="also save a screenshot of the page here (needs playwright and chromium)")
    p.add_argument("--screenshot_model", help="the model shown in the screenshot (default: the load-test model)")
    args = p.parse_args()
    THREADS["OMP_NUM_THREADS"] = str(args.threads)
    print(header("mypt serve load test") + f"\nserver threads: {args.threads}")
    ckpts = args.checkpoints_dir
    model = args.model_name or train_small(Path(ckpts))
    names = [model] + ([args.screenshot_model] if args.screenshot_model else [])
    port = free_port()
    proc, startup = start_server([model], ckpts, port)  # alone: its startup is the figure
    proc.terminate()
    proc.wait()
    print(f"model {model}; startup of `mypt serve` to its first answer: {startup:.2f} s")
    proc, _ = start_server(names, ckpts, port, "--max_batch", str(args.max_batch), "--max_queue", "256")
    base = f"http://127.0.0.1:{port}"
    print(f"server: --max_batch {args.max_batch} --max_queue 256")
    try:
        failures = load_table(base, model, args.requests)
        long_vs_short(base, model)
        if args.screenshot:
            screenshot(base, args.screenshot_model or model, args.screenshot)
    finally:
        proc.terminate()
        proc.wait()
    failures += burst([model], ckpts, model)
    if failures:
        raise SystemExit(f"{failures} failed, mixed-up or unclean responses")


def screenshot(base: str, model: str, path: str) -> None:
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("MYPT_CHROMIUM", "/usr/bin/chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 640})
        page.goto(base + "/")
        page.wait_for_function("document.querySelectorAll('#model option').length > 0")
        page.select_option("#model", model)
        page.fill("#temperature", "0.8")
        page.fill("#seed", "1")
        page.fill("#max_tokens", "300")
        page.fill("#prompt", "ROMEO:\n")
        page.click("#send")
        page.wait_for_function("document.getElementById('status').textContent.includes('finished')", timeout=120_000)
        page.fill("#prompt", "JULIET:\n")
        page.screenshot(path=path)
        browser.close()
    print(f"\nscreenshot of the page: {path}")


if __name__ == "__main__":
    main()
