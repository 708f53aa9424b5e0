"""Benchmark: task evaluation speed against lm-evaluation-harness, and the built-in set's sensitivity.

    python bench/bench_eval.py                           # the full run (tens of minutes on a CPU)
    python bench/bench_eval.py --items 40 --iters 20     # a quick check of the script itself

1. Speed. A GPT-2-recipe model (--preset, gpt2 tokenizer, trained --speed_iters iterations on
   tinyshakespeare) is exported with `mypt export --format hf`. A multiple-choice task of --items
   items (4 choices each: the built-in shakespeare-words items) is written as JSON lines with a
   YAML task for lm-eval (target_delimiter ""). Both score it in this one process: MyPT through
   LoadedModel.evaluate_task (what `mypt eval --task` runs) and lm-eval through
   lm_eval.simple_evaluate(model="hf") on the export (what `lm_eval --model hf` runs), each timed
   from loading the model to the scores, best of --repeats. Prints items/s, the ratio, and the
   largest per-choice log-likelihood difference between the two (they must agree).
2. Agreement. The three routes to a task score, on two models (the speed model, GPT-2 recipe and
   tokenizer, and configs/shakespeare-char-chat.json, char tokenizer, rotary, QK-norm, SwiGLU:
   a Qwen3 export, trained --agree_iters iterations on tinyshakespeare),
   each on the same --agree_items items: `mypt eval --task` (LoadedModel.evaluate_task),
   `lm_eval --model local-completions` against `mypt serve` (started as a command), and
   `lm_eval --model hf` on `mypt export --format hf`. Prints acc and acc_norm per route and the
   largest per-choice log-likelihood difference from MyPT's.
3. Sensitivity. The README's first command (configs/shakespeare-char-modern.json, char tokenizer,
   the built-in corpus, --iters iterations, evaluated every half) is trained with --keep_every
   iters/2; the built-in task set (`--task builtin`) is scored at iteration 0 (the same model
   re-initialised: its zero-initialised head predicts uniformly, as at the start of training),
   at half and at the end. Prints acc ± stderr per task and the average centered score.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from _machine import header

from mypt.api import load_model
from mypt.cli import run_command
from mypt.evaluation import builtin
from mypt.evaluation.report import TaskResult
from mypt.evaluation.tasks import lm_eval_yaml

REPO = Path(__file__).resolve().parents[1]


def train(work: Path, name: str, flags: list[str]) -> None:
    code = run_command("train", ["--model_name", name, "--checkpoints_dir", str(work / "ck"), *flags])
    assert code == 0, f"training {name} failed"


def export(work: Path, name: str, out: Path) -> Path:
    """`mypt export --format hf` of the model `name` into out (a previous run's removed first)."""
    shutil.rmtree(out, ignore_errors=True)
    assert run_command("export", ["--checkpoints_dir", str(work / "ck"), "--model_name", name, "--out", str(out)]) == 0
    return out


def write_task(work: Path, n: int, name: str = "bench_mc") -> Path:
    items = builtin.words_task().items[:n]
    path = work / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"context": i.contexts[0], "choices": list(i.choices), "answer": i.answer})
                            + "\n" for i in items), encoding="utf-8")
    (work / "tasks").mkdir(exist_ok=True)
    (work / "tasks" / f"{name}.yaml").write_text(lm_eval_yaml(name, path), encoding="utf-8")
    return path


def time_mypt(work: Path, task: Path) -> tuple[float, list[tuple[float, ...]]]:
    start = time.perf_counter()
    lm = load_model("speed", work / "ck", device="cpu", dtype="fp32")
    [result] = lm.evaluate_task(str(task))
    return time.perf_counter() - start, [i.logprobs for i in result.items]


def time_lm_eval(work: Path, batch_size: int) -> tuple[float, list[tuple[float, ...]]]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    out = simple_evaluate(model="hf", model_args=f"pretrained={work / 'export'},dtype=float32", tasks=["bench_mc"],
                          task_manager=TaskManager(include_path=str(work / "tasks")), device="cpu",
                          batch_size=batch_size, log_samples=True)
    seconds = time.perf_counter() - start
    samples = sorted(out["samples"]["bench_mc"], key=lambda s: s["doc_id"])
    return seconds, [tuple(float(ll) for ll, _ in s["filtered_resps"]) for s in samples]


def speed(work: Path, args: argparse.Namespace, timed: bool = True) -> None:
    train(work, "speed", ["--config_file", args.preset, "--tokenizer", "gpt2", "--input_file",
                          "builtin:tinyshakespeare", "--max_iters", str(args.speed_iters),
                          "--eval_interval", str(args.speed_iters), "--eval_iters", "2", "--dtype", "fp32"])
    if not timed:
        return
    export(work, "speed", work / "export")
    task = write_task(work, args.items)
    mypt_s, ours = min((time_mypt(work, task) for _ in range(args.repeats)), key=lambda r: r[0])
    lm_s, theirs = min((time_lm_eval(work, args.lm_eval_batch) for _ in range(args.repeats)), key=lambda r: r[0])
    diff = max(abs(a - b) for x, y in zip(ours, theirs, strict=True) for a, b in zip(x, y, strict=True))
    print(header(f"Speed: {args.items} items x 4 choices, preset {args.preset}, CPU fp32, best of {args.repeats}"))
    print(f"mypt eval --task        {mypt_s:8.2f} s  {args.items / mypt_s:8.1f} items/s")
    print(f"lm_eval --model hf      {lm_s:8.2f} s  {args.items / lm_s:8.1f} items/s  (batch_size {args.lm_eval_batch})")
    print(f"ratio {lm_s / mypt_s:.2f}x; largest per-choice log-likelihood difference {diff:.2e} nats")


