"""Training step time of the tiny and small presets, fp32 vs bf16 autocast, interleaved in one run.

    python bench/step_time.py
"""

import statistics
import time

import numpy as np
import torch

from mypt import dist
from mypt.config import TrainConfig, load_model_config
from mypt.model import GPT
from mypt.trainer import Trainer, make_optimizer

CPU = torch.device("cpu")


def main() -> None:
    data = np.random.default_rng(0).integers(0, 50257, 200_000).astype(np.uint16)
    tc = TrainConfig(max_iters=10)
    for name in ("tiny", "small"):
        cfg = load_model_config(name)
        torch.manual_seed(0)
        state = GPT(cfg).state_dict()
        runs = {}
        for dtype in ("fp32", "bf16"):
            model = GPT(cfg)
            model.load_state_dict(state)
            trainer = Trainer(model, make_optimizer(model, tc, CPU), data, data, cfg.block_size, cfg.batch_size,
                              tc, CPU, dtype, dist.DistInfo())
            runs[dtype] = (trainer, [])
        for it in range(4):  # iteration 0 warms up and is not counted
            for trainer, times in runs.values():
                start = time.perf_counter()
                trainer.train_step(it)[0].item()
                if it:
                    times.append(time.perf_counter() - start)
        tokens = cfg.batch_size * cfg.block_size
        for dtype, (_, times) in runs.items():
            med = statistics.median(times)
            print(f"{name} {dtype}: {med * 1000:.0f} ms/iter, {tokens / med:,.0f} tokens/s "
                  f"(batch {cfg.batch_size} x {cfg.block_size}, median of 3, interleaved)")


if __name__ == "__main__":
    main()
