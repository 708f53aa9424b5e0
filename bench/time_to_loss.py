"""Time to a validation loss on tinyshakespeare (char tokenizer unless --tokenizer), through MyPT's trainer.

usage: python bench/time_to_loss.py [--config_file shakespeare-char] [--target 1.88] [--budget 60]
                                    [train.py's training flags ...] [--cli]

Builds what `train.py` builds (preset, char tokenizer of the file, token cache, model, fused AdamW,
`Trainer`) and runs `Trainer.fit`, the loop train.py runs, evaluating every --eval_interval
iterations. Checkpoint saves and metric files are left out, so the clock counts only training
and evaluation, from the first step: the time at which an evaluation finished with val loss at
or below --target, and the val loss of the first evaluation at or after --budget seconds (the
run then stops). Every evaluation is printed with its time.

--cli runs the real `train.py` with the same flags instead and reads its metrics.jsonl; its
"elapsed" also counts the checkpoint saved and the plot drawn at each evaluation.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _machine import header

from mypt import dist
from mypt.cli.train import add_arguments, train_flags
from mypt.config import ModelConfig, TrainConfig, load_model_config, new_run_train_config
from mypt.data import training_data
from mypt.model import GPT
from mypt.optim import make_optimizer
from mypt.tokenizers import build_tokenizer
from mypt.trainer import Trainer, TrainState

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


class _Quiet:
    def log(self, row: dict[str, Any]) -> None:
        pass

    def eval(self, iteration: int, losses: dict[str, float]) -> None:
        pass


def run_trainer(cfg: ModelConfig, tc: TrainConfig, input_file: Path, target: float, budget: float,
                cache: Path, tokenizer: str = "char") -> list[dict[str, float]]:
    tok, train_data, val_data = training_data([str(input_file)], None if tokenizer == "char" else
                                              build_tokenizer(tokenizer), cache, tc.val_split, cfg.block_size)
    if tokenizer == "char":
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "vocab_size": tok.n_vocab}, "config")
    device = torch.device("cpu")
    dtype = dist.pick_dtype(tc.dtype, device)
    torch.manual_seed(tc.seed)
    model = GPT(cfg)
    model.gradient_checkpointing = tc.gradient_checkpointing
    optimizer = make_optimizer(model, tc, device)
    runnable = torch.compile(model) if tc.compile else model
    trainer = Trainer(runnable, optimizer, train_data, val_data, cfg.block_size, cfg.batch_size, tc, device,
                      dtype, dist.DistInfo())
    print(f"model: {model.num_params():,} parameters, {cfg.n_layer} x {cfg.n_embd}, block {cfg.block_size}, "
          f"batch {cfg.batch_size}, vocab {cfg.vocab_size}, {dtype}; {tc}")
    evals: list[dict[str, float]] = []

    def on_eval(state: TrainState, row: dict[str, Any]) -> None:
        now = time.perf_counter() - t0
        evals.append({"iter": row["iter"], "seconds": now, "val_loss": row["val_loss"],
                      "train_loss": row["train_loss"]})
        print(f"  {now:6.1f} s  iter {row['iter']:5d}  train {row['train_loss']:.4f}  val {row['val_loss']:.4f}",
              flush=True)
        if now >= budget:
            trainer.stop_signal = signal.SIGTERM  # fit() returns after this iteration

    t0 = time.perf_counter()
    trainer.fit(TrainState(), lambda state: None, on_eval, _Quiet())
    return evals


def run_cli(args: argparse.Namespace, rest: list[str]) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = [] if "--tokenizer" in rest else ["--tokenizer", "char"]
        cmd = [sys.executable, str(REPO / "train.py"), "--model_name", "ttl", "--checkpoints_dir", tmp,
               *tokenizer, "--input_file", str(args.input_file), *rest]
        print("running:", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        rows = [json.loads(line) for line in (Path(tmp) / "ttl" / "metrics.jsonl").read_text().splitlines()]
    evals = [{"iter": r["iter"], "seconds": r["elapsed"], "val_loss": r["val_loss"], "train_loss": r["train_loss"]}
             for r in rows if "val_loss" in r]
    for e in evals:
        print(f"  {e['seconds']:6.1f} s  iter {e['iter']:5d}  train {e['train_loss']:.4f}  val {e['val_loss']:.4f}")
    return evals


def summarize(evals: list[dict[str, float]], target: float, budget: float) -> None:
    hit = next((e for e in evals if e["val_loss"] <= target), None)
    at_budget = next((e for e in evals if e["seconds"] >= budget), evals[-1])
    if hit:
        print(f"val loss <= {target}: reached at {hit['seconds']:.1f} s (iteration {hit['iter']}, "
              f"val {hit['val_loss']:.4f})")
    else:
        print(f"val loss <= {target}: not reached (best {min(e['val_loss'] for e in evals):.4f})")
    print(f"val loss after {budget:.0f} s: {at_budget['val_loss']:.4f} (evaluation at {at_budget['seconds']:.1f} s, "
          f"iteration {at_budget['iter']})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", type=float, default=1.88, help="val loss to reach (default: %(default)s)")
    p.add_argument("--budget", type=float, default=60.0, help="seconds of training to report the loss at")
    p.add_argument("--cli", action="store_true", help="run train.py itself (its times include checkpoint saves)")
    p.add_argument("--input_file", type=Path, default=DATA)
    args, rest = p.parse_known_args()
    if "--config_file" not in rest:
        rest = ["--config_file", "shakespeare-char", *rest]
    train_parser = argparse.ArgumentParser()
    add_arguments(train_parser)
    targs = train_parser.parse_args(["--model_name", "ttl", *rest])
    print(header(f"time_to_loss: {args.input_file.name}, {targs.tokenizer or 'char'} tokenizer"))
    if args.cli:
        evals = run_cli(args, rest)
    else:
        cfg = load_model_config(targs.config_file)
        tc, _ = new_run_train_config(cfg, train_flags(targs))
        with tempfile.TemporaryDirectory() as cache:
            evals = run_trainer(cfg, tc, args.input_file, args.target, args.budget, Path(cache),
                                targs.tokenizer or "char")
    summarize(evals, args.target, args.budget)


if __name__ == "__main__":
    main()
