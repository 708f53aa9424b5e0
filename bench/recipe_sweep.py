"""Sweep training recipes on tinyshakespeare (char tokenizer): loss per iteration and per second.

usage: python bench/recipe_sweep.py RUNS.json [--out results.jsonl] [--repeat N] [--step_time N]

RUNS.json is a list of runs, each {"name": ..., "config": preset, "arch": {field: value},
"train": {flag: value}, "tokenizer": "char" (default) or "gpt2"}: the preset with its
architecture fields replaced, trained with its "training" block and then the given flags
(train.py's precedence), through MyPT's `Trainer` as bench/time_to_loss.py does. Each
evaluation is printed and appended to --out as one JSON line with the iteration, the val loss,
the seconds since the first step and the seconds spent in evaluations so far: the loss curve
per iteration is deterministic, the seconds are not (the machine is shared), so the table
separates the two. --repeat runs the whole list N times in turn, so time comparisons between
runs are interleaved.

--step_time N times N training steps of each run instead (after 5 untimed ones), taking turns
step by step: the median wall and CPU milliseconds per step and the optimizer step's share.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _machine import header
from time_to_loss import DATA

from mypt import dist
from mypt.config import ModelConfig, load_model_config, new_run_train_config
from mypt.data import training_data
from mypt.model import GPT
from mypt.optim import make_optimizer
from mypt.tokenizers import build_tokenizer
from mypt.trainer import Trainer, TrainState


class _Quiet:
    def log(self, row: dict[str, Any]) -> None:
        pass

    def eval(self, iteration: int, losses: dict[str, float]) -> None:
        pass


def build(spec: dict[str, Any], cache: Path) -> tuple[GPT, Trainer]:
    base = load_model_config(spec.get("config", "shakespeare-char"))
    fields = {**base.to_dict(), **spec.get("arch", {})}
    char = spec.get("tokenizer", "char") == "char"
    cfg = ModelConfig.from_dict(fields, "sweep")
    tc, _ = new_run_train_config(cfg, spec.get("train", {}))
    tok, train, val = training_data([str(DATA)], None if char else build_tokenizer(spec["tokenizer"]), cache,
                                    tc.val_split, cfg.block_size)
    if char:
        cfg = ModelConfig.from_dict({**fields, "vocab_size": tok.n_vocab}, "sweep")
    device = torch.device("cpu")
    dtype = dist.pick_dtype(tc.dtype, device)
    torch.manual_seed(tc.seed)
    model = GPT(cfg)
    trainer = Trainer(model, make_optimizer(model, tc, device), train, val, cfg.block_size, cfg.batch_size, tc,
                      device, dtype, dist.DistInfo())
    return model, trainer


def run_one(spec: dict[str, Any], cache: Path, out: Path | None) -> list[dict[str, Any]]:
    model, trainer = build(spec, cache)
    eval_seconds = 0.0
    evaluate = trainer.evaluate

    def timed_evaluate() -> dict[str, float]:
        nonlocal eval_seconds
        t = time.perf_counter()
        result = evaluate()
        eval_seconds += time.perf_counter() - t
        return result

    trainer.evaluate = timed_evaluate  # type: ignore[method-assign]
    rows: list[dict[str, Any]] = []

    def on_eval(state: TrainState, row: dict[str, Any]) -> None:
        now = time.perf_counter() - t0
        rec = {"name": spec["name"], "iter": row["iter"], "val": round(row["val_loss"], 4),
               "train": round(row["train_loss"], 4), "seconds": round(now, 2), "eval_seconds": round(eval_seconds, 2),
               "params": model.num_params(), "dtype": trainer.dtype}
        rows.append(rec)
        print(json.dumps(rec), flush=True)
        if out is not None:
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")

    t0 = time.perf_counter()
    trainer.fit(TrainState(), lambda state, best: None, on_eval, _Quiet())
    return rows


def step_times(specs: list[dict[str, Any]], cache: Path, steps: int) -> None:
    """Time `steps` training steps of every run, in turn step by step."""
    runs = [build(spec, cache)[1] for spec in specs]
    times: dict[str, dict[str, list[float]]] = {s["name"]: {"wall": [], "cpu": [], "opt": []} for s in specs}
    for trainer in runs:
        for it in range(5):
            trainer.train_step(it)
    for it in range(5, 5 + steps):
        for spec, trainer in zip(specs, runs, strict=True):
            step = trainer.optimizer.step
            spent = [0.0]

            def timed_step(*a: Any, step: Any = step, spent: list[float] = spent, **k: Any) -> Any:
                t = time.perf_counter()
                result = step(*a, **k)
                spent[0] += time.perf_counter() - t
                return result

            trainer.optimizer.step = timed_step  # type: ignore[method-assign]
            wall, cpu = time.perf_counter(), time.process_time()
            trainer.train_step(it)
            row = times[spec["name"]]
            row["wall"].append(time.perf_counter() - wall)
            row["cpu"].append(time.process_time() - cpu)
            row["opt"].append(spent[0])
            trainer.optimizer.step = step  # type: ignore[method-assign]
    print("\n| run | ms/step (wall, median) | CPU ms/step (median) | optimizer step ms | optimizer share |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, row in times.items():
        wall, cpu, opt = (statistics.median(row[k]) * 1e3 for k in ("wall", "cpu", "opt"))
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {opt:.1f} | {100 * opt / wall:.0f}% |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--only", nargs="*", help="run only these names")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--step_time", type=int, metavar="N", help="time N steps of each run instead of training")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = json.loads(args.runs.read_text())
    if args.only:
        specs = [s for s in specs if s["name"] in args.only]
    print(header(f"recipe_sweep: {args.runs.name}, {len(specs)} runs x {args.repeat}"))
    with tempfile.TemporaryDirectory() as cache:
        if args.step_time:
            step_times(specs, Path(cache), args.step_time)
            return
        for _ in range(args.repeat):
            for spec in specs:
                run_one(spec, Path(cache), args.out)


if __name__ == "__main__":
    main()
