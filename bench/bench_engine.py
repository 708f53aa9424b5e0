"""The serving engine's targets (issue 23), measured side by side in one run:

    python bench/bench_engine.py --baseline /tmp/mypt-main     # a checkout of the old code
    python bench/bench_engine.py --model_name NAME --checkpoints_dir DIR --prefix_tokens 512

By default a model of the small preset's shape with a 1024-token context (GPT-2 tokenizer) is
trained briefly on tinyshakespeare first (once; kept in --checkpoints_dir): the speed is what counts.
Every server is the real command (`python -m mypt serve`) in its own process, one at a time.

1. Load: --clients streaming clients share bench_serve.py's requests (prompts of 16-64 tokens,
   16-128 new tokens); aggregate tokens/s and time to first token p50. With --baseline DIR (a
   checkout of the old code, e.g. `git worktree add /tmp/mypt-main main`), the same load runs
   against DIR's server on the same model in the same run, and the ratios are printed. This
   VM's speed drifts by 10-20% from minute to minute: --repeat N runs N rounds, the two servers
   taking turns, and compares the medians.
2. Stall: one client streams greedy tokens; after 30 of them a second client sends a prompt of
   block_size tokens. Reported: the first client's largest gap between tokens over its median
   gap (target: at most 3x), for this tree and the baseline.
3. Prefix cache: 9 requests that share a --prefix_tokens start (different 8-token tails), one
   after another, the first a warm-up; time to first token p50 with the prefix cache and with
   --prefix_cache_tokens 0 (target: at least 3x better with it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve  # noqa: E402
from _machine import header  # noqa: E402
from bench_serve import CORPUS, REPO, free_port, load, make_requests, pct, start_server  # noqa: E402

SHAPE = {"name": "bench-engine", "vocab_size": 50304, "n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 1024,
         "batch_size": 4, "dropout": 0.0, "bias": False}  # the small preset with a 1024-token context


def train_model(root: Path) -> str:
    name = "bench_engine_small"
    if not (root / name).is_dir():
        root.mkdir(parents=True, exist_ok=True)
        config = root / "bench_engine.json"
        config.write_text(json.dumps(SHAPE), encoding="utf-8")
        cmd = [sys.executable, str(REPO / "train.py"), "--config_file", str(config), "--model_name", name,
               "--input_file", str(CORPUS), "--max_iters", "5", "--eval_interval", "5", "--eval_iters", "1",
               "--checkpoints_dir", str(root)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return name


@contextlib.contextmanager
def serving(model: str, ckpts: str, *extra: str, src: str | None = None) -> Iterator[str]:
    port = free_port()
    proc, _ = start_server([model], ckpts, port, *extra, src=src)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


def throughput(base: str, model: str, requests: int, clients: int) -> tuple[float, float, int]:
    """(tokens/s, TTFT p50 in ms, failed requests) of `clients` streaming clients."""
    results, seconds = asyncio.run(load(base, make_requests(model, requests), clients))
    ok = [r for r in results if r.status == 200]
    return sum(r.tokens for r in ok) / seconds, pct([r.ttft * 1e3 for r in ok], 0.5), len(results) - len(ok)


def exact_prompt(tokenizer, n: int, offset: int = 0) -> str:
    """Text from tinyshakespeare that the tokenizer encodes to exactly n tokens."""
    ids = tokenizer.encode(CORPUS.read_text(encoding="utf-8")[offset: offset + 20 * n])
    text = tokenizer.decode(ids[:n])
    while len(tokenizer.encode(text)) > n:  # a decode/encode round trip may merge differently
        text = text[:-1]
    return text


async def _stream_times(client: httpx.AsyncClient, body: dict, times: list[float]) -> None:
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                times.append(time.perf_counter())


def stall(base: str, model: str, long_prompt: str) -> tuple[float, float, float]:
    """(largest gap, median gap, ratio) of a stream while another client's long prompt is prefilled."""
    a = {"model": model, "prompt": "ROMEO:", "max_tokens": 150, "temperature": 0, "stream": True, "ignore_eot": True}
    b = {"model": model, "prompt": long_prompt, "max_tokens": 4, "temperature": 0, "stream": True}

    async def run() -> list[float]:
        times: list[float] = []
        async with httpx.AsyncClient(base_url=base, timeout=600) as client:
            stream = asyncio.create_task(_stream_times(client, a, times))
            while len(times) < 30 and not stream.done():
                await asyncio.sleep(0.001)
            await _stream_times(client, b, [])
            await stream
        return times

    times = asyncio.run(run())
    gaps = [t1 - t0 for t0, t1 in zip(times, times[1:], strict=False)]
    return max(gaps) * 1e3, statistics.median(gaps) * 1e3, max(gaps) / statistics.median(gaps)


