"""The training loop: learning-rate schedule, train step, evaluation, stopping.

Receives built objects (model, optimizer, token arrays, configs) and callbacks for saving and
metrics; knows nothing of argparse or files. Reads the same with one process or many: data
parallel details are behind `mypt.dist`.

Every source of randomness is a pure function of (seed, iteration, rank): batch windows come
from `data.batch_at` indexed by a global micro-batch number, and the dropout RNG is reseeded at
the start of each iteration. So a run stopped and resumed at iteration i continues exactly as
the uninterrupted run would, with any number of processes.
"""

from __future__ import annotations

import ctypes
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mypt import dist
from mypt.config import TrainConfig
from mypt.data import Batches, batch_at
from mypt.errors import MyPTError

EVAL_SEED_OFFSET = 1_000_003  # eval batches come from their own stream, the same at every eval


class TrainingDiverged(MyPTError):
    """The loss became NaN or infinite: not a mistake in the input, so the CLI exits with status 1."""

    exit_code = 1


@dataclass
class TrainState:
    """Progress that lives in training_state.json."""

    iteration: int = 0
    best_val_loss: float | None = None
    last_val_loss: float | None = None
    last_train_loss: float | None = None
    tokens_seen: int = 0
    train_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_saved(cls, saved: dict[str, Any], source: str) -> TrainState:
        """The progress recorded in a training_state.json; a hand-edited value is named, not a TypeError."""
        kinds = {"iteration": int, "tokens_seen": int, "train_seconds": float, "best_val_loss": float,
                 "last_val_loss": float, "last_train_loss": float}
        problems = []
        for key, kind in kinds.items():
            value = saved.get(key)
            if value is None and key != "iteration":
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or (kind is int and not isinstance(value, int)) or value < 0:
                want = "a whole number, 0 or more" if kind is int else "a number, 0 or more"
                problems.append(f"{key} ({json.dumps(value)}) must be {want}")
        if problems:
            raise MyPTError(f"{source}: " + "; ".join(problems) + " (fix or restore the file)")
        return cls(**{k: saved[k] for k in kinds if saved.get(k) is not None})


@dataclass
class Stop:
    """Why fit() returned early: a signal number, or None when max_iters was reached."""

    signum: int | None = None