def lm_eval_scores(work: Path, model: str, model_args: str, task: str) -> tuple[dict, list[tuple[float, ...]]]:
    """lm_eval.simple_evaluate on the task in work/tasks: (acc and acc_norm, per-item log-likelihoods)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=[task], device="cpu", log_samples=True,
                          task_manager=TaskManager(include_path=str(work / "tasks")))
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    metrics = out["results"][task]
    return ({"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"]},
            [tuple(float(ll) for ll, _ in s["filtered_resps"]) for s in samples])


def serve(ckpts: Path, name: str) -> tuple[subprocess.Popen, str]:
    """`mypt serve` as a user starts it, on a free port; (the process, its /v1 URL) once it answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mypt", "serve", "--model_name", name, "--checkpoints_dir",
                             str(ckpts), "--port", str(port), "--log_level", "warning"], cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return proc, f"{url}/v1"
        except OSError:
            assert proc.poll() is None, "mypt serve exited"
            time.sleep(0.1)
    raise RuntimeError("mypt serve did not start")


def agreement(work: Path, args: argparse.Namespace) -> None:
    task = write_task(work, args.agree_items, "agree_mc")
    print(header(f"Agreement: {args.agree_items} items x 4 choices, three routes, CPU fp32"))
    train(work, "qwen3", ["--config_file", str(REPO / "configs" / "shakespeare-char-chat.json"), "--tokenizer",
                          "char", "--input_file", "builtin:tinyshakespeare", "--max_iters", str(args.agree_iters),
                          "--eval_interval", str(args.agree_iters), "--eval_iters", "10"])
    print(f"{'model':<10}{'route':<44}{'acc':>8}{'acc_norm':>10}{'largest difference (nats)':>28}")
    for name in ("speed", "qwen3"):
        folder = export(work, name, work / f"export-{name}")
        lm = load_model(name, work / "ck", device="cpu", dtype="fp32")
        [ours] = lm.evaluate_task(str(task))
        mine = [i.logprobs for i in ours.items]
        rows = [("mypt eval --task", {"acc": ours.acc, "acc_norm": ours.acc_norm}, mine)]
        proc, url = serve(work / "ck", name)
        try:
            rows.append(("lm_eval local-completions -> mypt serve", *lm_eval_scores(
                work, "local-completions", f"model={name},base_url={url}/completions,tokenizer_backend=huggingface,"
                f"tokenizer={folder},max_length={lm.config.block_size}", "agree_mc")))
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
        rows.append(("lm_eval hf -> mypt export", *lm_eval_scores(
            work, "hf", f"pretrained={folder},dtype=float32", "agree_mc")))
        for route, scores, lls in rows:
            diff = max(abs(a - b) for x, y in zip(mine, lls, strict=True) for a, b in zip(x, y, strict=True))
            print(f"{name:<10}{route:<44}{scores['acc']:>8.3f}{scores['acc_norm']:>10.3f}{diff:>28.2e}", flush=True)


def _line(label: str, results: list[TaskResult]) -> str:
    cells = [f"{r.acc:.3f} ± {r.stderr:.3f}" for r in results]
    centered = sum(r.centered for r in results) / len(results)
    return f"{label:<14}" + "".join(f"{c:>22}" for c in cells) + f"{centered:>12.3f}"


def sensitivity(work: Path, args: argparse.Namespace) -> None:
    half = args.iters // 2
    train(work, "readme", ["--config_file", str(REPO / "configs" / "shakespeare-char-modern.json"), "--tokenizer",
                           "char", "--max_iters", str(args.iters), "--eval_interval", str(half), "--eval_iters", "10",
                           "--keep_every", str(half)])
    tasks = builtin.builtin_tasks()
    print(header(f"Sensitivity: --task builtin, the README's first command's model ({args.iters} iterations)"))
    print(f"{'iteration':<14}" + "".join(f"{t.name:>22}" for t in tasks) + f"{'centered':>12}")
    readme = work / "ck" / "readme"
    for label, path, fresh in (("0", readme, True), (str(half), readme / f"iter_{half}", False),
                               (str(args.iters), readme, False)):
        lm = load_model(path=path, device="cpu")
        if fresh:  # iteration 0: the zero-initialised head predicts uniformly whatever the other weights are
            torch.manual_seed(0)
            lm.model.init_weights()
        print(_line(label, [r for t in tasks for r in lm.evaluate_task(t)]), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=250, help="speed: items of the multiple-choice task")
    p.add_argument("--preset", default="tiny", help="speed: the model's preset (GPT-2 recipe: exportable)")
    p.add_argument("--speed_iters", type=int, default=50, help="speed: iterations to train the model")
    p.add_argument("--lm_eval_batch", type=int, default=32, help="speed: lm-eval's --batch_size")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--iters", type=int, default=460, help="sensitivity: the README command's --max_iters")
    p.add_argument("--agree_items", type=int, default=100, help="agreement: items of the multiple-choice task")
    p.add_argument("--agree_iters", type=int, default=300, help="agreement: iterations of the second model")
    p.add_argument("--skip", choices=("speed", "agreement", "sensitivity"), action="append", default=[],
                   help="leave a part out (repeatable)")
    p.add_argument("--work", type=Path, help="folder for checkpoints and exports (default: a temporary one)")
    args = p.parse_args()
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        os.environ.setdefault("HF_HOME", str(work / "hf"))
        if "speed" not in args.skip or "agreement" not in args.skip:
            speed(work, args, timed="speed" not in args.skip)
        if "sensitivity" not in args.skip:
            sensitivity(work, args)
        if "agreement" not in args.skip:
            agreement(work, args)


if __name__ == "__main__":
    main()
