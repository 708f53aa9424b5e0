"""Data preparation at scale: speed against tiktoken, memory, training start-up, kill and resume.

usage: flock /tmp/mypt-bench.lock python bench/bench_data.py [--size_gb 10] [--kills 10] [--interleaved_mb 500]

Builds a mixed corpus under --workdir from ../shared/data/tinyshakespeare.txt and the built-in
corpus: a folder of text files (one document each), JSON lines files and Parquet files (documents
of a few KB), with one .jsonl.gz and one .txt.zst among them. Then, each in a fresh process:

1. tiktoken alone: 2 threads of encode_to_numpy (and encode_ordinary_batch with num_threads=2,
   and 2 processes) over 4 MB pieces of the same kind of documents, held in memory; before and
   after step 2. With --interleaved_mb, also round by round against a prepare of a smaller corpus.
2. `mypt prepare --tokenizer gpt2` of the whole corpus into an empty cache: wall time, MB/s of
   document text, and resident memory sampled every 0.5 s (peak, and peak per quarter of the run).
3. Training start-up: `train.py --max_iters 1` (a 2-layer model) on the prepared corpus vs on a
   1 MB text, interleaved, 3 runs each; the wall time of the whole command.
4. Kill and resume: a smaller corpus of the same kinds (--kill_mb) is prepared once without
   interruption, then again with SIGKILL at --kills random moments, each run resuming the last;
   the shards, document indexes and manifest must be byte-identical.

Needs `pip install -e ".[data]"` (pyarrow, backports.zstd before Python 3.14) and about 1.7x --size_gb of free disk.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from _machine import header

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = next((p for p in (REPO.parent / "shared" / "data" / "tinyshakespeare.txt",
                                 REPO.parents[1] / "shared" / "data" / "tinyshakespeare.txt") if p.exists()),
                   REPO.parent / "shared" / "data" / "tinyshakespeare.txt")  # ../shared, or beside a worktree
MB = 1_000_000
DOC_BYTES = 3000  # about the size of a web page's text


# ---------------------------------------------------------------------------------------------
# The corpus


def paragraphs() -> list[str]:
    from mypt.data.builtin import DEFAULT, builtin_text

    text = SHAKESPEARE.read_text(encoding="utf-8") + "\n\n" + builtin_text(DEFAULT)
    return [p for p in text.split("\n\n") if p.strip()]


def documents(paras: list[str], seed: int):
    """Endless documents of about DOC_BYTES: runs of consecutive paragraphs from random places."""
    rng = random.Random(seed)
    while True:
        i, doc, n = rng.randrange(len(paras)), [], 0
        size = rng.randint(DOC_BYTES // 3, DOC_BYTES * 2)
        while n < size:
            doc.append(paras[i % len(paras)])
            n, i = n + len(doc[-1]), i + 1
        yield "\n\n".join(doc)


def write_jsonl(path: Path, docs, target: int, opener=open) -> int:
    written = 0
    with opener(path, "wt", encoding="utf-8") as f:
        while written < target:
            d = next(docs)
            f.write(json.dumps({"id": written, "text": d}, ensure_ascii=False) + "\n")
            written += len(d.encode("utf-8"))
    return written


def write_parquet(path: Path, docs, target: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    written = 0
    with pq.ParquetWriter(path, pa.schema([("text", pa.string()), ("url", pa.string())]), compression="zstd") as w:
        while written < target:
            rows, n = [], 0
            while n < 32 * MB:
                rows.append(next(docs))
                n += len(rows[-1])
            w.write_table(pa.table({"text": rows, "url": [f"https://example.org/{i}" for i in range(len(rows))]}))
            written += sum(len(r.encode("utf-8")) for r in rows)
    return written


def write_texts(folder: Path, paras: list[str], target: int, seed: int) -> int:
    """Text files of 0.5-2 MB, each one document: consecutive paragraphs from a random place."""
    rng, written, n = random.Random(seed), 0, 0
    while written < target:
        i, size, parts, got = rng.randrange(len(paras)), rng.randint(MB // 2, 2 * MB), [], 0
        while got < size:
            parts.append(paras[i % len(paras)])
            got, i = got + len(parts[-1]), i + 1
        data = "\n\n".join(parts).encode("utf-8")
        (folder / f"{n // 1000:03d}" / f"book{n:06d}.txt").parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{n // 1000:03d}" / f"book{n:06d}.txt").write_bytes(data)
        written, n = written + len(data), n + 1
    return written


def build(root: Path, total: int) -> int:
    """The mixed corpus under root (reused when its marker says it was finished); text bytes."""
    marker = root / "corpus.json"
    if marker.exists() and json.loads(marker.read_text())["target"] == total:
        return json.loads(marker.read_text())["text_bytes"]
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    paras = paragraphs()
    third = total // 3
    n = write_texts(root / "books", paras, third, 1)
    (root / "web").mkdir()
    small = min(100 * MB, third // 10)
    docs = documents(paras, 2)
    n += write_jsonl(root / "web" / "part-gz.jsonl.gz", docs, small, gzip.open)
    try:
        from compression import zstd
    except ImportError:
        from backports import zstd

    with zstd.open(root / "books" / "compressed.txt.zst", "wt", encoding="utf-8") as f:
        text = "\n\n".join(paras)
        for _ in range(max(1, small // len(text))):
            f.write(text)
            n += len(text.encode("utf-8"))
    k = 0
    while n < 2 * third:
        n += write_jsonl(root / "web" / f"part{k:03d}.jsonl", docs, min(500 * MB, 2 * third - n))
        k += 1
    (root / "pages").mkdir()
    k = 0
    while n < total:
        n += write_parquet(root / "pages" / f"part{k:03d}.parquet", documents(paras, 100 + k), min(500 * MB, total - n))
        k += 1
    marker.write_text(json.dumps({"target": total, "text_bytes": n}))
    return n


# ---------------------------------------------------------------------------------------------
# Measurements (each in a fresh process)


def _encode_piece(piece: str) -> object:
    from mypt.tokenizers import gpt2_encoding

    return gpt2_encoding().encode_to_numpy(piece, disallowed_special=())


def reference(size: int) -> dict:
    """tiktoken alone on `size` bytes of documents in 4 MB pieces: 2 threads of encode_to_numpy,
    encode_ordinary_batch(num_threads=2), and 2 processes of encode_to_numpy (the text pickled to
    them, the ids back). MB/s of text."""
    from mypt.tokenizers import gpt2_encoding

    enc = gpt2_encoding()
    docs, pieces, piece, n = documents(paragraphs(), 7), [], [], 0
    in_piece = 0
    while n < size:
        d = next(docs)
        piece.append(d)
        n += len(d.encode("utf-8"))
        in_piece += len(d)
        if in_piece > 4 * MB:
            pieces.append("\n\n".join(piece))
            piece, in_piece = [], 0
    pieces.append("\n\n".join(piece))
    total = sum(len(p.encode("utf-8")) for p in pieces) / MB
    t, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda p: enc.encode_to_numpy(p, disallowed_special=()), pieces))
    numpy_s, numpy_cpu = time.perf_counter() - t, time.process_time() - cpu
    t = time.perf_counter()
    enc.encode_ordinary_batch(pieces, num_threads=2)
    batch_s = time.perf_counter() - t
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_encode_piece, pieces[:2]))  # started and warm: count only the encoding
        t = time.perf_counter()
        list(pool.map(_encode_piece, pieces))
        process_s = time.perf_counter() - t
    return {"encode_to_numpy_2_threads": total / numpy_s, "encode_ordinary_batch_2_threads": total / batch_s,
            "encode_to_numpy_2_processes": total / process_s, "mb_per_cpu_second": total / numpy_cpu}


def rss_sampler(pid: int, samples: list[tuple[float, int]], hwm: list[int], stop: threading.Event) -> None:
    """Resident memory every 0.5 s, and the kernel's high-water mark (VmHWM) of the process."""
    t0 = time.perf_counter()
    while not stop.is_set():
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        except (OSError, ValueError):
            break
        samples.append((time.perf_counter() - t0, int(status["VmRSS"].split()[0]) * 1024))
        hwm.append(int(status["VmHWM"].split()[0]) * 1024)
        stop.wait(0.5)