def get_lr(it: int, tc: TrainConfig) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters."""
    decay_end = tc.lr_decay_iters or tc.max_iters
    if it < tc.warmup_iters:
        return tc.learning_rate * (it + 1) / (tc.warmup_iters + 1)
    if it >= decay_end:
        return tc.final_lr
    progress = (it - tc.warmup_iters) / max(1, decay_end - tc.warmup_iters)
    return tc.final_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (tc.learning_rate - tc.final_lr)


# glibc mallopt() parameters and their defaults (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
MALLOC_DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536}
MALLOC_REUSE = {M_TRIM_THRESHOLD: 2**31 - 1, M_MMAP_MAX: 0}


def reuse_freed_memory(enabled: bool = True) -> bool:
    """Keep freed memory in the process for reuse instead of handing it back to the OS (glibc).

    glibc gives each large allocation (above a threshold that adapts up to 32 MB) its own mmap()
    and unmaps it when it is freed, so each training step page-faults its big tensors (the loss
    head's logit gradients, embedding gradients, large activations) in afresh: slower steps on a
    CPU (the malloc ablation in BENCHMARKS.md). With mmap and trimming off, freed blocks are
    reused and stay with the process until it exits; heap fragmentation raises the peak RSS
    (see BENCHMARKS.md), more with gradient checkpointing, which therefore goes without. The
    setting is process-wide and is not undone. False where there is no glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    settings = MALLOC_REUSE if enabled else MALLOC_DEFAULTS
    return all(mallopt(param, value) == 1 for param, value in settings.items())


class Trainer:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 train_data: Batches, val_data: Batches, block_size: int, batch_size: int,
                 tc: TrainConfig, device: torch.device, dtype: str, info: dist.DistInfo) -> None:
        self.model, self.optimizer = model, optimizer
        self.train_data, self.val_data = train_data, val_data
        self.block_size, self.batch_size = block_size, batch_size
        self.tc, self.device, self.dtype, self.info = tc, device, dtype, info
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
        self.stop_signal: int | None = None
        if device.type == "cpu" and not tc.gradient_checkpointing:  # checkpointing asks for memory, not speed
            # Process-wide and never undone: glibc keeps freed memory for reuse from here on, for
            # every allocation of this process (see reuse_freed_memory, README "Memory").
            reuse_freed_memory()

    @property
    def tokens_per_iter(self) -> int:
        return self.batch_size * self.block_size * self.tc.grad_accum_steps * self.info.world_size

    def _batch(self, data: Batches, seed: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_at(data, self.block_size, self.batch_size, seed, index, self.device)

    def train_step(self, it: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over grad_accum_steps micro-batches; (mean loss, grad norm) as tensors."""
        tc, info = self.tc, self.info
        torch.manual_seed(tc.seed * 7919 + it * info.world_size + info.rank)  # dropout stream
        for group in self.optimizer.param_groups:
            group["lr"] = get_lr(it, tc) * group.get("lr_scale", 1.0)  # mypt.optim sets the scales
        per_iter = tc.grad_accum_steps * info.world_size
        total = torch.zeros((), device=self.device)
        for micro in range(tc.grad_accum_steps):
            x, y = self._batch(self.train_data, tc.seed, it * per_iter + micro * info.world_size + info.rank)
            with dist.no_sync(self.model, micro == tc.grad_accum_steps - 1), dist.autocast(self.device, self.dtype):
                _, loss = self.model(x, y)
                loss = loss / tc.grad_accum_steps
            self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip or float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total, norm

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over eval_iters fixed batches of each split, averaged across ranks."""
        self.model.eval()
        out = {}
        seed = self.tc.seed + EVAL_SEED_OFFSET
        for split, data in (("train", self.train_data), ("val", self.val_data)):
            losses = torch.zeros(self.tc.eval_iters, device=self.device)
            for i in range(self.tc.eval_iters):
                x, y = self._batch(data, seed, i * self.info.world_size + self.info.rank)
                with dist.autocast(self.device, self.dtype):
                    losses[i] = self.model(x, y)[1]
            out[split] = dist.all_mean(losses.mean()).item()
        self.model.train()
        return out

    def fit(self, state: TrainState, save: Callable[[TrainState, bool], None],
            on_eval: Callable[[TrainState, dict[str, Any]], None], progress: Any) -> Stop:
        """Train from state.iteration to max_iters; evaluate and save every eval_interval and at the end,
        and save at every multiple of keep_every (the caller keeps those copies).

        save(state, best) gets best=True when this evaluation's validation loss is the lowest so far.
        """
        tc = self.tc
        self.model.train()
        with stop_on_signals(self):
            t_log, tokens_log = time.perf_counter(), 0
            t_start = time.perf_counter() - state.train_seconds
            for it in range(state.iteration, tc.max_iters):
                loss, norm = self.train_step(it)
                state.iteration = it + 1
                state.tokens_seen += self.tokens_per_iter
                tokens_log += self.tokens_per_iter
                state.train_seconds = time.perf_counter() - t_start
                last = state.iteration == tc.max_iters
                if state.iteration % tc.log_interval == 0 or last:
                    now = time.perf_counter()
                    row = {"iter": state.iteration, "loss": dist.all_mean(loss).item(), "grad_norm": norm.item(),
                           "lr": get_lr(it, tc), "tokens_per_sec": tokens_log / (now - t_log)}
                    t_log, tokens_log = now, 0
                    self._check_finite(row["loss"], state)
                    progress.log(row)
                evaluate = state.iteration % tc.eval_interval == 0 or last
                keep = bool(tc.keep_every) and state.iteration % tc.keep_every == 0
                if evaluate:
                    losses = self.evaluate()
                    self._check_finite(losses["val"], state)
                    state.last_train_loss, state.last_val_loss = losses["train"], losses["val"]
                    best = state.best_val_loss is None or losses["val"] < state.best_val_loss
                    if best:
                        state.best_val_loss = losses["val"]
                    save(state, best)
                    on_eval(state, {"iter": state.iteration, "train_loss": losses["train"],
                                    "val_loss": losses["val"], "lr": get_lr(it, tc),
                                    "tokens_per_sec": state.tokens_seen / max(state.train_seconds, 1e-9),
                                    "elapsed": state.train_seconds})
                    progress.eval(state.iteration, losses)
                    t_log, tokens_log = time.perf_counter(), 0  # keep eval time out of tokens/s
                elif keep:  # --keep_every N keeps iterations N, 2N, ... exactly: saved between evaluations too
                    save(state, False)
                    t_log, tokens_log = time.perf_counter(), 0
                if dist.any_rank(self.stop_signal is not None, self.device):
                    if not (evaluate or keep):
                        save(state, False)
                    return Stop(self.stop_signal or signal.SIGTERM)
        return Stop()

    def _check_finite(self, value: float, state: TrainState) -> None:
        if dist.any_rank(not math.isfinite(value), self.device):
            raise TrainingDiverged(
                f"loss became {value} at iteration {state.iteration}: training stopped and the last "
                "good checkpoint was left as it was. Try a lower --learning_rate, --grad_clip 1.0, "
                "or --dtype fp32."
            )


class stop_on_signals:
    """While active, SIGINT and SIGTERM ask the trainer to stop after the current iteration."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.trainer.stop_signal is not None and signum == signal.SIGINT:
            print("\nstill saving the checkpoint; please wait", file=sys.stderr, flush=True)
        self.trainer.stop_signal = signum

    def __enter__(self) -> stop_on_signals:
        for s in (signal.SIGINT, signal.SIGTERM):
            self.previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
