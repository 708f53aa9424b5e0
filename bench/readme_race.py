"""Race the README's training commands side by side: wall time to a validation loss, start-up included.

usage: python bench/readme_race.py [--run PRESET[:FLAGS] ...] [--repeat 3] [--target 1.88]
                                   [--input_file tinyshakespeare.txt] [--tokenizer char]

Each --run is one command, `python train.py --config_file configs/PRESET.json --model_name r
--tokenizer char --input_file FILE [FLAGS]` (no --input_file with `--input_file builtin`), in a
fresh checkpoints folder (so every run also
prepares its tokens, as a first run does). The clock starts when the process is started and
stops at each "eval at iter N" line train.py prints: the time to the first evaluation at or
below --target, the last evaluation and the whole run are all wall times including Python's
and torch's start-up. Rounds take the runs in turn (--repeat), so a busy machine slows them
alike; the table gives every round and the median.

default: --run shakespeare-char --run shakespeare-char-modern
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import header

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
EVAL_LINE = re.compile(r"eval at iter (\d+): train loss ([\d.]+), val loss ([\d.]+)")


def race_once(preset: str, flags: list[str], args: argparse.Namespace, name: str) -> dict[str, float | None]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep) / name if args.keep else Path(tmp) / "r"
        source = [] if str(args.input_file) == "builtin" else ["--input_file", str(args.input_file)]
        cmd = [sys.executable, str(REPO / "train.py"), "--config_file", f"configs/{preset}.json",
               "--model_name", folder.name, "--checkpoints_dir", str(folder.parent), "--tokenizer", args.tokenizer,
               *source, *flags]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        hit = last = None
        assert proc.stdout is not None
        for line in proc.stdout:
            match = EVAL_LINE.search(line)
            if match:
                now = time.perf_counter() - start
                last = (int(match[1]), float(match[3]), now)
                if hit is None and last[1] <= args.target:
                    hit = last
        if proc.wait() != 0:
            raise SystemExit(f"{' '.join(cmd)} failed with exit status {proc.returncode}")
        total = time.perf_counter() - start
    assert last is not None, "no evaluation was printed"
    return {"hit_seconds": hit[2] if hit else None, "hit_iter": hit[0] if hit else None, "final_iter": last[0],
            "final_val": last[1], "final_seconds": last[2], "total": total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", help="PRESET or PRESET:FLAGS (repeatable)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--target", type=float, default=1.88)
    p.add_argument("--input_file", type=Path, default=DATA, help="the text (builtin: the built-in corpus, as "
                   "the README's first command trains on)")
    p.add_argument("--tokenizer", default="char")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the runs (default: torch's choice)")
    p.add_argument("--keep", help="keep each run's checkpoint in this folder, as RUNINDEX-ROUND (for mypt eval)")
    args = p.parse_args()
    runs = args.run or ["shakespeare-char", "shakespeare-char-modern"]
    specs = [(r.split(":", 1)[0], shlex.split(r.split(":", 1)[1]) if ":" in r else []) for r in runs]
    print(header(f"readme_race: {args.input_file.name}, target val {args.target}"))
    results: dict[str, list[dict]] = {r: [] for r in runs}
    for round_ in range(args.repeat):
        for run, (preset, flags) in zip(runs, specs, strict=True):
            res = race_once(preset, flags, args, f"run{runs.index(run)}-round{round_ + 1}")
            results[run].append(res)
            hit = f"{res['hit_seconds']:.1f} s (iter {res['hit_iter']})" if res["hit_seconds"] else "not reached"
            print(f"round {round_ + 1} {run}: val <= {args.target} at {hit}; last eval iter {res['final_iter']} "
                  f"val {res['final_val']:.4f} at {res['final_seconds']:.1f} s; process {res['total']:.1f} s",
                  flush=True)
    print(f"\n| command | time to val <= {args.target} (median) | rounds | last val (median) | whole run |")
    print("| --- | ---: | --- | ---: | ---: |")
    for run, rows in results.items():
        hits = [r["hit_seconds"] for r in rows if r["hit_seconds"] is not None]
        med = f"{statistics.median(hits):.1f} s" if len(hits) == len(rows) else "not always reached"
        each = ", ".join(f"{r['hit_seconds']:.1f}" if r["hit_seconds"] else "-" for r in rows)
        print(f"| `{run}` | {med} | {each} | {statistics.median(r['final_val'] for r in rows):.4f} | "
              f"{statistics.median(r['total'] for r in rows):.1f} s |")


if __name__ == "__main__":
    main()
