"""The worked example of the README: a small Shakespeare model, fine-tuned on chat tasks with a right answer.

usage: python bench/bench_finetune.py [--work DIR] [--n_train 3000] [--finetune_flags "--epochs 4"]

1. pretrains a small char-level model on builtin:tinyshakespeare with train.py and
   configs/shakespeare-char-chat.json (the README's command), unless DIR/checkpoints/base exists;
2. builds the chat data with bench/sft_data.py (speaker, last word, next speaker: train / held out);
3. fine-tunes it with `mypt finetune` as the README does (4 epochs): full SFT, then LoRA rank 16;
4. scores the base model, prompted with the same chat template, and the fine-tuned ones on the
   held-out conversations: the loss on the assistant's tokens (nats per token, the tokens the
   fine-tune trains on) and exact match (greedy reply, up to its end-of-turn or first newline,
   stripped, equal to the answer), per task.

Each step is timed; the commands are the ones the README shows (run in-process).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _machine import header
from sft_data import TASKS, build

from mypt.api import LoadedModel, load_model
from mypt.cli import run_command
from mypt.finetune.template import Message, encode, prompt_ids, stop_ids
from mypt.ops import IGNORE_INDEX
from mypt.sampling import SamplingConfig, generate_ids


def step(title: str, command: str, args: list[str]) -> float:
    print(f"\n$ mypt {command} {' '.join(args)}", flush=True)
    start = time.perf_counter()
    assert run_command(command, args) == 0, f"mypt {command} failed"
    seconds = time.perf_counter() - start
    print(f"[{title}: {seconds:.0f} s]", flush=True)
    return seconds


@torch.no_grad()
def score(lm: LoadedModel, convs: list[dict]) -> dict[str, float]:
    """Assistant-token loss and exact match, overall and per task."""
    nats, tokens = 0.0, 0
    hits: dict[str, list[bool]] = {}
    for c in convs:
        messages = [Message(m["role"], m["content"]) for m in c["messages"]]
        ids, mask = encode(lm.tokenizer, messages)
        x = torch.tensor([ids[:-1]])
        y = torch.tensor([[i if m else IGNORE_INDEX for i, m in zip(ids[1:], mask[1:], strict=True)]])
        n = int((y >= 0).sum())
        nats += lm.model(x, y)[1].item() * n
        tokens += n
        reply = greedy_reply(lm, messages[:-1])
        hits.setdefault(c["task"], []).append(reply.split("\n")[0].strip() == messages[-1].content)
    out = {"loss": nats / tokens, "exact": sum(sum(h) for h in hits.values()) / len(convs)}
    out.update({f"exact_{task}": sum(h) / len(h) for task, h in hits.items()})
    return out


def greedy_reply(lm: LoadedModel, messages: list[Message]) -> str:
    """The greedy reply to messages in the chat template, to its end-of-turn (a base model, which
    has no template of its own, is prompted with the same ids and may sample any id)."""
    tok = lm.tokenizer
    cfg = SamplingConfig(max_new_tokens=24, temperature=0, stop_ids=stop_ids(tok))
    ids = generate_ids(lm.model, prompt_ids(tok, messages), cfg, vocab_size=tok.n_vocab, seed=0, eot_id=tok.eot_id)
    return tok.decode(list(ids))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("bench_finetune"))
    p.add_argument("--n_train", type=int, default=3000)
    p.add_argument("--n_heldout", type=int, default=300)
    p.add_argument("--pretrain_flags", default="", help="more train.py flags for the base, as one string")
    p.add_argument("--finetune_flags", default="--epochs 4", help="more mypt finetune flags (both runs), as one "
                   "string (default: the README's)")
    p.add_argument("--lora_rank", type=int, default=16, help="the LoRA run's rank (0: no LoRA run)")
    args = p.parse_args()
    print(header("bench_finetune: full SFT and LoRA of a small Shakespeare model on chat tasks"))
    ck = args.work / "checkpoints"
    data = args.work / "data"
    times = {}
    if not (ck / "base" / "config.json").exists():
        times["pretrain"] = step("pretrain", "train", [
            "--config_file", "configs/shakespeare-char-chat.json", "--model_name", "base", "--checkpoints_dir",
            str(ck), "--tokenizer", "char", "--input_file", "builtin:tinyshakespeare", *args.pretrain_flags.split()])
    train, heldout = build(args.n_train, args.n_heldout)
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in train), encoding="utf-8")
    runs = {"sft": []} | ({f"lora{args.lora_rank}": ["--lora_rank", str(args.lora_rank)]} if args.lora_rank else {})
    for name, flags in runs.items():
        times[name] = step(name, "finetune", ["--from", "base", "--model_name", name, "--checkpoints_dir", str(ck),
                                              "--input_file", str(data / "train.jsonl"), *flags,
                                              *args.finetune_flags.split()])
    rows = {}
    for name in ("base", *runs):
        start = time.perf_counter()
        rows[name] = score(load_model(name, ck, device="cpu", dtype="fp32"), heldout)
        times[f"score {name}"] = time.perf_counter() - start
    counts = ", ".join(f"{sum(c['task'] == t for c in heldout)} {t}" for t in TASKS)
    print(f"\nheld out: {len(heldout)} conversations ({counts})")
    print("| model | assistant-token loss | exact match | " + " | ".join(TASKS) + " |")
    print("|---|---|---|" + "---|" * len(TASKS))
    for name, r in rows.items():
        print(f"| {name} | {r['loss']:.3f} | {r['exact']:.1%} | "
              + " | ".join(f"{r[f'exact_{t}']:.1%}" for t in TASKS) + " |")
    base, sft = rows["base"]["exact"], rows["sft"]["exact"]
    print(f"SFT exact match / base: {sft / base:.1f}x" if base else "SFT exact match / base: base 0")
    for name in runs:
        if name != "sft" and sft:
            print(f"{name} exact match / SFT: {rows[name]['exact'] / sft:.2f}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
