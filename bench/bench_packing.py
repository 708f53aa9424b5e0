"""Packing: supervised tokens per second of fine-tuning steps, packed rows against one conversation per row.

usage: python bench/bench_packing.py [--input_file CHAT.jsonl] [--n_train 3000]
                                     [--preset configs/shakespeare-char-chat.json] [--block_size N]
                                     [--batch_size N] [--steps 20] [--threads 2]

The conversations are bench/sft_data.py's training set (--n_train of them, seed 0), or the chat
JSON lines --input_file names (any shape mypt finetune reads). A char tokenizer of their
characters (with the chat tokens) encodes them in the chat template, and they are laid out in
rows of block_size + 1 tokens in three ways:

- packed: mypt.finetune.packing.pack, as mypt finetune lays them out (conversations end to end,
  none across two rows);
- one per row, each batch padded to its longest conversation (as a padding collator does);
- one per row, padded to block_size + 1.

Each layout trains a fresh model of --preset (the README's fine-tuning base by default; the same
seed; its vocabulary is the tokenizer's; block_size and batch_size the preset's unless given)
for --steps steps after one warm-up step: forward, backward and a
step of the preset's optimizer, in fp32 on the CPU, on the batches mypt finetune would draw
(mypt.finetune.packing.ChatBatches, seed 0). The table gives the supervised targets (the
assistant's tokens and their end-of-turn, the ones the loss counts) per second of step time, the
share of the batches' input positions that are padding, the rows of one epoch, and how long one
epoch of the data takes at that rate. The layouts run one after the other, alternately, twice;
each row of the table is the faster of its two runs.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _machine import header
from sft_data import build

from mypt.config import ModelConfig, TrainConfig, load_model_config, new_run_train_config
from mypt.data.sources import InputFile
from mypt.finetune import chat_data
from mypt.finetune.packing import ChatBatches, Packed, pack, to_device
from mypt.finetune.template import Message, Turn, turns
from mypt.model import GPT
from mypt.optim import make_optimizer
from mypt.tokenizers import CharTokenizer

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {"packed": "packed", "longest": "one per row, padded to the batch's longest",
           "block": "one per row, padded to block_size + 1"}


def preset_path(name: str) -> str | Path:
    """A preset name or path; a relative path that is not here is looked up in the repository."""
    return REPO / name if not Path(name).exists() and (REPO / name).exists() else name


def conversations(input_file: Path | None, n_train: int) -> list[tuple[Message, ...]]:
    if input_file is None:
        return [tuple(Message(m["role"], m["content"]) for m in c["messages"]) for c in build(n_train, 1)[0]]
    f = InputFile(input_file, input_file.name, "jsonl", None)
    return [c.messages for c in chat_data.read_file(f, hashlib.sha256(), None)]


def layouts(encoded: list[list[Turn]], block_size: int, pad_id: int) -> dict[str, Packed]:
    """The packed rows, and the rows of one conversation each (cut and left out as packing does)."""
    singles = [pack([c], block_size, pad_id) for c in encoded]
    one_each = Packed(np.concatenate([s.tokens for s in singles]), np.concatenate([s.labels for s in singles]),
                      sum(s.conversations for s in singles), sum(s.cut for s in singles),
                      sum(s.dropped for s in singles))
    return {"packed": pack(encoded, block_size, pad_id), "longest": one_each, "block": one_each}


def batch(rows: ChatBatches, layout: str, size: int, index: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Batch `index` as mypt finetune draws it; "longest" cut to its longest conversation."""
    tokens, labels = rows.windows(size, 0, index)
    if layout == "longest":  # a row holds one conversation from its start; padding never occurs inside one
        width = int((tokens != pad_id).sum(axis=1).max())
        tokens, labels = tokens[:, :width], labels[:, :width]
    return tokens, labels


def run(layout: str, packed: Packed, cfg: ModelConfig, tc: TrainConfig, steps: int, pad_id: int) -> dict[str, float]:
    """A fresh model trained `steps` steps (after one warm-up) on the layout's batches: supervised
    targets per second of step time, and the share of input positions that are padding."""
    torch.manual_seed(0)
    model = GPT(cfg)
    optimizer = make_optimizer(model, tc, torch.device("cpu"))
    rows = ChatBatches([packed], [1.0])
    seconds, supervised, padding, positions = 0.0, 0, 0, 0
    for step in range(steps + 1):
        tokens, labels = batch(rows, layout, cfg.batch_size, step, pad_id)
        x, y = to_device(tokens, labels, torch.device("cpu"))
        start = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step warms up
            seconds += time.perf_counter() - start
            supervised += int((y >= 0).sum())
            padding, positions = padding + int((x == pad_id).sum()), positions + x.numel()
    return {"rate": supervised / seconds, "padding": padding / positions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input_file", type=Path, help="chat JSON lines (default: bench/sft_data.py's training set)")
    ap.add_argument("--n_train", type=int, default=3000, help="conversations of bench/sft_data.py")
    ap.add_argument("--preset", default="configs/shakespeare-char-chat.json",
                    help="a preset name or file (a relative path is also looked up in the repository)")
    ap.add_argument("--block_size", type=int, help="default: the preset's")
    ap.add_argument("--batch_size", type=int, help="default: the preset's")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(header("Packing: supervised tokens per second, packed vs one conversation per row"))
    convs = conversations(args.input_file, args.n_train)
    tok = CharTokenizer(sorted({ch for c in convs for m in c for ch in m.content}))
    encoded = [turns(tok, c) for c in convs]
    preset = load_model_config(preset_path(args.preset))
    cfg = replace(preset, vocab_size=tok.model_vocab_size(), block_size=args.block_size or preset.block_size,
                  batch_size=args.batch_size or preset.batch_size)
    tc, _ = new_run_train_config(preset, {})
    data = layouts(encoded, cfg.block_size, tok.eot_id)
    total = int((data["packed"].labels[:, 1:] >= 0).sum())
    lengths = [sum(len(t.ids) for t in c) for c in encoded]
    source = args.input_file or "bench/sft_data.py (training set)"
    print(f"data: {source}: {len(convs):,} conversations of {np.mean(lengths):.0f} tokens on average (longest "
          f"{max(lengths)}), {total:,} supervised targets; {data['packed'].cut} cut, {data['packed'].dropped} left out")
    print(f"model: {args.preset} ({cfg.n_layer} layers x {cfg.n_embd}, vocabulary {cfg.vocab_size}), block_size "
          f"{cfg.block_size}, batch {cfg.batch_size}, optimizer {tc.optimizer}, fp32; {args.steps} steps after "
          "one warm-up, the faster of two runs per layout")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in LAYOUTS}
    for name in [*LAYOUTS, *reversed(LAYOUTS)]:
        results[name].append(run(name, data[name], cfg, tc, args.steps, tok.eot_id))
    print("| layout | rows per epoch | padding | supervised tokens/s | one epoch (s) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, label in LAYOUTS.items():
        best = max(results[name], key=lambda r: r["rate"])
        print(f"| {label} | {data[name].rows:,} | {best['padding']:.1%} | {best['rate']:,.0f} | "
              f"{total / best['rate']:,.1f} |")


if __name__ == "__main__":
    main()
