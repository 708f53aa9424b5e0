"""Sweep training recipes on tinyshakespeare (char tokenizer): loss per iteration and per second.

usage: python bench/recipe_sweep.py RUNS.json [--out results.jsonl] [--repeat N]

RUNS.json is a list of runs, each {"name": ..., "config": preset, "arch": {field: value},
"train": {flag: value}}: the preset with its architecture fields replaced, trained with its
"training" block and then the given flags (train.py's precedence), through MyPT's `Trainer`
as bench/time_to_loss.py does. Each evaluation is printed and appended to --out as one JSON
line with the iteration, the val loss, the seconds since the first step and the seconds spent
in evaluations so far: the loss curve per iteration is deterministic, the seconds are not (the
machine is shared), so the table separates the two. --repeat runs the whole list N times in
turn, so time comparisons between runs are interleaved.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _machine import header
from time_to_loss import DATA

from mypt import dist
from mypt.config import ModelConfig, load_model_config, new_run_train_config
from mypt.data import char_vocab_of_file, load_splits, prepare_tokens
from mypt.model import GPT
from mypt.optim import make_optimizer
from mypt.tokenizers import build_tokenizer
from mypt.trainer import Trainer, TrainState


class _Quiet:
    def log(self, row: dict[str, Any]) -> None:
        pass

    def eval(self, iteration: int, losses: dict[str, float]) -> None:
        pass


def run_one(spec: dict[str, Any], cache: Path, out: Path | None) -> list[dict[str, Any]]:
    base = load_model_config(spec.get("config", "shakespeare-char"))
    tok = build_tokenizer("char", "".join(char_vocab_of_file(DATA)))
    cfg = ModelConfig.from_dict({**base.to_dict(), **spec.get("arch", {}), "vocab_size": tok.n_vocab}, "sweep")
    tc, _ = new_run_train_config(cfg, spec.get("train", {}))
    train, val = load_splits(prepare_tokens(DATA, tok, cache, progress=False), tc.val_split, cfg.block_size, "data")
    device = torch.device("cpu")
    dtype = dist.pick_dtype(tc.dtype, device)
    torch.manual_seed(tc.seed)
    model = GPT(cfg)
    trainer = Trainer(model, make_optimizer(model, tc, device), train, val, cfg.block_size, cfg.batch_size, tc,
                      device, dtype, dist.DistInfo())
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
               "params": model.num_params(), "dtype": dtype}
        rows.append(rec)
        print(json.dumps(rec), flush=True)
        if out is not None:
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")

    t0 = time.perf_counter()
    trainer.fit(TrainState(), lambda state: None, on_eval, _Quiet())
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--only", nargs="*", help="run only these names")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = json.loads(args.runs.read_text())
    if args.only:
        specs = [s for s in specs if s["name"] in args.only]
    print(header(f"recipe_sweep: {args.runs.name}, {len(specs)} runs x {args.repeat}"))
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(args.repeat):
            for spec in specs:
                run_one(spec, Path(cache), args.out)


if __name__ == "__main__":
    main()
