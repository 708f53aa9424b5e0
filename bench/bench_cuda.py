"""MyPT's CUDA paths on one GPU, checked and timed in one run (for a session lent a GPU).

usage: python bench/bench_cuda.py [--work DIR] [--out results.json] [--preset configs/150M.json]
                                  [--iters 30] [--device cuda] [--skip NAME ...] [--train_runs ...]

Each check runs the real commands (train.py, torchrun, generate.py, mypt serve, mypt eval) or the
API, records what it measured and whether its assertions held, and goes on to the next one even
if it fails; the results are printed as they come and written to --out as JSON after every check.

- peak: a bf16 8192^3 matrix product (CUDA events), the GPU's matrix rate in this run;
- train: train.py on builtin:tinyshakespeare with the preset (bf16 by --dtype auto), eager, with
  --compile, and with --compile at 4x the batch; tokens/s of the last log lines and the model FLOPs
  utilisation against the datasheet's dense bf16 rate (989 TFLOP/s for an H100/H200) and the peak;
- resume: the eager run resumed for more iterations by the same command;
- torchrun: a process per GPU on the tiny preset (over NCCL where there are several);
- generate: generate.py greedy, then with --lookup 8, bf16 and fp32: tokens/s and equal text;
- kv_cache: the cache's dtype under bf16 (the compute dtype) and its bytes;
- lookup: greedy with lookup equal to plain greedy past block_size, both position kinds, fp32 and bf16;
- quantize: --quantize int8 on the GPU refused with exit 2 and one message;
- serve: mypt serve on the GPU, 64 concurrent streaming completions, /health, /metrics parsed by
  prometheus_client;
- eval: mypt eval --task builtin on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
DATASHEET_BF16 = 989e12  # H100 / H200 SXM, dense bf16
MYPT = [sys.executable, "-c", "import sys; from mypt.cli import main; sys.exit(main())"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
results: dict[str, dict] = {}


def sh(cmd: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd[3:] if cmd[:3] == MYPT else cmd), flush=True)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**ENV, **(env or {})})
    tail = (r.stdout[-1500:] + "\n" + r.stderr[-2500:]).strip()
    print(f"  exit {r.returncode}\n  " + tail.replace("\n", "\n  "), flush=True)
    return r


def speeds(log: str) -> list[float]:
    lines = re.finditer(r"iter \d+: loss [\d.]+, lr \S+, ([\d,]+) tokens/s", log)
    return [float(m.group(1).replace(",", "")) for m in lines]


def check_peak(a) -> dict:
    x = torch.randn(8192, 8192, device=a.device, dtype=torch.bfloat16)
    for _ in range(3):
        x @ x
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        x @ x
    end.record()
    torch.cuda.synchronize()
    a.peak = 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3)
    return {"tflops": round(a.peak / 1e12, 1), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}


def train(a, name: str, *extra: str, iters: int | None = None) -> subprocess.CompletedProcess:
    preset = [] if "--config_file" in extra else ["--config_file", a.preset]
    return sh([sys.executable, "train.py", *preset, "--model_name", name, "--input_file",
               "builtin:tinyshakespeare", "--checkpoints_dir", a.work, "--max_iters", str(iters or a.iters),
               "--eval_interval", str(iters or a.iters), "--eval_iters", "5", "--log_interval", "5",
               "--device", a.device, *extra])


def check_train(a) -> dict:
    from mypt.api import load_model
    from mypt.estimate import flops_per_token

    out = {}
    preset = json.loads((ROOT / a.preset).read_text())
    bigger = Path(a.work) / "preset-4x-batch.json"  # the preset owns batch_size (a --batch_size flag is ignored)
    bigger.parent.mkdir(parents=True, exist_ok=True)
    bigger.write_text(json.dumps({**preset, "batch_size": 4 * preset["batch_size"]}))
    runs = (("eager", []), ("compile", ["--compile"]),
            ("compile_4x_batch", ["--compile", "--config_file", str(bigger)]))
    for label, extra in [run for run in runs if run[0] in a.train_runs]:
        t0 = time.time()
        r = train(a, f"m-{label}", *extra)
        tps = speeds(r.stdout + r.stderr)
        assert r.returncode == 0 and tps, f"{label}: exit {r.returncode}"
        steady = statistics.median(tps[len(tps) // 2:])
        flops = flops_per_token(load_model(f"m-{label}", a.work, device="cpu").config)
        out[label] = {"tokens_per_s": round(steady), "mfu_datasheet": round(steady * flops / DATASHEET_BF16, 3),
                      "mfu_measured_peak": round(steady * flops / getattr(a, "peak", DATASHEET_BF16), 3),
                      "seconds": round(time.time() - t0, 1), "all_tokens_per_s": tps}
        print(f"  -> {label}: {out[label]}", flush=True)
    out["flops_per_token"] = flops
    return out


def check_resume(a) -> dict:
    r = train(a, "m-eager", iters=a.iters + 10)
    log = r.stdout + r.stderr
    assert r.returncode == 0 and f"resuming 'm-eager' from iteration {a.iters}" in log, "did not resume"
    assert f"done: iteration {a.iters + 10}" in log
    return {"resumed": True}


def check_torchrun(a) -> dict:
    """train.py under torchrun, a process per GPU: over NCCL where there are several (one process
    makes no process group, so one GPU checks only the launch)."""
    gpus = torch.cuda.device_count() if a.device == "cuda" else 1
    r = sh([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(max(1, gpus)),
            "train.py", "--config_file", "configs/tiny.json", "--model_name", "tr", "--input_file",
            "builtin:tinyshakespeare", "--checkpoints_dir", a.work, "--max_iters", "10", "--eval_interval", "10",
            "--eval_iters", "2"], env={"NCCL_DEBUG": "INFO"})
    out = {"processes": max(1, gpus), "exit": r.returncode, "nccl": "NCCL INFO" in r.stdout + r.stderr}
    assert r.returncode == 0 and (out["nccl"] or gpus < 2), out
    return out


def generate(a, *flags: str) -> tuple[str, float]:
    r = sh([sys.executable, "generate.py", "--model_name", "m-eager", "--checkpoints_dir", a.work, "--device",
            a.device, "--prompt", "ROMEO:", "--max_new_tokens", "300", "--temperature", "0", "--no-stream", *flags])
    assert r.returncode == 0
    m = re.search(r"([\d.]+) tokens/s", r.stderr)
    return r.stdout, float(m.group(1)) if m else 0.0


def check_generate(a) -> dict:
    out = {}
    for dtype in ("bf16", "fp32"):
        plain, s1 = generate(a, "--dtype", dtype)
        lookup, s2 = generate(a, "--dtype", dtype, "--lookup", "8")
        out[dtype] = {"tokens_per_s": s1, "lookup_tokens_per_s": s2, "lookup_equal": plain == lookup}
    assert out["fp32"]["lookup_equal"], out
    return out


def check_kv_cache(a) -> dict:
    from mypt.api import load_model
    from mypt.model import GPT

    made = []
    new_cache = GPT.new_cache

    def recorded(self: GPT, *args, **kwargs):
        made.append(new_cache(self, *args, **kwargs))
        return made[-1]

    GPT.new_cache = recorded
    try:
        lm = load_model("m-eager", a.work, device=a.device, dtype="bf16")
        lm.generate("ROMEO:", max_new_tokens=20, temperature=0)
    finally:
        GPT.new_cache = new_cache
    k = made[-1].k
    assert k.dtype == torch.bfloat16 and k.device.type == torch.device(a.device).type, (k.dtype, k.device)
    return {"dtype": str(k.dtype), "bytes_k_and_v": 2 * k.numel() * k.element_size()}


def check_lookup(a) -> dict:
    from test_sampling import ROTARY, VOCAB, sharp_model

    from mypt.sampling import SamplingConfig, generate_ids

    out = {}
    for kind, fields in (("learned", {}), ("rotary", ROTARY)):
        m = sharp_model(**fields).to(a.device)
        for dtype in (torch.float32, torch.bfloat16):
            amp = lambda: torch.autocast(torch.device(a.device).type, dtype=dtype)  # noqa: B023, E731
            ids = []
            for lookup in (0, 6):
                cfg = SamplingConfig(max_new_tokens=60, temperature=0, lookup=lookup)
                ids.append(list(generate_ids(m, [1, 2, 3, 1, 2], cfg, vocab_size=VOCAB, seed=0, amp=amp, dtype=dtype)))
            out[f"{kind}-{str(dtype)[6:]}"] = ids[0] == ids[1]
    assert all(v for k, v in out.items() if k.endswith("float32")), out
    return out


def check_quantize(a) -> dict:
    r = sh([sys.executable, "generate.py", "--model_name", "m-eager", "--checkpoints_dir", a.work, "--device",
            a.device, "--quantize", "int8", "--prompt", "x", "--max_new_tokens", "5"])
    if a.device == "cpu":  # int8 runs there
        assert r.returncode == 0, r.stderr
        return {}
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    return {"message": r.stderr.strip()}


def check_serve(a) -> dict:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([*MYPT, "serve", "--model_name", "m-eager", "--checkpoints_dir", a.work, "--port",
                               str(port), "--device", a.device, "--max_batch", "64"], cwd=ROOT, env=ENV)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise AssertionError("the server did not come up in 120 s")

        def one(i: int) -> tuple[float, int]:
            t0, first, n = time.perf_counter(), None, 0
            body = {"model": "m-eager", "prompt": f"ROMEO {i}:", "max_tokens": 128, "stream": True, "temperature": 0.8}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                assert r.status_code == 200, r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        first = first or time.perf_counter() - t0
                        n += 1
            return first, n

        one(0)  # warm up
        t0 = time.perf_counter()
        with ThreadPoolExecutor(64) as pool:
            got = list(pool.map(one, range(64)))
        wall = time.perf_counter() - t0
        metrics = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
        assert "mypt_time_to_first_token_seconds" in metrics and "mypt_requests" in metrics, sorted(metrics)
        health = httpx.get(f"{url}/health").status_code
        assert health == 200
        chunks = sum(n for _, n in got)
        return {"streams": 64, "chunks": chunks, "chunks_per_s": round(chunks / wall, 1),
                "ttft_p50_s": round(statistics.median(f for f, _ in got), 3), "wall_s": round(wall, 2)}
    finally:
        server.terminate()
        server.wait(30)


def check_eval(a) -> dict:
    r = sh([*MYPT, "eval", "--model_name", "m-eager", "--checkpoints_dir", a.work, "--task", "builtin", "--device",
            a.device, "--json"])
    assert r.returncode == 0, r.stderr[-500:]
    return {"json_tail": r.stdout[-600:]}


CHECKS = {"peak": check_peak, "train": check_train, "generate": check_generate, "kv_cache": check_kv_cache,
          "lookup": check_lookup, "quantize": check_quantize, "serve": check_serve, "eval": check_eval,
          "resume": check_resume, "torchrun": check_torchrun}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/bench_cuda")
    p.add_argument("--out", default="bench_cuda.json")
    p.add_argument("--preset", default="configs/150M.json")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--device", default="cuda")
    p.add_argument("--skip", nargs="*", default=[], choices=list(CHECKS))
    p.add_argument("--train_runs", nargs="+", default=["eager", "compile", "compile_4x_batch"],
                   choices=["eager", "compile", "compile_4x_batch"],
                   help="which trainings 'train' times (keep 'eager': the later checks use its model)")
    a = p.parse_args()
    for name, fn in CHECKS.items():
        if name in a.skip:
            continue
        print(f"\n=== {name}", flush=True)
        t0 = time.time()
        try:
            results[name] = {"ok": True, **fn(a)}
        except Exception as e:  # noqa: BLE001 - record it and go on to the next check
            traceback.print_exc()
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        results[name]["seconds"] = round(time.time() - t0, 1)
        print(f"=== {name}: {json.dumps(results[name])[:1500]}", flush=True)
        Path(a.out).write_text(json.dumps(results, indent=1))
    print("\nsummary:", {k: v["ok"] for k, v in results.items()})


if __name__ == "__main__":
    main()
