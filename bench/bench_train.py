"""Training throughput of MyPT against transformers' GPT2LMHeadModel, side by side in one process.

usage: python bench/bench_train.py [--presets tiny small] [--rounds 5] [--ablations]

For each preset it builds four runs from the same initial weights: MyPT and transformers, each in
fp32 and in bf16 autocast. transformers gets the same shapes (n_positions = block_size, vocab
50304, gelu_new, attn_pdrop 0, the preset's dropout); its biases, which MyPT's presets leave
out, are zero and frozen, so both compute the same function. Both train on the same batches
(GPT-2 tokens of tinyshakespeare) with the same AdamW (fused), schedule and gradient clipping:
MyPT through its own `Trainer.train_step`, transformers through the usual
`logits -> F.cross_entropy` step. The runs take turns one iteration at a time, so load from
other processes hits all of them alike; the table gives the median and the fastest iteration.

Achieved FLOP/s uses `mypt.estimate.flops_per_token`; the peak is a 2048 x 2048 matmul in the
same dtype measured at the start of the same run. After the timed iterations every model is
evaluated in fp32 on fixed validation batches: MyPT and transformers should agree within 2%.

--ablations times variants of MyPT's tiny step instead: fused vs foreach AdamW, torch.compile,
and the loss head's chunk sizes. --profile prints where each run's step spends its time.
--recipes times each preset (GPT-2 recipe, AdamW) against its own shape with --recipe's
components and optimizer (default: small-modern's), fp32 and bf16: the step-time ratio, the
optimizer's share and the fraction of the matmul peak; --profile --profile_recipe profiles them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from _machine import header

import mypt.ops
from mypt import dist
from mypt.config import ARCH_FIELDS, ModelConfig, TrainConfig, load_model_config
from mypt.data import Mixture, batch_at, training_data
from mypt.estimate import flops_per_token
from mypt.model import GPT
from mypt.optim import make_optimizer
from mypt.tokenizers import build_tokenizer
from mypt.trainer import Trainer, get_lr, reuse_freed_memory

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
CACHE = Path("/tmp/mypt-bench-cache")
CPU = torch.device("cpu")
TRAIN = TrainConfig(learning_rate=1e-3, warmup_iters=2, max_iters=1000, grad_clip=1.0, seed=1337)
EVAL_BATCHES = 4


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 15) -> float:
    """FLOP/s of an n x n matmul: the fastest of reps (a peak; the median moves with the load)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


def gpt2_tokens() -> tuple[Mixture, Mixture]:
    _, train, val = training_data([str(DATA)], build_tokenizer("gpt2"), CACHE, 0.1, 256)
    return train, val


@dataclass
class Run:
    """One model + optimizer + precision, stepped one iteration at a time."""

    impl: str
    dtype: str
    model: torch.nn.Module
    step: Callable[[int], None]
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    malloc_reuse: bool = True  # what Trainer sets up on a CPU (see trainer.reuse_freed_memory)
    times: list[float] = field(default_factory=list)
    optimizer_times: list[float] = field(default_factory=list)


def mypt_run(cfg: ModelConfig, state: dict, dtype: str, data: tuple[Mixture, Mixture],
             optimizer_kw: dict | None = None, compile_model: bool = False, malloc_reuse: bool = True,
             tc: TrainConfig = TRAIN) -> Run:
    model = GPT(cfg)
    model.load_state_dict(state)
    optimizer = make_optimizer(model, tc, CPU)
    if optimizer_kw:
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
        optimizer = torch.optim.AdamW(groups, lr=TRAIN.learning_rate, betas=(TRAIN.beta1, TRAIN.beta2),
                                      **optimizer_kw)
    runnable = torch.compile(model) if compile_model else model
    trainer = Trainer(runnable, optimizer, data[0], data[1], cfg.block_size, cfg.batch_size, tc, CPU, dtype,
                      dist.DistInfo())
    model.train()
    run = Run("mypt", dtype, model, trainer.train_step, lambda x, y: model(x, y)[1], malloc_reuse)
    step = optimizer.step

    def timed_step(*args: object, **kwargs: object) -> object:
        t = time.perf_counter()
        result = step(*args, **kwargs)
        run.optimizer_times.append(time.perf_counter() - t)
        return result

    optimizer.step = timed_step  # type: ignore[method-assign]
    return run


