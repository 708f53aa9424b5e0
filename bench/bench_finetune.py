"""The worked example of the README: a small Shakespeare model, fine-tuned on chat tasks with a right answer.

usage: python bench/bench_finetune.py [--work DIR] [--pretrain_iters 600] [--epochs 2] [--n_train 3000]

1. pretrains a small char-level model on builtin:tinyshakespeare with train.py (3 layers x 96,
   block 192: the README's command), unless DIR/checkpoints/base exists;
2. builds the chat data with bench/sft_data.py (next speaker, missing word: train / held out);
3. fine-tunes it with `mypt finetune` (full SFT, the default settings unless given);
4. scores the base model, prompted with the same chat template, and the fine-tuned one on the
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
from sft_data import build

from mypt.api import LoadedModel, load_model
from mypt.cli import run_command
from mypt.finetune.template import Message, encode, prompt_ids, stop_ids
from mypt.ops import IGNORE_INDEX
from mypt.sampling import SamplingConfig, generate_ids

ARCH = ["--n_layer", "3", "--n_head", "4", "--n_embd", "96", "--block_size", "192", "--batch_size", "8",
        "--dropout", "0"]


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
    p.add_argument("--pretrain_iters", type=int, default=600)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--n_train", type=int, default=3000)
    p.add_argument("--n_heldout", type=int, default=300)
    p.add_argument("--finetune_flags", default="", help="more mypt finetune flags, as one string")
    args = p.parse_args()
    print(header("bench_finetune: full SFT of a small Shakespeare model on chat tasks"))
    ck = args.work / "checkpoints"
    data = args.work / "data"
    times = {}
    if not (ck / "base" / "config.json").exists():
        times["pretrain"] = step("pretrain", "train", [
            "--model_name", "base", "--checkpoints_dir", str(ck), "--tokenizer", "char", "--input_file",
            "builtin:tinyshakespeare", *ARCH, "--learning_rate", "3e-3", "--warmup_iters", "30", "--max_iters",
            str(args.pretrain_iters), "--eval_interval", str(args.pretrain_iters), "--eval_iters", "20"])
    train, heldout = build(args.n_train, args.n_heldout)
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in train), encoding="utf-8")
    times["finetune"] = step("finetune", "finetune", [
        "--from", "base", "--model_name", "sft", "--checkpoints_dir", str(ck), "--input_file",
        str(data / "train.jsonl"), "--epochs", str(args.epochs), *args.finetune_flags.split()])
    rows = {}
    for name in ("base", "sft"):
        start = time.perf_counter()
        rows[name] = score(load_model(name, ck, device="cpu", dtype="fp32"), heldout)
        times[f"score {name}"] = time.perf_counter() - start
    counts = {t: sum(c["task"] == t for c in heldout) for t in ("next", "word")}
    print(f"\nheld out: {len(heldout)} conversations ({counts['next']} next speaker, {counts['word']} missing word)")
    print("| model | assistant-token loss | exact match | next speaker | missing word |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['loss']:.3f} | {r['exact']:.1%} | {r['exact_next']:.1%} | {r['exact_word']:.1%} |")
    ratio = rows["sft"]["exact"] / rows["base"]["exact"] if rows["base"]["exact"] else float("inf")
    print(f"SFT exact match / base: {ratio:.1f}x")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
