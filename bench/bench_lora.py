"""LoRA against full fine-tuning: peak memory, step time and trainable parameters, side by side.

usage: python bench/bench_lora.py [--shapes small-modern qwen3-0.6b] [--rank 16] [--steps 6]
                                  [--batch_size 4] [--block_size 256] [--threads 2]

Each (shape, mode) runs in a fresh process: it builds the model with random weights (no
download; the shapes are the public configs'), optionally applies LoRA of --rank on every linear
layer of the blocks (alpha 2 x rank), makes the optimizer the Trainer makes (mypt.optim: AdamW
over the trainable parameters), then times --steps training steps (forward, backward, step,
after one warm-up step) on random tokens. Peak memory is the process's peak RSS (ru_maxrss),
which includes the weights. The modes of a shape run one after the other, alternately, twice.

Shapes:
- small-modern: configs/small-modern.json (29.9M parameters, vocabulary 50304).
- qwen3-0.6b: Qwen3-0.6B's public config.json values at full depth (28 layers, hidden 1024, 16
  heads of 128, 8 key/value heads, MLP 3072, vocabulary 151936, tied, QK-norm, RMSNorm, SwiGLU,
  rope theta 1e6): the shape `mypt import` builds from that config (0.6B parameters).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "small-modern": {"preset": "configs/small-modern.json"},
    "qwen3-0.6b": {"fields": {"n_layer": 28, "n_head": 16, "n_kv_head": 8, "n_embd": 1024, "head_size": 128,
                              "intermediate_size": 3072,
                              "vocab_size": 151936, "block_size": 256, "batch_size": 4, "dropout": 0.0,
                              "bias": False, "position": "rope", "rope_theta": 1e6, "norm": "rmsnorm",
                              "norm_eps": 1e-6, "mlp": "swiglu", "qk_norm": True, "tie_embeddings": True}},
}


def child(shape: str, mode: str, rank: int, steps: int, batch: int, block: int, threads: int) -> dict:
    import torch

    from mypt.config import LoRAConfig, ModelConfig, TrainConfig, load_model_config
    from mypt.finetune.lora import apply_lora, trainable_count
    from mypt.model import GPT
    from mypt.optim import make_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # python, torch and mypt imported
    spec = SHAPES[shape]
    cfg = load_model_config(str(REPO / spec["preset"])) if "preset" in spec else ModelConfig(**spec["fields"])
    model = GPT(cfg)
    if mode == "lora":
        # and four trained rows, as mypt finetune's chat tokens (the last ids: the vocabulary's padding)
        chat = tuple(range(cfg.vocab_size - 4, cfg.vocab_size))
        apply_lora(model, LoRAConfig(rank=rank, alpha=2.0 * rank, tokens=chat))
    optimizer = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    times = []
    for step in range(steps + 1):
        x = torch.randint(0, cfg.vocab_size, (batch, block + 1), generator=g)
        start = time.perf_counter()
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
    return {"shape": shape, "mode": mode, "params": sum(p.numel() for p in model.parameters()),
            "trainable": trainable_count(model), "step_s": statistics.median(times),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_mib": base_mib}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--block_size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = (args.rank, args.steps, args.batch_size, args.block_size, args.threads)
    if args.child:
        print(json.dumps(child(*args.child, *sizes)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from _machine import header

    print(header("LoRA vs full fine-tuning"))
    print(f"rank {args.rank} (alpha {2 * args.rank}) on every linear layer of the blocks, 4 trained rows; batch "
          f"{args.batch_size} x {args.block_size} tokens; median of {args.steps} steps after one warm-up; peak RSS "
          "of a fresh process")
    print("| shape | mode | parameters | trainable | step (s) | peak RSS (MiB) | peak over imports (MiB) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for shape in args.shapes:
        rows: dict[str, list[dict]] = {"full": [], "lora": []}
        for mode in ("full", "lora", "lora", "full"):
            cmd = [sys.executable, __file__, "--child", shape, mode, "--rank", str(args.rank), "--steps",
                   str(args.steps), "--batch_size", str(args.batch_size), "--block_size", str(args.block_size),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows[mode].append(json.loads(out.splitlines()[-1]))
        for mode in ("full", "lora"):
            r = rows[mode]
            print(f"| {shape} | {mode} | {r[0]['params']:,} | {r[0]['trainable']:,} | "
                  f"{min(x['step_s'] for x in r):.3f} | {min(x['peak_mib'] for x in r):,.0f} | "
                  f"{min(x['peak_mib'] - x['base_mib'] for x in r):,.0f} |")

        keys = (lambda x: x["step_s"], lambda x: x["peak_mib"], lambda x: x["peak_mib"] - x["base_mib"])
        ratios = [min(map(k, rows["lora"])) / min(map(k, rows["full"])) for k in keys]
        print(f"| {shape} | LoRA / full | | | {ratios[0]:.2f}x | {ratios[1]:.2f}x | {ratios[2]:.2f}x |")


if __name__ == "__main__":
    main()
