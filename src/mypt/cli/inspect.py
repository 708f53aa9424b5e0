"""Show what a checkpoint folder holds, without loading its weights.

examples:
  python scripts/inspect_model.py --model_name dante
  mypt inspect --model_name dante --checkpoints_dir runs/ --verify

Prints the architecture, the tokenizer and its size, the exact parameter count, training
progress (iteration, best and last validation loss), the input file and whether it is still
there, every file with its size (checked against the manifest), and where the loss curve is.
--verify also reads every file: each checkpoint file's sha256 against the manifest, and the
input's against the sha256 recorded at training.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mypt.cli.options import add_checkpoints_dir
from mypt.errors import MyPTError

RULE = "=" * 70


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_name", required=True, help="the model to inspect (a folder under --checkpoints_dir)")
    add_checkpoints_dir(p)
    p.add_argument("--verify", action="store_true",
                   help="also check each file's sha256 against the manifest, and the input's against the one "
                   "recorded at training (reads every byte)")


def run(args: argparse.Namespace) -> int:
    from mypt.checkpoint import checkpoint_dir, folder_problem, missing_files

    folder = checkpoint_dir(args.checkpoints_dir, args.model_name)
    if not folder.is_dir():
        raise folder_problem(folder)
    if not (folder / "config.json").is_file():
        raise MyPTError(f"{folder} is an incomplete checkpoint: {', '.join(missing_files(folder))} missing; "
                        "restore the missing file(s) from a backup (or train the model again under another name)")
    print("\n".join(describe(folder, args.verify)))
    return 0


def describe(folder: Path, verify: bool = False) -> list[str]:
    """The report's lines for the checkpoint folder (a damaged one too: that is what it is for)."""
    from mypt.build import checkpoint_config, checkpoint_tokenizer
    from mypt.checkpoint import Checkpoint
    from mypt.cli.output import tokenizer_summary
    from mypt.estimate import count_params
    from mypt.fsutil import read_json

    tok_path = folder / "tokenizer.json"
    tokenizer = read_json(tok_path, "tokenizer") if tok_path.is_file() else None
    state = _optional_json(folder / "training_state.json")
    ckpt = Checkpoint(read_json(folder / "config.json", "config"), tokenizer or {}, state, {}, None, folder)
    cfg = checkpoint_config(ckpt)
    lines = [RULE, f"Model: {folder.name}", f"Folder: {folder}/", RULE, ""]
    lines += _architecture(cfg, count_params(cfg))
    if tokenizer is not None:
        tok = checkpoint_tokenizer(ckpt, cfg)
        lines.append(f"  {'Tokenizer':<14}: {tokenizer_summary(tok)}")
    else:
        lines.append(f"  {'Tokenizer':<14}: tokenizer.json is missing")
    lines += [""] + _training(state, verify) + [""] + _files(folder, state, verify) + [""]
    lines += _curves(folder) + [RULE]
    return lines


def _optional_json(path: Path) -> dict[str, Any]:
    from mypt.fsutil import read_json

    if not path.is_file():
        return {}
    data = read_json(path, "training state")
    return data if isinstance(data, dict) else {}


def _architecture(cfg: Any, n: int) -> list[str]:
    rows = [("Layers", cfg.n_layer), ("Heads", cfg.n_head), ("Embedding", cfg.n_embd),
            ("Block size", cfg.block_size), ("Vocab size", cfg.vocab_size), ("Dropout", cfg.dropout),
            ("Bias", cfg.bias), ("Batch size", cfg.batch_size)]
    rows += cfg.components()
    lines = ["Architecture (config.json):"] + [f"  {label:<14}: {value}" for label, value in rows]
    lines.append(f"  {'Parameters':<14}: {n:,} ({n / 1e6:.2f}M)")
    return lines


def _loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "not evaluated yet"


def _training(state: dict[str, Any], verify: bool) -> list[str]:
    if not state:
        return ["Training: training_state.json is missing"]
    lines = ["Training (training_state.json):"]
    rows = [("Iteration", state.get("iteration", "?")),
            ("Best val loss", _loss(state.get("best_val_loss"))),
            ("Last val loss", _loss(state.get("last_val_loss"))),
            ("Tokens seen", f"{state.get('tokens_seen', 0):,}"),
            ("Input file", _input_status(state, verify))]
    if state.get("imported_from"):
        rows.append(("Imported from", state["imported_from"]))
    if state.get("exported_from"):
        rows.append(("Exported from", state["exported_from"]))
    if state.get("saved_at"):
        rows.append(("Saved at", state["saved_at"]))
    return lines + [f"  {label:<14}: {value}" for label, value in rows]


def _input_status(state: dict[str, Any], verify: bool) -> str:
    from mypt.data import input_status

    return input_status(state, verify)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _file_check(path: Path, entry: Any, verify: bool) -> str:
    if not isinstance(entry, dict):
        return ""
    if path.stat().st_size != entry.get("size"):
        return f"  SIZE DIFFERS from the manifest ({entry.get('size')} bytes)"
    if verify:
        from mypt.fsutil import sha256_file

        return "  sha256 ok" if sha256_file(path) == entry.get("sha256") else "  SHA256 DIFFERS from the manifest"
    return ""


def _files(folder: Path, state: dict[str, Any], verify: bool) -> list[str]:
    from mypt.checkpoint import CHECKPOINT_FILES, SAFETENSORS_FILE
    from mypt.estimate import human_bytes

    manifest = state.get("manifest") if isinstance(state.get("manifest"), dict) else {}
    entries = sorted(folder.iterdir(), key=lambda p: (p.name not in CHECKPOINT_FILES, p.name))
    lines = ["Files:"]
    for path in entries:
        name = path.name + ("/" if path.is_dir() else "")
        check = _file_check(path, manifest.get(path.name), verify) if path.is_file() else ""
        lines.append(f"  {name:<22} {human_bytes(_size(path)):>12}{check}")
    weights_only = (folder / SAFETENSORS_FILE).is_file() and not (folder / "model.pt").exists()
    expected = [n for n in CHECKPOINT_FILES if not (weights_only and n in ("model.pt", "optimizer.pt"))]
    expected += list(manifest)
    for name in dict.fromkeys(expected):
        if not (folder / name).exists():
            lines.append(f"  {name:<22} {'MISSING':>12}")
    if weights_only:
        lines.append("  (weights only: no optimizer state; training from it starts a fresh optimizer)")
    return lines


def _curves(folder: Path) -> list[str]:
    from mypt.metrics import METRICS_FILE, PLOT_FILE, TENSORBOARD_DIR

    plot = folder / PLOT_FILE
    lines = [f"Loss curve: {plot}" if plot.is_file() else "Loss curve: none yet (drawn at the first evaluation)"]
    if (folder / METRICS_FILE).is_file():
        lines.append(f"Metrics: {folder / METRICS_FILE}")
    if (folder / TENSORBOARD_DIR).is_dir():
        lines.append(f"TensorBoard: tensorboard --logdir {folder / TENSORBOARD_DIR}")
    return lines