def hf_model(cfg: ModelConfig, state: dict) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    from mypt.formats.hf_gpt2 import to_hf_state

    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu_new",
                        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=0.0,
                        layer_norm_epsilon=1e-5, tie_word_embeddings=True)
    model = GPT2LMHeadModel(hf_cfg)
    missing, unexpected = model.load_state_dict(to_hf_state(state, cfg), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "head not tied"
    if not cfg.bias:
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.requires_grad_(False)  # zeros, as in MyPT's bias-free model
    return model


def hf_run(cfg: ModelConfig, state: dict, dtype: str, data: tuple[Mixture, Mixture],
           malloc_reuse: bool) -> Run:
    model = hf_model(cfg, state)
    optimizer = make_optimizer(model, TRAIN, CPU)
    model.train()

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    def step(it: int) -> None:  # what Trainer.train_step does, the usual way
        torch.manual_seed(TRAIN.seed * 7919 + it)
        for group in optimizer.param_groups:
            group["lr"] = get_lr(it, TRAIN)
        x, y = batch_at(data[0], cfg.block_size, cfg.batch_size, TRAIN.seed, it, CPU)
        with dist.autocast(CPU, dtype):
            loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    impl = "transformers + MyPT's malloc setting" if malloc_reuse else "transformers"
    return Run(impl, dtype, model, step, loss_of, malloc_reuse)


def time_runs(runs: list[Run], warmup: int, rounds: int) -> None:
    """warmup iterations each, then `rounds` rounds in which every run does one timed iteration."""
    for it in range(warmup + rounds):
        for run in runs:
            reuse_freed_memory(run.malloc_reuse)
            t = time.perf_counter()
            run.step(it)
            if it >= warmup:
                run.times.append(time.perf_counter() - t)


@torch.no_grad()
def val_loss(run: Run, cfg: ModelConfig, val: Mixture) -> float:
    run.model.eval()
    losses = [run.loss_of(*batch_at(val, cfg.block_size, cfg.batch_size, 99, i, CPU)).item()
              for i in range(EVAL_BATCHES)]
    run.model.train()
    return sum(losses) / len(losses)


def bench_preset(name: str, rounds: int, warmup: int, data: tuple[Mixture, Mixture],
                 peaks: dict[str, float]) -> None:
    cfg = load_model_config(name)
    torch.manual_seed(0)
    state = GPT(cfg).state_dict()
    runs = [mypt_run(cfg, state, d, data) for d in ("fp32", "bf16")]
    runs += [hf_run(cfg, state, d, data, reuse) for reuse in (False, True) for d in ("fp32", "bf16")]
    time_runs(runs, warmup, rounds)
    tokens = cfg.batch_size * cfg.block_size
    fpt = flops_per_token(cfg)
    print(f"\n## {name}: {cfg.n_layer} layers x {cfg.n_embd}, batch {cfg.batch_size} x {cfg.block_size}, "
          f"{warmup} warm-up + {rounds} timed iterations each, interleaved\n")
    print("| implementation | dtype | ms/iter median | ms/iter min | tokens/s (median) | GFLOP/s | % of matmul peak "
          f"| val loss after {warmup + rounds} iters |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    med = {}
    losses = {}
    for run in runs:
        m = statistics.median(run.times)
        med[run.impl, run.dtype] = m
        losses[run.impl, run.dtype] = val_loss(run, cfg, data[1])
        flops = fpt * tokens / m
        print(f"| {run.impl} | {run.dtype} | {m * 1e3:.0f} | {min(run.times) * 1e3:.0f} | {tokens / m:,.0f} "
              f"| {flops / 1e9:.1f} | {100 * flops / peaks[run.dtype]:.0f}% | {losses[run.impl, run.dtype]:.4f} |")
    default = dist.pick_dtype("auto", CPU)
    hf, hf_same = "transformers", "transformers + MyPT's malloc setting"
    speedup = lambda a, b: med[b] / med[a]  # noqa: E731  how many times faster run a is than run b
    print(f"\nMyPT's default dtype here ('auto'): {default}. 'transformers' runs with glibc's default malloc, as "
          "its users run it; the second transformers row shares MyPT's malloc setting (same process, toggled "
          "per iteration), which isolates the model code.\n")
    print("| comparison | speed-up | target |")
    print("| --- | ---: | --- |")
    rows = [(f"MyPT default ({default}) vs transformers fp32", ("mypt", default), (hf, "fp32"), ">= 2x"),
            ("MyPT bf16 vs transformers bf16", ("mypt", "bf16"), (hf, "bf16"), ">= 1.2x"),
            ("MyPT fp32 vs transformers fp32", ("mypt", "fp32"), (hf, "fp32"), ""),
            (f"MyPT default ({default}) vs transformers fp32, same malloc", ("mypt", default), (hf_same, "fp32"), ""),
            ("MyPT bf16 vs transformers bf16, same malloc", ("mypt", "bf16"), (hf_same, "bf16"), ""),
            ("MyPT fp32 vs transformers fp32, same malloc", ("mypt", "fp32"), (hf_same, "fp32"), ""),
            ("MyPT bf16 vs MyPT fp32", ("mypt", "bf16"), ("mypt", "fp32"), ""),
            ("transformers bf16 vs transformers fp32", (hf, "bf16"), (hf, "fp32"), "")]
    for label, a, b, target in rows:
        print(f"| {label} | {speedup(a, b):.2f}x | {target} |")
    for d in ("fp32", "bf16"):
        a, b = losses["mypt", d], losses[hf, d]
        print(f"- val loss {d}: MyPT {a:.4f}, transformers {b:.4f}, difference {100 * abs(a - b) / b:.2f}% "
              "(target within 2%)")


def ablations(rounds: int, warmup: int, data: tuple[Mixture, Mixture]) -> None:
    """Variants of MyPT's tiny training step, timed interleaved against the default."""
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    state = GPT(cfg).state_dict()
    variants: dict[str, Callable[[], Run]] = {}
    for d in ("fp32", "bf16"):
        variants[f"{d} default (fused AdamW)"] = lambda d=d: mypt_run(cfg, state, d, data)
        variants[f"{d} foreach AdamW"] = lambda d=d: mypt_run(cfg, state, d, data, {"foreach": True})
        variants[f"{d} glibc default malloc"] = lambda d=d: mypt_run(cfg, state, d, data, malloc_reuse=False)
    compiled = {}
    for d in ("fp32", "bf16"):
        t = time.perf_counter()
        run = mypt_run(cfg, state, d, data, compile_model=True)
        run.step(0)  # compile happens here
        compiled[f"{d} torch.compile"] = (run, time.perf_counter() - t)
    runs = {k: make() for k, make in variants.items()} | {k: r for k, (r, _) in compiled.items()}
    time_runs(list(runs.values()), warmup, rounds)
    print(f"\n## ablations: tiny, {warmup} warm-up + {rounds} timed iterations each, interleaved\n")
    print("| variant | ms/iter median | ms/iter min |")
    print("| --- | ---: | ---: |")
    for k, run in runs.items():
        extra = f" (first step incl. compile: {compiled[k][1]:.0f} s)" if k in compiled else ""
        print(f"| {k}{extra} | {statistics.median(run.times) * 1e3:.0f} | {min(run.times) * 1e3:.0f} |")
    chunk_ablation(cfg, state, rounds, warmup, data)


def chunk_ablation(cfg: ModelConfig, state: dict, rounds: int, warmup: int,
                   data: tuple[Mixture, Mixture]) -> None:
    """The loss head's LOSS_CHUNK_ROWS (a module constant, swapped per step)."""
    settings = [256, 512, 1024, 2048]
    default = mypt.ops.LOSS_CHUNK_ROWS
    times: dict[tuple[str, int], list[float]] = {}
    for d in ("fp32", "bf16"):
        run = mypt_run(cfg, state, d, data)
        for it in range(warmup + rounds):
            for rows in settings:
                mypt.ops.LOSS_CHUNK_ROWS = rows
                t = time.perf_counter()
                run.step(it)
                if it >= warmup:
                    times.setdefault((d, rows), []).append(time.perf_counter() - t)
    mypt.ops.LOSS_CHUNK_ROWS = default
    print("\n| dtype | LOSS_CHUNK_ROWS | ms/iter median | ms/iter min |")
    print("| --- | ---: | ---: | ---: |")
    for (d, rows), ts in times.items():
        print(f"| {d} | {rows} | {statistics.median(ts) * 1e3:.0f} | {min(ts) * 1e3:.0f} |")


def modern_config(name: str, recipe: str) -> tuple[ModelConfig, TrainConfig]:
    """Preset `name`'s shape with the architecture fields and optimizer settings of preset `recipe`."""
    shape, modern = load_model_config(name), load_model_config(recipe)
    fields = {k: v for k, v in modern.to_dict().items() if k in ARCH_FIELDS}
    cfg = ModelConfig.from_dict({**shape.to_dict(), **fields, "name": f"{name}+{recipe}"}, recipe)
    optimizer = {k: v for k, v in modern.training.items() if k in ("optimizer", "muon_lr", "muon_momentum")}
    return cfg, TrainConfig(**{**TRAIN.to_dict(), **optimizer})


def recipes(names: list[str], recipe: str, rounds: int, warmup: int, data: tuple[Mixture, Mixture],
            peaks: dict[str, float]) -> None:
    """Each preset as it is (GPT-2, AdamW) against its shape with `recipe`'s components and optimizer."""
    for name in names:
        gpt2 = load_model_config(name)
        modern, modern_tc = modern_config(name, recipe)
        torch.manual_seed(0)
        states = {id(gpt2): GPT(gpt2).state_dict(), id(modern): GPT(modern).state_dict()}
        runs = {(label, d): mypt_run(cfg, states[id(cfg)], d, data, tc=tc)
                for label, cfg, tc in (("GPT-2", gpt2, TRAIN), (recipe, modern, modern_tc)) for d in ("fp32", "bf16")}
        time_runs(list(runs.values()), warmup, rounds)
        print(f"\n## {name} (GPT-2 recipe, AdamW) vs its shape with {recipe}'s components and optimizer: "
              f"{warmup} warm-up + {rounds} timed iterations each, interleaved\n")
        print("| recipe | parameters | dtype | ms/iter median | optimizer ms (share) | GFLOP/s | % of matmul peak |")
        print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
        for (label, d), run in runs.items():
            cfg = gpt2 if label == "GPT-2" else modern
            m, opt = statistics.median(run.times), statistics.median(run.optimizer_times[warmup:])
            flops = flops_per_token(cfg) * cfg.batch_size * cfg.block_size / m
            print(f"| {label} | {run.model.num_params():,} | {d} | {m * 1e3:.0f} | {opt * 1e3:.0f} "
                  f"({100 * opt / m:.0f}%) | {flops / 1e9:.1f} | {100 * flops / peaks[d]:.0f}% |")
        for d in ("fp32", "bf16"):
            ratio = statistics.median(runs[recipe, d].times) / statistics.median(runs["GPT-2", d].times)
            print(f"- {d}: the {recipe} step takes {ratio:.2f}x the GPT-2 step (target <= 1.3x)")


def profile_steps(name: str, data: tuple[Mixture, Mixture], steps: int = 3, recipe: str | None = None) -> None:
    """torch.profiler over a few steps of each run: the ops with the most self time per iteration.

    The runs: MyPT and transformers; with `recipe`, MyPT as the preset is and with the recipe's
    components and optimizer.
    """
    from torch.profiler import profile

    cfg = load_model_config(name)
    torch.manual_seed(0)
    state = GPT(cfg).state_dict()
    makes: list[Callable[..., Run]] = [mypt_run, lambda *a: hf_run(*a, malloc_reuse=False)]
    if recipe is not None:
        modern, modern_tc = modern_config(name, recipe)
        modern_state = GPT(modern).state_dict()
        makes[1] = lambda _cfg, _state, d, data: mypt_run(modern, modern_state, d, data, tc=modern_tc)
    for make in makes:
        for d in ("fp32", "bf16"):
            run = make(cfg, state, d, data)
            reuse_freed_memory(run.malloc_reuse)  # as time_runs does for each run
            for it in range(steps):
                run.step(it)
            with profile() as prof:
                for it in range(steps, 2 * steps):
                    run.step(it)
            events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
            total = sum(e.self_cpu_time_total for e in events)
            label = f"{run.impl} ({recipe})" if recipe and make is makes[1] else run.impl
            print(f"\n{label} {d}: {total / steps / 1e3:.0f} ms/iter of op self time")
            for e in events[:8]:
                print(f"  {e.key[:60]:<60} {e.self_cpu_time_total / steps / 1e3:7.1f} ms "
                      f"{100 * e.self_cpu_time_total / total:5.1f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--rounds", type=int, default=5, help="timed iterations per run (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per run first (default: %(default)s)")
    p.add_argument("--ablations", action="store_true", help="time variants of MyPT's tiny step instead")
    p.add_argument("--profile", action="store_true", help="profile each run's step (first preset) instead")
    p.add_argument("--recipes", action="store_true", help="time each preset against its shape with --recipe's "
                   "components and optimizer instead (MyPT only)")
    p.add_argument("--recipe", default="small-modern", help="the modern preset for --recipes and --profile_recipe "
                   "(default: %(default)s)")
    p.add_argument("--profile_recipe", action="store_true", help="with --profile: profile the first preset's shape "
                   "with --recipe's components instead of transformers")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(header("bench_train: training throughput, MyPT vs transformers"))
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul 2048x2048 peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    data = gpt2_tokens()
    if args.ablations:
        ablations(args.rounds, args.warmup, data)
        return
    if args.profile:
        profile_steps(args.presets[0], data, recipe=args.recipe if args.profile_recipe else None)
        return
    if args.recipes:
        recipes(args.presets, args.recipe, args.rounds, args.warmup, data, peaks)
        return
    for name in args.presets:
        bench_preset(name, args.rounds, args.warmup, data, peaks)


if __name__ == "__main__":
    main()