def prepare_cmd(inputs: list[Path], ckpts: Path, *extra: str) -> list[str]:
    flags = [a for p in inputs for a in ("--input_file", str(p))]
    return [sys.executable, "-m", "mypt", "prepare", *flags, "--checkpoints_dir", str(ckpts), *extra]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_prepare(inputs: list[Path], ckpts: Path) -> dict:
    samples: list[tuple[float, int]] = []
    hwm: list[int] = []
    stop = threading.Event()
    t, cpu = time.perf_counter(), _children_cpu()
    proc = subprocess.Popen(prepare_cmd(inputs, ckpts), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    sampler = threading.Thread(target=rss_sampler, args=(proc.pid, samples, hwm, stop))
    sampler.start()
    out, _ = proc.communicate()
    seconds, cpu = time.perf_counter() - t, _children_cpu() - cpu
    stop.set()
    sampler.join()
    assert proc.returncode == 0, out
    quarters = [max((r for s, r in samples if q * seconds / 4 <= s < (q + 1) * seconds / 4), default=0)
                for q in range(4)]
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss": max(r for _, r in samples), "quarters": quarters,
            "out": out.strip(), "max_rss": max(hwm)}


def train_cmd(inputs: list[Path], ckpts: Path, name: str) -> list[str]:
    flags = [a for p in inputs for a in ("--input_file", str(p))]
    return [sys.executable, str(REPO / "train.py"), "--model_name", name, *flags, "--checkpoints_dir", str(ckpts),
            "--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64", "--batch_size", "4",
            "--max_iters", "1", "--eval_interval", "1", "--eval_iters", "1", "--device", "cpu", "--dtype", "fp32"]


