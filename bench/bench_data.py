"""Data preparation speed and memory: mypt.data.prepare_tokens with the gpt2 tokenizer.

usage: python bench/bench_data.py [--sizes 100 500] [--repeats 1]

Builds text files of the given sizes (MB) under /tmp by repeating tinyshakespeare, then
tokenizes each into an empty cache folder in a fresh process, which reports the wall time of
prepare_tokens (the UTF-8 check and sha256 pass plus the tokenizing pass) and its peak RSS
(ru_maxrss) before and after. Memory that does not grow with the file size shows as the same
peak for every size.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import header

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
MB = 1_000_000


def big_file(size_mb: int) -> Path:
    """tinyshakespeare repeated to size_mb megabytes (cut at a line end), made once under /tmp."""
    path = Path(tempfile.gettempdir()) / f"mypt-bench-{size_mb}MB.txt"
    if path.exists() and abs(path.stat().st_size - size_mb * MB) < DATA.stat().st_size:
        return path
    text = DATA.read_bytes()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        written = 0
        while written + len(text) <= size_mb * MB:
            f.write(text)
            written += len(text)
        rest = text[:size_mb * MB - written]
        f.write(rest[:rest.rfind(b"\n") + 1])
    tmp.replace(path)
    return path


def child(path: Path) -> None:
    """Runs in the fresh process: tokenize path, print what it cost as JSON."""
    from mypt.data import prepare_tokens
    from mypt.tokenizers import build_tokenizer

    tok = build_tokenizer("gpt2")
    tok.encode("warm up the tokenizer")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as cache:
        cpu, t = time.process_time(), time.perf_counter()
        token_file = prepare_tokens(path, tok, cache, progress=False)
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "rss_before_kib": before, "rss_peak_kib": after,
                      "n_tokens": token_file.n_tokens}))


def measure(path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(path)], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 500], help="file sizes in MB")
    p.add_argument("--repeats", type=int, default=1, help="runs per size (the median is shown)")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child)
        return
    print(header("bench_data: prepare_tokens, gpt2 tokenizer"))
    print("\nMB/s is wall-clock; MB per CPU-second counts both cores' work, so on a loaded machine it shows what "
          "the code costs whatever share of the cores it got.\n")
    print("| file | MB | seconds | MB/s | CPU seconds | MB per CPU-second | tokens | peak RSS before "
          "| peak RSS after |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size in args.sizes:
        path = big_file(size)
        runs = [measure(path) for _ in range(args.repeats)]
        secs = statistics.median(r["seconds"] for r in runs)
        cpu = statistics.median(r["cpu_seconds"] for r in runs)
        r = runs[0]
        mb = path.stat().st_size / MB
        print(f"| {path.name} | {mb:.0f} | {secs:.1f} | {mb / secs:.1f} | {cpu:.1f} | {mb / cpu:.1f} "
              f"| {r['n_tokens']:,} | {r['rss_before_kib'] / 1024:.0f} MiB "
              f"| {max(x['rss_peak_kib'] for x in runs) / 1024:.0f} MiB |",
              flush=True)


if __name__ == "__main__":
    main()
