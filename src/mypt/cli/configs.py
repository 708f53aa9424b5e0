"""List the model presets with exact parameter counts, or show one in detail.

examples:
  python scripts/show_configs.py
  python scripts/show_configs.py --config_file configs/150M.json --memory 8GB
  mypt configs --configs_dir my_configs/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mypt.cli.options import folder_path
from mypt.config import ModelConfig, list_presets, load_model_config, resolve_config_path
from mypt.errors import MyPTError
from mypt.estimate import (
    detect_memory,
    estimate_memory,
    flops_per_token,
    human_bytes,
    max_batch_size,
    param_breakdown,
    parse_memory,
)

RULE = "=" * 70


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config_file", help="show one config in detail (a path, or a preset name such as tiny)")
    p.add_argument("--configs_dir", type=folder_path, help="list the configs of this folder (default: configs/)")
    p.add_argument("--memory", help="memory to check the estimate against, e.g. 8GB "
                   "(default: the detected GPU's memory, else this machine's RAM)")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="estimate activation memory with gradient checkpointing")


def run(args: argparse.Namespace) -> int:
    if args.config_file:
        print_detail(args.config_file, args.memory, args.gradient_checkpointing)
    else:
        print_table(args.configs_dir)
    return 0


def print_table(configs_dir: Path | None) -> None:
    if configs_dir is not None and not configs_dir.is_dir():
        raise MyPTError(f"--configs_dir {configs_dir}: no such folder")
    files = list_presets(configs_dir)
    print(RULE)
    print("Available Model Configurations")
    print(RULE)
    print()
    rows, broken = [], []
    for path in files:
        try:
            cfg = load_model_config(path)
        except MyPTError as e:
            broken.append(str(e))
            rows.append((path.name, "(invalid)", "-", "-", "-", "-"))
            continue
        params = f"{param_breakdown(cfg)['total'] / 1e6:.2f}M"
        rows.append((path.name, cfg.name, params, str(cfg.n_layer), str(cfg.n_head), str(cfg.n_embd)))
    file_w = max([20, *(len(r[0]) + 1 for r in rows)])
    name_w = max([15, *(len(r[1]) + 1 for r in rows)])
    widths = (file_w, name_w, 12, 8, 8, 0)
    print(" ".join(f"{h:<{w}}" for h, w in zip(("File", "Name", "Params", "Layers", "Heads", "Embed"), widths,
                                                strict=True)).rstrip())
    print(" ".join("-" * (w or 8) for w in widths))
    for row in rows:
        print(" ".join(f"{v:<{w}}" for v, w in zip(row, widths, strict=True)).rstrip())
    if not files:
        print(f"(no .json files in {configs_dir or 'configs/'})")
    print()
    for message in broken:
        print(f"invalid: {message}")
    if broken:
        print()
    print(RULE)
    print()
    print("To use a config:")
    print("  python train.py --config_file configs/<filename> --model_name <name> --input_file <data>")
    print()
    print("To view details:")
    print("  python scripts/show_configs.py --config_file configs/<filename>")
    print(RULE)


def print_detail(name: str, memory_text: str | None, checkpointing: bool) -> None:
    path = resolve_config_path(name)
    cfg = load_model_config(path)
    parts = param_breakdown(cfg)
    total = parts["total"]
    print(RULE)
    print(f"Config: {cfg.name}")
    print(f"File: {path}")
    print(RULE)
    print(f"Description: {cfg.description}")
    print()
    print("Architecture:")
    for label, value in [("Layers", cfg.n_layer), ("Heads", cfg.n_head), ("Embedding", cfg.n_embd),
                         ("Block size", cfg.block_size), ("Vocab size", cfg.vocab_size),
                         ("Dropout", cfg.dropout), ("Bias", cfg.bias)]:
        print(f"  {label:<12}: {value}")
    for label, value in cfg.components():
        print(f"  {label:<12}: {value}")
    print()
    print("Parameters:")
    print(f"  Total       : {total:,} ({total / 1e6:.2f}M)")
    print(f"  Batch size  : {cfg.batch_size}")
    shared = " (shared with the output layer)" if cfg.tie_embeddings else ""
    print(f"  Token emb.  : {parts['token_embedding']:,}{shared}")
    print(f"  Position emb: {parts['position_embedding']:,}")
    print(f"  Per layer   : {parts['per_layer']:,} x {cfg.n_layer} = {parts['layers']:,} "
          f"(attention {parts['attention']:,}, MLP {parts['mlp']:,}, norms "
          f"{parts['per_layer'] - parts['attention'] - parts['mlp']:,})")
    print(f"  Final norm  : {parts['final_norm']:,}")
    if not cfg.tie_embeddings:
        print(f"  Output layer: {parts['lm_head']:,}")
    print()
    if cfg.training:
        print("Training settings (defaults for a new run; flags override them):")
        for key, value in cfg.training.items():
            print(f"  --{key} {value}")
        print()
    print_estimate(cfg, total, memory_text, checkpointing)
    print()
    print("Usage:")
    print(f"  python train.py --config_file {path} --model_name my_model --input_file input.txt")
    print(RULE)


def print_estimate(cfg: ModelConfig, n: int, memory_text: str | None, checkpointing: bool) -> None:
    if memory_text:
        memory, where = parse_memory(memory_text), f"--memory {memory_text}"
    else:
        memory, where = detect_memory()
    gc = " with gradient checkpointing" if checkpointing else ""
    optimizer = "Muon + AdamW" if cfg.training.get("optimizer") == "muon" else "AdamW"
    print(f"Training memory estimate ({optimizer}, batch {cfg.batch_size} x block {cfg.block_size}{gc}):")
    print(f"  {'':<12}  {'fp32':>12}  {'bf16 mixed':>12}")
    estimates = {p: estimate_memory(cfg, cfg.batch_size, p, checkpointing, n) for p in ("fp32", "bf16")}
    for field in ("weights", "gradients", "optimizer", "activations", "total"):
        row = [human_bytes(getattr(estimates[p], field)) for p in ("fp32", "bf16")]
        print(f"  {field.capitalize():<12}  {row[0]:>12}  {row[1]:>12}")
    flops = flops_per_token(cfg, n)
    print(f"  FLOPs/token : {flops:,} ({flops / 1e9:.3g} GFLOP, forward + backward)")
    print(f"  Fits {human_bytes(memory)} ({where})?")
    for p in ("fp32", "bf16"):
        if estimates[p].total <= memory:
            print(f"    {p:<5}: yes")
            continue
        best = max_batch_size(cfg, memory, p, checkpointing)
        advice = f"largest batch_size that fits: {best}" if best else "no batch size fits"
        print(f"    {p:<5}: no ({advice})")