def startup(big: list[Path], small: list[Path], ckpts: Path, rounds: int = 3) -> dict:
    """Wall time of a one-iteration train.py on each corpus (already prepared), interleaved."""
    times: dict[str, list[float]] = {"big": [], "small": []}
    for r in range(rounds):
        for which, inputs in (("big", big), ("small", small)):
            t = time.perf_counter()
            res = subprocess.run(train_cmd(inputs, ckpts, f"{which}{r}"), capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            times[which].append(time.perf_counter() - t)
            assert res.returncode == 0, res.stderr
            data_lines = [line for line in res.stdout.splitlines() if line.startswith("data:")]
            if r == 0:
                print(f"    {which}: {data_lines}", flush=True)
    return {k: statistics.median(v) for k, v in times.items()} | {"all": times}


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "lock"}


def _records(ckpts: Path) -> int:
    """Finished shards of an unfinished prepare (their records), 0 before there are any."""
    return len(list((ckpts / ".cache").glob("*/[0-9]*.json"))) if (ckpts / ".cache").exists() else 0


def kill_and_resume(inputs: list[Path], work: Path, kills: int, seed: int) -> dict:
    """Prepare once whole; then again, each run SIGKILLed at a random moment (after 0-2 more
    shards and a random part of the next one) and the next run resuming it, `kills` times."""
    whole, killed = work / "whole", work / "killed"
    shard = ["--shard_tokens", str(1 << 21)]
    t = time.perf_counter()
    subprocess.run(prepare_cmd(inputs, whole, *shard), check=True, capture_output=True)
    full = time.perf_counter() - t
    rng, moments = random.Random(seed), []
    while len(moments) < kills:
        proc = subprocess.Popen(prepare_cmd(inputs, killed, *shard), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        t, target = time.perf_counter(), _records(killed) + rng.randint(0, 2)
        while _records(killed) < target and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 1.5))
        if proc.poll() is not None:
            raise SystemExit("a resumed prepare finished before its kill: use a bigger --kill_mb")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        moments.append(round(time.perf_counter() - t, 2))
        print(f"    kill {len(moments)} at {moments[-1]:.2f} s into the run: {_records(killed)} shard(s) kept",
              flush=True)
    subprocess.run(prepare_cmd(inputs, killed, *shard), check=True, capture_output=True)
    [a] = [p for p in (whole / ".cache").iterdir() if p.is_dir()]
    [b] = [p for p in (killed / ".cache").iterdir() if p.is_dir()]
    return {"uninterrupted_s": round(full, 1), "kills": len(moments), "identical": tree_bytes(a) == tree_bytes(b),
            "files_compared": len(tree_bytes(a))}


# ---------------------------------------------------------------------------------------------


def run_child(kind: str, arg: str) -> None:
    if kind == "reference":
        print(json.dumps(reference(int(arg))))


