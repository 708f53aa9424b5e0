"""The bpe tokenizer: training speed and memory, encoding speed, compression, quality per second.

usage: python bench/bench_tokenizer.py [--only train encode compression quality] [--mb 100]
                                       [--budget 120] [--quality_vocabs 1024 2048 4096 8192]
                                       [--preset shakespeare-char] [--threads N]

train        MyPT's bpe training (rustbpe) and Hugging Face `tokenizers` given the same pieces of
             the same --mb MB text, same split pattern, vocab 8192; each in a fresh process,
             interleaved, wall time and peak RSS (ru_maxrss of the child). The text is
             tinyshakespeare and the built-in corpus repeated, written to a temp dir.
encode       mypt.data.prepare_corpus (the data preparation train.py runs) with gpt2 and with a
             bpe of 8192 tokens on the same files (half of --mb, and --mb), fresh processes,
             interleaved: MB/s and peak RSS (the same peak at both sizes: memory is flat).
compression  bytes per token of bpe trained on the first 90% of a text (vocab 1024 ... 16384),
             on the held-out last 10% and on the whole, against gpt2 and char; on
             tinyshakespeare and the built-in corpus.
quality      on tinyshakespeare, the --preset's architecture and training settings (default
             shakespeare-char's) with each tokenizer for the
             same --budget seconds of training on torch's threads, counted in CPU time (budget x
             threads CPU-seconds, so that other load on the shared machine does not favour one
             run), the cosine schedule's end kept where the budget runs out; then bits per
             character on each run's own validation text (the last 10% of its tokens), as
             `mypt eval` computes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _machine import header

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the repository (or beside a folder above it, for a git worktree)
SHAKESPEARE = next((p / "shared" / "data" / "tinyshakespeare.txt" for p in REPO.parents
                    if (p / "shared" / "data" / "tinyshakespeare.txt").exists()), REPO.parent / "shared")
MB = 1_000_000
TRAIN_VOCAB = 8192
COMPRESSION_VOCABS = (1024, 4096, 8192, 16384)


# ---------------------------------------------------------------------------------------------
# The texts


def big_text(folder: Path, size_mb: int) -> Path:
    """tinyshakespeare and the built-in corpus, alternately, repeated to size_mb MB."""
    from mypt.data.builtin import DEFAULT, builtin_text

    path = folder / f"mixed-{size_mb}MB.txt"
    if path.exists():
        return path
    block = (SHAKESPEARE.read_text(encoding="utf-8") + builtin_text(DEFAULT)).encode("utf-8")
    with open(path, "wb") as f:
        for _ in range(size_mb * MB // len(block)):
            f.write(block)
        rest = block[: size_mb * MB % len(block)]
        f.write(rest[: rest.rfind(b"\n") + 1])
    return path


def builtin_file(folder: Path) -> Path:
    from mypt.data.builtin import DEFAULT, builtin_path

    return builtin_path(DEFAULT, folder)


def text_of(path: Path, val_split: float) -> Any:
    """The text of `path` (one document) without its last val_split, as train.py --tokenizer bpe
    trains on it (0: the whole text)."""
    from mypt import data

    return data.TrainingText([data.Source("input", (str(path),))], path.parent, val_split)


# ---------------------------------------------------------------------------------------------
# Child processes: one measurement each, so that peak RSS is that measurement's alone


def child_train(lib: str, path: Path, vocab: int) -> dict[str, Any]:
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    from mypt.tokenizers import train_bpe
    from mypt.tokenizers.bpe import SPLIT_PATTERN, _small_pieces

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start, cpu = time.perf_counter(), time.process_time()
    if lib == "rustbpe":
        n = train_bpe(text_of(path, 0.0), vocab, str(path)).n_vocab
    else:
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=["<|endoftext|>"], show_progress=False)
        tok.train_from_iterator(_small_pieces(text_of(path, 0.0)), trainer)
        n = tok.get_vocab_size()
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu, "n_vocab": n,
            "before_mib": before}


def child_encode(kind: str, path: Path) -> dict[str, Any]:
    from mypt import data
    from mypt.tokenizers import build_tokenizer, load_tokenizer

    tok = build_tokenizer("gpt2") if kind == "gpt2" else load_tokenizer(kind)
    tok.encode("warm up the tokenizer")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as cache:
        start, cpu = time.perf_counter(), time.process_time()
        corpus = data.prepare_corpus([data.Source("input", (str(path),))], tok, Path(cache), val_split=0.1,
                                     progress=False)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    n_tokens = corpus.parts[0].manifest["n_tokens"]
    return {"seconds": seconds, "cpu_seconds": cpu, "n_tokens": n_tokens, "before_mib": before}


def measure(*args: str) -> dict[str, Any]:
    """Run this script as a child with args; its JSON result plus its peak RSS in MiB."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"child {args} failed with status {status}")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_mib": usage.ru_maxrss / 1024}


