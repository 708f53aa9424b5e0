"""Peak memory of a training step, measured, next to mypt.estimate.estimate_memory.

usage: python bench/memory.py [--presets tiny small 150M] [--dtypes fp32 bf16] [--steps 2]
                              [--timing small]

Each case runs in a fresh process: it builds the model and fused AdamW (optimizer state made up
front), takes its resident memory as the baseline, resets the kernel's peak-RSS counter
(/proc/self/clear_refs) and runs --steps training steps of Trainer.train_step at the preset's
batch size. "measured" is the peak RSS over the baseline: gradients, activations and
temporaries, compared with estimate_memory's total less the fp32 weights and AdamW state
(which the baseline holds: those are compared separately, baseline over the bare interpreter). Linux (glibc) only.

Two processes per case, two malloc settings:
- "tensors": every block over 64 KiB is its own mmap, returned to the OS when freed, so RSS
  follows the bytes of live tensors (what the estimate models, and what a GPU would hold);
- "as shipped": what the Trainer sets up: reuse_freed_memory (freed blocks stay for reuse,
  which is faster) whose peak RSS adds heap fragmentation on top, or, with gradient
  checkpointing, glibc's defaults.

--timing PRESET times a step with and without gradient checkpointing, interleaved in one
process, for the time cost.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _machine import header

from mypt import dist
from mypt.config import TrainConfig, load_model_config
from mypt.estimate import count_params, estimate_memory, human_bytes
from mypt.model import GPT
from mypt.optim import make_optimizer
from mypt.trainer import Trainer, reuse_freed_memory

CPU = torch.device("cpu")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt() parameters


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trainer(preset: str, dtype: str, checkpointing: bool) -> tuple[Trainer, GPT]:
    cfg = load_model_config(preset)
    tc = TrainConfig(warmup_iters=0, learning_rate=1e-4, gradient_checkpointing=checkpointing)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.gradient_checkpointing = checkpointing
    optimizer = make_optimizer(model, tc, CPU)
    for p in model.parameters():  # AdamW's state (fp32 moments) exists from here on, as in training
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=1_000_000).astype(np.uint16)
    return Trainer(model, optimizer, tokens, tokens, cfg.block_size, cfg.batch_size, tc, CPU, dtype,
                   dist.DistInfo()), model


def child(preset: str, dtype: str, checkpointing: bool, steps: int, shipped: bool) -> None:
    """In the fresh process: baseline RSS, then the peak over `steps` training steps, as JSON."""
    start_kib = _status_kib("VmRSS")
    trainer, model = _trainer(preset, dtype, checkpointing)
    if not shipped:  # the Trainer may have turned reuse_freed_memory on: tensors mode
        reuse_freed_memory(False)
        mallopt = ctypes.CDLL("libc.so.6").mallopt
        assert mallopt(M_MMAP_THRESHOLD, 64 * 1024) == 1 and mallopt(M_TRIM_THRESHOLD, 64 * 1024) == 1
    base_kib = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    times = []
    for it in range(steps):
        t = time.perf_counter()
        loss, _ = trainer.train_step(it)
        loss.item()
        times.append(time.perf_counter() - t)
    peak_kib = _status_kib("VmHWM")
    print(json.dumps({"start": start_kib * 1024, "base": base_kib * 1024, "peak": peak_kib * 1024,
                      "seconds": times, "n_params": model.num_params()}))


def measure(preset: str, dtype: str, checkpointing: bool, steps: int, shipped: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", preset, dtype, str(int(checkpointing)), str(steps),
           str(int(shipped))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(presets: list[str], dtypes: list[str], steps: int) -> None:
    print("\nmeasured = peak RSS of the step(s) over the model + optimizer baseline, malloc returning freed "
          "tensors (see above); estimate = estimate_memory's total minus fp32 weights and optimizer state; "
          "ratio = estimate / measured. 'as shipped' = the same peak with the malloc setting the Trainer makes.\n")
    print("| preset | batch | dtype | checkpointing | measured | estimate | ratio | as shipped "
          "| weights+optimizer measured | estimate | step s |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    acts: dict[tuple[str, str], dict[bool, int]] = {}
    for preset in presets:
        cfg = load_model_config(preset)
        for dtype in dtypes:
            for ckpt in (False, True):
                r = measure(preset, dtype, ckpt, steps, shipped=False)
                as_shipped = measure(preset, dtype, ckpt, steps, shipped=True)
                est = estimate_memory(cfg, cfg.batch_size, dtype, ckpt, optimizer="adamw")  # as _trainer builds
                measured = r["peak"] - r["base"]
                static = 12 * r["n_params"]  # fp32 weights and AdamW's two moments: the baseline
                est_step = est.total - static  # what the step adds, bf16 weight copies included
                acts.setdefault((preset, dtype), {})[ckpt] = measured
                print(f"| {preset} | {cfg.batch_size} | {dtype} | {'on' if ckpt else 'off'} | {human_bytes(measured)} "
                      f"| {human_bytes(est_step)} | {est_step / measured:.2f} "
                      f"| {human_bytes(as_shipped['peak'] - as_shipped['base'])} "
                      f"| {human_bytes(r['base'] - r['start'])} "
                      f"| {human_bytes(static)} | {statistics.median(as_shipped['seconds']):.1f} |",
                      flush=True)
    print("\ngradient checkpointing, measured step memory with / without (and without the gradients' 4 bytes "
          "per parameter, i.e. activations and temporaries only):")
    for (preset, dtype), m in acts.items():
        grads = 4 * count_params(load_model_config(preset))
        print(f"- {preset} {dtype}: {human_bytes(m[True])} / {human_bytes(m[False])} = {m[True] / m[False]:.2f} "
              f"({(m[True] - grads) / (m[False] - grads):.2f})")


def timing(preset: str, rounds: int) -> None:
    """Step time with and without gradient checkpointing, interleaved in one process."""
    for dtype in ("fp32", "bf16"):
        trainer, model = _trainer(preset, dtype, False)
        times: dict[bool, list[float]] = {False: [], True: []}
        for it in range(rounds + 1):
            for ckpt in (False, True):
                model.gradient_checkpointing = ckpt
                t = time.perf_counter()
                trainer.train_step(it)[0].item()
                if it:
                    times[ckpt].append(time.perf_counter() - t)
        off, on = statistics.median(times[False]), statistics.median(times[True])
        print(f"- {preset} {dtype}: step {off:.2f} s without, {on:.2f} s with gradient checkpointing "
              f"(+{100 * (on / off - 1):.0f}%; medians of {rounds}, interleaved)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small", "150M"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=2, help="training steps per case (default: %(default)s)")
    p.add_argument("--timing", metavar="PRESET", help="time checkpointing on/off for this preset instead")
    p.add_argument("--rounds", type=int, default=3, help="with --timing: steps per variant")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        preset, dtype, ckpt, steps, reuse = args.child
        child(preset, dtype, ckpt == "1", int(steps), reuse == "1")
        return
    print(header("memory: peak memory of a training step"))
    if args.timing:
        timing(args.timing, args.rounds)
    else:
        table(args.presets, args.dtypes, args.steps)


if __name__ == "__main__":
    main()