def child(kind: str, arg: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, arg], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size_gb", type=float, default=10.0, help="text in the big corpus, GB (default: 10)")
    p.add_argument("--reference_mb", type=int, default=300, help="text tiktoken encodes alone (default: 300)")
    p.add_argument("--kills", type=int, default=10, help="SIGKILLs of the kill-and-resume run (default: 10)")
    p.add_argument("--kill_mb", type=int, default=300, help="text of the kill-and-resume corpus (default: 300)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mypt-bench-data")
    p.add_argument("--interleaved_mb", type=int, default=0,
                   help="also compare prepare and tiktoken alone on a corpus of this size, round by round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the interleaved comparison (default: 3)")
    p.add_argument("--skip", nargs="*", default=[], choices=("speed", "startup", "kills"))
    p.add_argument("--keep", action="store_true", help="keep the corpora and caches afterwards")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run_child(*args.child)
        return
    print(header("bench_data: mypt prepare at scale"), flush=True)
    print(f"disk: {shutil.disk_usage(tempfile.gettempdir()).free / 1e9:.0f} GB free in {tempfile.gettempdir()}")
    work = args.workdir
    big = work / "big"
    t = time.perf_counter()
    text_bytes = build(big, int(args.size_gb * 1e9))
    print(f"corpus: {text_bytes / 1e9:.2f} GB of document text in {big} "
          f"(built or found in {time.perf_counter() - t:.0f} s)", flush=True)
    inputs = [big / "books", big / "web", big / "pages"]
    ckpts = work / "checkpoints"
    if "speed" not in args.skip:
        shutil.rmtree(ckpts, ignore_errors=True)
        before = child("reference", str(args.reference_mb * MB))
        print(f"  tiktoken alone, before: {before}", flush=True)
        run = timed_prepare(inputs, ckpts)
        after = child("reference", str(args.reference_mb * MB))
        print(f"  tiktoken alone, after: {after}", flush=True)
        ref = statistics.mean([max(v for k, v in r.items() if k != "mb_per_cpu_second") for r in (before, after)])
        ref_cpu = statistics.mean([before["mb_per_cpu_second"], after["mb_per_cpu_second"]])
        speed, per_cpu = text_bytes / MB / run["seconds"], text_bytes / MB / run["cpu_seconds"]
        print(f"  mypt prepare: {run['seconds']:.0f} s, {speed:.1f} MB/s = {speed / ref:.0%} of tiktoken's "
              f"{ref:.1f} MB/s; {per_cpu:.1f} MB per CPU-second = {per_cpu / ref_cpu:.0%} of tiktoken's "
              f"{ref_cpu:.1f}; peak RSS {run['max_rss'] / 2**20:.0f} MiB (sampled {run['peak_rss'] / 2**20:.0f}, "
              f"per quarter {[round(q / 2**20) for q in run['quarters']]} MiB)\n  {run['out']}", flush=True)
    if args.interleaved_mb:
        mid = work / "mid"
        n = build(mid / "corpus", args.interleaved_mb * MB)
        ratios = []
        for r in range(args.rounds):
            alone = child("reference", str(n))
            ref = max(v for k, v in alone.items() if k != "mb_per_cpu_second")
            shutil.rmtree(mid / "checkpoints", ignore_errors=True)
            run = timed_prepare([mid / "corpus" / d for d in ("books", "web", "pages")], mid / "checkpoints")
            speed, per_cpu = n / MB / run["seconds"], n / MB / run["cpu_seconds"]
            ratios.append((speed / ref, per_cpu / alone["mb_per_cpu_second"]))
            print(f"  interleaved round {r + 1} ({n / MB:.0f} MB): tiktoken alone {alone}; mypt prepare "
                  f"{speed:.1f} MB/s = {speed / ref:.0%}, {per_cpu:.1f} MB per CPU-second = {ratios[-1][1]:.0%}; "
                  f"peak RSS {run['max_rss'] / 2**20:.0f} MiB", flush=True)
        print(f"  interleaved: median {statistics.median(r[0] for r in ratios):.0%} of tiktoken's speed, "
              f"{statistics.median(r[1] for r in ratios):.0%} of its MB per CPU-second", flush=True)
    if "startup" not in args.skip:
        small = work / "small"
        small.mkdir(parents=True, exist_ok=True)
        (small / "input.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8")[:MB], encoding="utf-8")
        subprocess.run(prepare_cmd([small / "input.txt"], ckpts), check=True, capture_output=True)
        s = startup(inputs, [small / "input.txt"], ckpts)
        print(f"  start-up (median of 3, train.py --max_iters 1): {args.size_gb:g} GB corpus {s['big']:.2f} s, "
              f"1 MB corpus {s['small']:.2f} s, difference {s['big'] - s['small']:+.2f} s; all: {s['all']}",
              flush=True)
    if "kills" not in args.skip:
        kill_root = work / "kill"
        n = build(kill_root / "corpus", args.kill_mb * MB)
        shutil.rmtree(kill_root / "whole", ignore_errors=True)
        shutil.rmtree(kill_root / "killed", ignore_errors=True)
        k = kill_and_resume([kill_root / "corpus" / d for d in ("books", "web", "pages")], kill_root, args.kills,
                            seed=int(time.time()))
        print(f"  kill and resume ({n / 1e6:.0f} MB): {k}", flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