# ---------------------------------------------------------------------------------------------
# Sections


def bench_train(folder: Path, size_mb: int, repeats: int) -> None:
    path = big_text(folder, size_mb)
    mb = path.stat().st_size / MB
    print(f"\n## Training, {mb:.0f} MB, vocab {TRAIN_VOCAB}\n")
    print("| library | run | seconds | MB/s | MB per CPU-second | RSS before (imports) | peak RSS |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for run in range(repeats):
        for lib in ("rustbpe", "tokenizers"):
            r = measure("train", lib, str(path), str(TRAIN_VOCAB))
            assert r["n_vocab"] == TRAIN_VOCAB, r
            print(f"| {lib} | {run + 1} | {r['seconds']:.1f} | {mb / r['seconds']:.1f} | {mb / r['cpu_seconds']:.1f} "
                  f"| {r['before_mib']:.0f} MiB "
                  f"| {r['peak_mib']:.0f} MiB |", flush=True)


def bench_encode(folder: Path, size_mb: int, repeats: int) -> None:
    from mypt.tokenizers import save_tokenizer, train_bpe

    small, big = big_text(folder, size_mb // 2), big_text(folder, size_mb)
    tok_path = folder / "bpe8192.json"
    if not tok_path.exists():
        save_tokenizer(train_bpe(text_of(small, 0.1), TRAIN_VOCAB, "text"), tok_path)
    print(f"\n## Encoding: prepare_corpus, gpt2 vs bpe {TRAIN_VOCAB}\n")
    print("| tokenizer | MB | run | seconds | MB/s | MB per CPU-second | tokens | bytes/token | RSS before "
          "| peak RSS |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for path in (small, big):
        mb = path.stat().st_size / MB
        for run in range(repeats):
            for name, kind in (("gpt2", "gpt2"), (f"bpe {TRAIN_VOCAB}", str(tok_path))):
                r = measure("encode", kind, str(path))
                print(f"| {name} | {mb:.0f} | {run + 1} | {r['seconds']:.1f} | {mb / r['seconds']:.1f} "
                      f"| {mb / r['cpu_seconds']:.1f} "
                      f"| {r['n_tokens']:,} | {path.stat().st_size / r['n_tokens']:.2f} | {r['before_mib']:.0f} MiB "
                      f"| {r['peak_mib']:.0f} MiB |",
                      flush=True)


def bench_compression(folder: Path) -> None:
    from mypt.errors import MyPTError
    from mypt.tokenizers import build_tokenizer, train_bpe

    print("\n## Compression: bytes per token (held-out last 10% / whole text)\n")
    texts = {"tinyshakespeare": SHAKESPEARE, "built-in corpus": builtin_file(folder)}
    print("| tokenizer | " + " | ".join(texts) + " |")
    print("| --- |" + " ---: |" * len(texts))
    rows: dict[str, list[str]] = {}
    for name, path in texts.items():
        data = path.read_bytes()
        held_out = data[int(len(data) * 0.9):].decode("utf-8", errors="ignore")
        whole = data.decode("utf-8")
        toks = {"char": build_tokenizer("char", whole), "gpt2": build_tokenizer("gpt2")}
        for vocab in COMPRESSION_VOCABS:
            try:
                toks[f"bpe {vocab}"] = train_bpe(text_of(path, 0.1), vocab, name)
            except MyPTError as e:  # a small text runs out of pairs to merge
                toks[f"bpe {vocab}"] = str(e).split(": ")[1].split(" (")[0]
        for label, tok in toks.items():
            if isinstance(tok, str):
                rows.setdefault(label, []).append(tok)
                continue
            per = [len(t.encode("utf-8")) / len(tok.encode(t)) for t in (held_out, whole)]
            rows.setdefault(label, []).append(f"{per[0]:.2f} / {per[1]:.2f}")
    for label, cells in rows.items():
        print(f"| {label} | " + " | ".join(cells) + " |")


# ---------------------------------------------------------------------------------------------
# Quality per second


def quality_run(tok: Any, budget: float, cache: Path, lr: float | None, preset_name: str) -> dict[str, Any]:
    """Train the preset's architecture and recipe with tok for `budget` seconds; held-out bits per char."""
    import numpy as np
    import torch

    from mypt import dist
    from mypt.api import LoadedModel
    from mypt.config import ModelConfig, TrainConfig, load_model_config, new_run_train_config
    from mypt.data import training_data
    from mypt.model import GPT
    from mypt.optim import make_optimizer
    from mypt.trainer import Trainer, TrainState

    preset = load_model_config(preset_name)
    vocab = tok.model_vocab_size() if tok.kind != "gpt2" else 50304
    cfg = ModelConfig.from_dict({**preset.to_dict(), "vocab_size": vocab}, "config")
    flags = {"learning_rate": lr} if lr else {}
    base, _ = new_run_train_config(cfg, flags)
    _, train_data, val_data = training_data([str(SHAKESPEARE)], tok, cache, base.val_split, cfg.block_size)
    device = torch.device("cpu")
    dtype = dist.pick_dtype(base.dtype, device)

    def fit(max_iters: int, cpu_budget: float | None) -> tuple[Any, TrainState, float, float]:
        tc = TrainConfig(**{**base.to_dict(), "max_iters": 3 * max_iters if cpu_budget else max_iters,
                            "lr_decay_iters": max(max_iters, base.warmup_iters), "eval_interval": 10**9,
                            "eval_iters": 1, "log_interval": 10**9})
        torch.manual_seed(tc.seed)
        model = GPT(cfg)
        trainer = Trainer(model, make_optimizer(model, tc, device), train_data, val_data, cfg.block_size,
                          cfg.batch_size, tc, device, dtype, dist.DistInfo())
        state = TrainState()
        cpu = time.process_time()
        with _CPUBudget(trainer, state, cpu_budget):
            trainer.fit(state, lambda *saved: None, lambda *evaluated: None, _Quiet())
        return model, state, state.train_seconds, time.process_time() - cpu

    fit(10, None)  # warm-up
    per_iter = (fit(40, None)[3] - fit(10, None)[3]) / 30  # CPU-seconds of one iteration
    cpu_budget = budget * torch.get_num_threads()
    model, state, seconds, cpu_seconds = fit(max(30, int(cpu_budget / per_iter)), cpu_budget)
    lm = LoadedModel(model.eval(), cfg, tok, None, device, "fp32")  # type: ignore[arg-type]
    val_ids = val_data.streams[0].gather(np.arange(len(val_data)))
    result = lm.evaluate(tok.decode(val_ids[val_ids != tok.eot_id].tolist()), what="validation text")
    return {"iters": state.iteration, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "tokens_per_cpu_s": state.tokens_seen / cpu_seconds * torch.get_num_threads(),
            "params": model.num_params(), "bpc": result.bits_per_char, "lr": lr or base.learning_rate}


class _CPUBudget:
    """Stop the trainer once the process has used `budget` CPU-seconds (None: no limit), and keep
    the end of its cosine schedule (lr_decay_iters) at the iteration the budget runs out, as
    estimated from the iterations done so far.

    CPU time, not wall time: this machine is shared, and another process's load would
    otherwise shorten one tokenizer's run and not another's.
    """

    def __init__(self, trainer: Any, state: Any, budget: float | None) -> None:
        self.trainer, self.state, self.budget, self.done = trainer, state, budget, threading.Event()
        self.start = time.process_time()

    def _watch(self) -> None:
        assert self.budget is not None
        while not self.done.wait(0.2):
            used = time.process_time() - self.start
            if used >= self.budget:
                self.trainer.stop_signal = 15
                return
            if used > 0.1 * self.budget and self.state.iteration > 0:
                tc = self.trainer.tc
                end = int(self.state.iteration * self.budget / used)
                self.trainer.tc = dataclasses.replace(tc, lr_decay_iters=max(end, tc.warmup_iters + 1))

    def __enter__(self) -> _CPUBudget:
        if self.budget is not None:
            threading.Thread(target=self._watch, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()


class _Quiet:
    def log(self, row: dict[str, Any]) -> None:
        pass

    def eval(self, iteration: int, losses: dict[str, float]) -> None:
        pass


def bench_quality(folder: Path, budget: float, vocabs: list[int], lrs: list[float], threads: int | None,
                  preset: str) -> None:
    import torch

    from mypt.tokenizers import build_tokenizer, train_bpe

    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    print(f"\n## Quality per second: tinyshakespeare, {preset}'s architecture and recipe, {budget:.0f} s of training "
          f"on {threads} thread(s) ({budget * threads:.0f} CPU-seconds)\n")
    print("tokens/s and chars/s are per CPU-second x threads: what the run does with the whole machine.\n")
    print("| tokenizer | vocab | learning rate | parameters | iterations | wall seconds | CPU seconds | tokens/s "
          "| chars/s | held-out bits/char |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    toks = {"char": build_tokenizer("char", SHAKESPEARE.read_text(encoding="utf-8")), "gpt2": build_tokenizer("gpt2")}
    for vocab in vocabs:
        toks[f"bpe {vocab}"] = train_bpe(text_of(SHAKESPEARE, 0.1), vocab, "tinyshakespeare")
    n_chars = len(SHAKESPEARE.read_text(encoding="utf-8"))
    for name, tok in toks.items():
        chars_per_token = n_chars / len(tok.encode(SHAKESPEARE.read_text(encoding="utf-8")))
        for lr in lrs or [None]:
            r = quality_run(tok, budget, folder / "cache", lr, preset)
            print(f"| {name} | {tok.n_vocab:,} | {r['lr']:g} | {r['params']:,} | {r['iters']:,} | {r['seconds']:.0f} "
                  f"| {r['cpu_seconds']:.0f} | {r['tokens_per_cpu_s']:,.0f} "
                  f"| {r['tokens_per_cpu_s'] * chars_per_token:,.0f} | {r['bpc']:.3f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=("train", "encode", "compression", "quality"),
                   default=["train", "encode", "compression", "quality"])
    p.add_argument("--mb", type=int, default=100, help="size of the training and encoding text (default: 100)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs of each training/encoding measurement")
    p.add_argument("--budget", type=float, default=120.0, help="seconds of training per quality run")
    p.add_argument("--quality_vocabs", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--lrs", type=float, nargs="*", default=[], help="learning rates to try (default: the preset's)")
    p.add_argument("--preset", default="shakespeare-char", help="the quality runs' architecture and training "
                   "settings, the vocabulary aside (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch threads for the quality runs (1: CPU time is compute "
                   "time even on a loaded machine, no thread waits for a descheduled one)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        result = child_train(rest[0], Path(rest[1]), int(rest[2])) if kind == "train" else \
            child_encode(rest[0], Path(rest[1]))
        print(json.dumps(result))
        return
    print(header("bench_tokenizer: " + ", ".join(args.only)))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if "train" in args.only:
            bench_train(folder, args.mb, args.repeats)
        if "encode" in args.only:
            bench_encode(folder, args.mb, args.repeats)
        if "compression" in args.only:
            bench_compression(folder)
        if "quality" in args.only:
            bench_quality(folder, args.budget, args.quality_vocabs, args.lrs, args.threads, args.preset)


if __name__ == "__main__":
    main()
