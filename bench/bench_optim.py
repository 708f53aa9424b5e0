"""Muon's step: torch.optim.Muon against MyPT's (mypt.optim.Muon), bf16 and fp32, per preset.

usage: python bench/bench_optim.py [--presets shakespeare-char-modern tiny small-modern] [--rounds 20]

For each preset, Muon's parameters (the blocks' matrices) with random gradients, stepped by
torch.optim.Muon (which orthogonalises each matrix in bf16, one after another) and by
mypt.optim.Muon with its batched orthogonalisation in bf16 and in fp32, taking turns step by
step; also AdamW over the same parameters for scale. Prints the median milliseconds per step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _machine import header

from mypt.config import load_model_config
from mypt.dist import cpu_has_fast_bf16
from mypt.model import GPT
from mypt.optim import Muon, is_hidden_matrix


def optimizers(params: list[torch.nn.Parameter]) -> dict[str, torch.optim.Optimizer]:
    kw = {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.1}
    return {
        "torch.optim.Muon (bf16, one matrix at a time)": torch.optim.Muon(params, **kw),
        "mypt Muon, bf16, batched by shape": Muon(params, ns_dtype=torch.bfloat16, **kw),
        "mypt Muon, fp32, batched by shape": Muon(params, ns_dtype=torch.float32, **kw),
        "AdamW (fused), same parameters": torch.optim.AdamW(params, lr=1e-3, fused=True),
    }


def bench_preset(name: str, rounds: int) -> None:
    cfg = load_model_config(name)
    model = GPT(cfg)
    params = [p for n, p in model.named_parameters() if is_hidden_matrix(n, p)]
    for p in params:
        p.grad = torch.randn_like(p)
    runs = optimizers(params)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for it in range(rounds + 2):
        for label, opt in runs.items():
            t = time.perf_counter()
            opt.step()
            if it >= 2:
                times[label].append(time.perf_counter() - t)
    n = sum(p.numel() for p in params)
    print(f"\n## {name}: {len(params)} matrices, {n:,} parameters, {rounds} steps each, interleaved\n")
    print("| optimizer | ms/step (median) |")
    print("| --- | ---: |")
    for label, ts in times.items():
        print(f"| {label} | {statistics.median(ts) * 1e3:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["shakespeare-char-modern", "tiny", "small-modern"])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(header("bench_optim: Muon's step"))
    print(f"fast bf16 on this CPU (mypt.dist.cpu_has_fast_bf16): {cpu_has_fast_bf16()}")
    for name in args.presets:
        bench_preset(name, args.rounds)


if __name__ == "__main__":
    main()