def prefix_ttft(base: str, model: str, prefix: str, tails: list[str]) -> float:
    """TTFT p50 (ms) of requests `prefix + tail`, one after another, after the first (a warm-up)."""
    async def run() -> list[float]:
        out = []
        async with httpx.AsyncClient(base_url=base, timeout=600) as client:
            for tail in tails:
                body = {"model": model, "prompt": prefix + tail, "max_tokens": 2, "temperature": 0, "stream": True}
                r = await bench_serve.one(client, body)
                if r.status != 200:
                    raise SystemExit(f"a prefix request failed: {r.status} {r.text}")
                out.append(r.ttft * 1e3)
        return out[1:]

    return statistics.median(asyncio.run(run()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", help="serve this model (default: train one briefly, see above)")
    p.add_argument("--checkpoints_dir", default="checkpoints")
    p.add_argument("--baseline", help="a source checkout of the old code (its src/ is imported for the old server)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=128, help="requests of the load test (default: %(default)s)")
    p.add_argument("--prefix_tokens", type=int, default=512, help="the shared prompt start (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=1,
                   help="load rounds, the trees taking turns in each; the medians are compared (default: %(default)s)")
    args = p.parse_args()
    if args.repeat < 1:
        p.error(f"--repeat ({args.repeat}) must be at least 1")
    bench_serve.THREADS["OMP_NUM_THREADS"] = str(args.threads)
    print(header("mypt serve engine") + f"\nserver threads: {args.threads}")
    ckpts = args.checkpoints_dir
    model = args.model_name or train_model(Path(ckpts))
    from mypt.tokenizers.load import load_tokenizer

    tok = load_tokenizer(Path(ckpts) / model / "tokenizer.json")
    block = json.loads((Path(ckpts) / model / "config.json").read_text(encoding="utf-8")).get("block_size")
    trees = [("this tree", None)] + ([("baseline", str(Path(args.baseline) / "src"))] if args.baseline else [])
    flags = ["--max_batch", str(args.clients), "--max_queue", "1024"]
    rounds: dict[str, list[tuple[float, float, int]]] = {label: [] for label, _ in trees}
    stalls = {}
    for r in range(args.repeat):
        for label, src in trees:
            with serving(model, ckpts, *flags, src=src) as base:
                rounds[label].append(throughput(base, model, args.requests, args.clients))
                if r == 0:
                    stalls[label] = stall(base, model, exact_prompt(tok, block))
    print(f"\nmodel {model} (block_size {block}); {args.clients} streaming clients, {args.requests} requests, "
          f"{args.repeat} round(s)\n")
    print("| server | round | tokens/s | TTFT p50 | failed |")
    print("|---|---:|---:|---:|---:|")
    for label, results in rounds.items():
        for r, (rate, ttft, failed) in enumerate(results, 1):
            print(f"| {label} | {r} | {rate:.1f} | {ttft:.0f} ms | {failed} |")
    print("\n| server | stall: largest gap | median gap | ratio |")
    print("|---|---:|---:|---:|")
    for label, (gap, median, ratio) in stalls.items():
        print(f"| {label} | {gap:.0f} ms | {median:.1f} ms | {ratio:.1f}x |")
    if args.baseline:
        new, old = rounds["this tree"], rounds["baseline"]
        rate = statistics.median(a[0] for a in new) / statistics.median(b[0] for b in old)
        ttft = statistics.median(a[1] for a in new), statistics.median(b[1] for b in old)
        pairs = ", ".join(f"{a[0] / b[0]:.2f}x" for a, b in zip(new, old, strict=True))
        print(f"\nthis tree / baseline, medians of the rounds: {rate:.2f}x tokens/s (target >= 1.5x; round by "
              f"round {pairs}); TTFT p50 {ttft[0]:.0f} vs {ttft[1]:.0f} ms (target: no worse)")
    prefix = exact_prompt(tok, min(args.prefix_tokens, block - 16), offset=5000)
    tails = [exact_prompt(tok, 8, offset=20_000 + 500 * i) for i in range(9)]
    with serving(model, ckpts, *flags) as base:
        cached = prefix_ttft(base, model, prefix, tails)
    with serving(model, ckpts, *flags, "--prefix_cache_tokens", "0") as base:
        uncached = prefix_ttft(base, model, prefix, tails)
    print(f"\nshared {len(tok.encode(prefix))}-token prefix, TTFT p50: {cached:.0f} ms with the prefix cache, "
          f"{uncached:.0f} ms without: {uncached / cached:.1f}x (target >= 3x)")


if __name__ == "__main__":
    main()
