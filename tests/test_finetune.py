"""Supervised fine-tuning: chat data, the template, masking, packing, `mypt finetune`, chat.

Conversations are built from tinyshakespeare's lines (conftest.corpus_text); bases are tiny
random or briefly trained models. Bit-exact resume is checked as test_resume does for train.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TINY_ARCH, corpus_text, require, snapshot
from forked_cli import ONE_THREAD, run
from test_resume import assert_same_checkpoint, logged_losses

from mypt.checkpoint import load_checkpoint, save_checkpoint
from mypt.cli import run_command
from mypt.config import ModelConfig
from mypt.data.sources import InputFile, shown
from mypt.finetune import chat_data, template
from mypt.finetune.packing import ChatBatches, pack
from mypt.finetune.template import Message
from mypt.model import GPT
from mypt.ops import linear_cross_entropy
from mypt.tokenizers import BPETokenizer, CharTokenizer, GPT2Tokenizer, tokenizer_from_json, train_bpe

LINES = [line for line in corpus_text(60_000).splitlines() if 0 < len(line) <= 40]
CHARS = sorted(set(corpus_text(60_000)))
ARCH = {**TINY_ARCH, "block_size": 96}


def conversations(n: int, start: int = 0) -> list[dict]:
    """n conversations from consecutive lines: a user line and the next line as the reply; every
    third opens with a system message and goes on for a second exchange."""
    out = []
    for i in range(start, start + n):
        a, b, c = LINES[i % len(LINES)], LINES[(i + 1) % len(LINES)], LINES[(i + 2) % len(LINES)]
        messages = [{"role": "user", "content": a}, {"role": "assistant", "content": b}]
        if i % 3 == 0:
            messages = [{"role": "system", "content": "Next line."}, *messages,
                        {"role": "user", "content": "Again."}, {"role": "assistant", "content": c}]
        out.append({"messages": messages})
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_base(root: Path, name: str, tok=None, *, tie: bool = True, seed: int = 0, **arch) -> Path:
    """A random tiny base model in root/name (no training needed)."""
    torch.manual_seed(seed)
    tok = tok or CharTokenizer(CHARS)
    cfg = ModelConfig(**{**ARCH, **arch}, vocab_size=tok.model_vocab_size(), tie_embeddings=tie)
    save_checkpoint(root / name, model_state=GPT(cfg).state_dict(), config=cfg.to_dict(), tokenizer=tok.to_json(),
                    training_state={"iteration": 5}, optimizer_state={})
    return root / name


def finetune(cwd: Path, *args: str):
    return run("--device", "cpu", "--dtype", "fp32", *args, cwd=cwd, script="finetune.py", env=ONE_THREAD)


# ---------------------------------------------------------------------------------------------
# The template


def test_template_ids_and_the_targets_trained_on():
    tok = CharTokenizer(CHARS)
    ids = tok.chat_ids
    messages = [Message("system", "Be"), Message("user", "Hi"), Message("assistant", "Yo"),
                Message("user", "?"), Message("assistant", "")]
    got, mask = template.encode(tok, messages)
    s, u, a, e = ids["<|system|>"], ids["<|user|>"], ids["<|assistant|>"], ids["<|end|>"]
    want = [s, *tok.encode("Be"), e, u, *tok.encode("Hi"), e, a, *tok.encode("Yo"), e, u, *tok.encode("?"), e, a, e]
    assert got == want
    trained = [i for i, m in enumerate(mask) if m]  # "Yo" and its <|end|>; the empty reply's <|end|>
    assert trained == [9, 10, 11, 16]
    assert template.prompt_ids(tok, messages[:2]) == want[:8] + [a]
    gpt2 = GPT2Tokenizer()
    literal = template.encode(gpt2, [Message("user", "<|end|>"), Message("assistant", "x")])[0]
    assert literal.count(gpt2.chat_ids["<|end|>"]) == 2 and gpt2.decode(literal[1:-4]) == "<|end|>"  # text


def test_fit_history_drops_the_oldest_exchanges_and_keeps_the_system_message():
    tok = CharTokenizer(CHARS)
    history = [Message("system", "Be brief."), Message("user", LINES[0]), Message("assistant", LINES[1]),
               Message("user", LINES[2]), Message("assistant", LINES[3]), Message("user", LINES[4])]
    whole = template.prompt_ids(tok, history)
    assert template.fit_history(tok, history, len(whole)) == (history, whole)
    kept, ids = template.fit_history(tok, history, len(whole) - 1)
    assert kept == [history[0], *history[3:]] and ids == template.prompt_ids(tok, kept)
    kept, _ = template.fit_history(tok, history, 5)
    assert kept == [history[0], history[-1]]  # the last message stays, whatever its length


# ---------------------------------------------------------------------------------------------
# Reading the three shapes


def _read(path: Path, form: str | None = None) -> list[tuple[Message, ...]]:
    kind = "parquet" if path.suffix == ".parquet" else "jsonl"
    f = InputFile(path, path.name, kind, None)
    return [c.messages for c in chat_data.read_file(f, hashlib.sha256(), form)]


def test_each_shape_reads_as_its_conversation(tmp_path):
    user, reply = LINES[0], LINES[1]
    expected = (Message("user", user), Message("assistant", reply))
    shapes = {
        "messages.jsonl": {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]},
        "pc.jsonl": {"prompt": user, "completion": reply},
        "trl.jsonl": {"prompt": [{"role": "user", "content": user}],
                      "completion": [{"role": "assistant", "content": reply}]},
        "alpaca.jsonl": {"instruction": user, "input": "", "output": reply},
    }
    for name, record in shapes.items():
        assert _read(write_jsonl(tmp_path / name, [record, record])) == [expected, expected], name
    with_input = {"instruction": user, "input": LINES[2], "output": reply}
    assert _read(write_jsonl(tmp_path / "ai.jsonl", [with_input]))[0][0] == Message("user", f"{user}\n\n{LINES[2]}")
    pa, pq = require("pyarrow"), require("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist([shapes["messages.jsonl"]] * 2), tmp_path / "m.parquet")
    assert _read(tmp_path / "m.parquet") == [expected, expected]
    assert _read(tmp_path / "pc.jsonl", "prompt_completion") == [expected, expected]


BAD_LINES = {  # a good first line, then this one (line 2): the message names the file and line 2
    "not-json": ("{oops", "is not valid JSON"),
    "not-an-object": ("[1, 2]", "is not a messages conversation"),
    "other-shape": ({"prompt": "a", "completion": "b"}, "is not a messages conversation"),
    "unknown-role": ({"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]},
                     'has the role "narrator"; the roles are system, user, assistant'),
    "empty": ({"messages": []}, "the conversation is empty"),
    "no-assistant": ({"messages": [{"role": "user", "content": "x"}]}, "has no assistant message"),
    "content-not-text": ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
                         "messages[0].content must be text"),
    "no-role": ({"messages": [{"content": "x"}]}, 'must be an object with "role" and "content"'),
    "unknown-character": ({"messages": [{"role": "user", "content": "€"}, {"role": "assistant", "content": "y"}]},
                          "contains characters not in this model's vocabulary"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_a_bad_line_is_named_and_nothing_is_written(tmp_path, capsys, case):
    ck = tmp_path / "ck"
    make_base(ck, "base")
    line, message = BAD_LINES[case]
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(conversations(1)[0]) + "\n" + (line if isinstance(line, str) else json.dumps(line))
                    + "\n", encoding="utf-8")
    before = snapshot(tmp_path)
    args = ["--from", "base", "--model_name", "new", "--input_file", str(data), "--checkpoints_dir", str(ck)]
    assert run_command("finetune", args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: input file {shown(data)} line 2") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_bad_data_of_whole_files_and_flags(tmp_path, capsys):
    ck = tmp_path / "ck"
    make_base(ck, "base")
    good = write_jsonl(tmp_path / "good.jsonl", conversations(4))
    text = tmp_path / "notes.txt"
    text.write_text("just text\n")
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}] * 2)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": LINES[0] * 10, "completion": "x"}] * 3)
    cases = [
        (["--input_file", str(text)], "chat data must be JSON lines"),
        (["--input_file", "builtin:tinyshakespeare"], "the built-in corpora are plain text"),
        (["--input_file", str(alpaca), "--format", "messages"], "line 1 is not a messages conversation (as --format"),
        (["--input_file", str(write_jsonl(tmp_path / "one.jsonl", conversations(1)))], "needs at least 2"),
        (["--input_file", str(good), "--epochs", "2", "--max_iters", "5"], "pass one of them"),
        (["--input_file", str(long)], "no training conversation fits in block_size + 1 = 97 tokens"),
        ([], "name the conversations to fine-tune on"),
        (["--input_file", str(good), "--from", "nope"], "--from nope: no model of that name"),
    ]
    before = snapshot(tmp_path)
    for extra, message in cases:
        args = ["--model_name", "new", "--checkpoints_dir", str(ck), *extra]
        if "--from" not in extra:
            args += ["--from", "base"]
        assert run_command("finetune", args) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)
    assert run_command("finetune", ["--model_name", "new", "--checkpoints_dir", str(ck)]) == 2
    assert "start one with --from BASE" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_validation_is_held_out_by_file_and_line(tmp_path):
    src = chat_data.Source("input", (str(tmp_path),))
    path = write_jsonl(tmp_path / "c.jsonl", conversations(60))
    read = chat_data.read_file(InputFile(path, "c.jsonl", "jsonl", None), hashlib.sha256(), None)
    train, val = chat_data.split(read, 0.2, src)
    assert len(train) + len(val) == 60 and 4 <= len(val) <= 20
    more = chat_data.read_file(InputFile(write_jsonl(tmp_path / "c.jsonl", conversations(90)), "c.jsonl",
                                         "jsonl", None), hashlib.sha256(), None)
    _, val_more = chat_data.split(more, 0.2, src)
    assert {c.row for c in val} == {c.row for c in val_more if c.row < 60}  # each line stays on its side


# ---------------------------------------------------------------------------------------------
# The loss head's ignore index


def test_masked_targets_leave_loss_and_gradients_unchanged():
    """The fused head's loss is F.cross_entropy(ignore_index=-1), its gradients autograd's; masked
    rows contribute nothing: any value below 0 masks alike, and dropping the rows changes nothing."""
    torch.manual_seed(0)
    x = torch.randn(2100, 16, dtype=torch.float64)  # more rows than one LOSS_CHUNK_ROWS chunk
    w = torch.randn(40, 16, dtype=torch.float64)
    t = torch.randint(0, 40, (2100,))
    t[torch.rand(2100) < 0.6] = -1

    def grads(x, w, t, fused=True):
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = linear_cross_entropy(x, w, t) if fused else F.cross_entropy(x @ w.T, t, ignore_index=-1)
        loss.backward()
        return loss.detach(), x.grad, w.grad

    loss, gx, gw = grads(x, w, t)
    ref = grads(x, w, t, fused=False)
    assert torch.allclose(loss, ref[0], atol=1e-12) and torch.allclose(gx, ref[1], atol=1e-12)
    assert torch.allclose(gw, ref[2], atol=1e-12)
    other = grads(x, w, torch.where(t < 0, -100, t))
    assert all(torch.equal(a, b) for a, b in zip((loss, gx, gw), other, strict=True))
    kept = t >= 0
    sub = grads(x[kept], w, t[kept])
    assert torch.allclose(sub[0], loss, atol=1e-12) and torch.allclose(sub[2], gw, atol=1e-12)
    assert torch.equal(gx[~kept], torch.zeros_like(gx[~kept])) and torch.allclose(gx[kept], sub[1], atol=1e-12)
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(x, w, t), loss, atol=1e-12)


def test_the_model_trains_only_on_unmasked_targets():
    """Through the whole GPT: the padding after a row's last target changes no gradient."""
    cfg = ModelConfig(**{**TINY_ARCH, "dropout": 0.0}, vocab_size=70)
    model = GPT(cfg)
    x = torch.randint(0, 70, (2, 32), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 70, (2, 32), generator=torch.Generator().manual_seed(2))
    y[:, 20:] = -1
    y[:, :5] = -1

    def grads(x):
        model.zero_grad()
        model(x, y)[1].backward()
        return [p.grad.clone() for p in model.parameters()]

    before = grads(x)
    padded = x.clone()
    padded[:, 21:] = 3  # inputs after the last trained target: padding
    assert all(torch.equal(a, b) for a, b in zip(before, grads(padded), strict=True))


# ---------------------------------------------------------------------------------------------
# Packing and batches


def test_packing_keeps_conversations_whole_and_counts_what_it_cuts():
    tok = CharTokenizer(CHARS)
    convs = [[Message("user", "a" * n), Message("assistant", "b" * m)] for n, m in
             [(10, 5), (20, 10), (3, 3), (30, 20), (40, 2), (5, 5)]]
    convs.append([Message("user", "c" * 200), Message("assistant", "d")])  # no reply fits: left out
    convs.append([Message("user", "x"), Message("assistant", "y"), Message("user", "z" * 90),
                  Message("assistant", "w")])  # cut after its first exchange
    p = pack((template.turns(tok, m) for m in convs), 63, tok.eot_id)
    assert p.tokens.shape[1] == 64 and p.cut == 1 and p.dropped == 1 and p.conversations == 7
    lengths = [len(template.encode(tok, m)[0]) for m in convs[:6]] + [6]  # the cut one: its first exchange
    rows, used = [], 64
    for n in lengths:  # the next-fit rule, by hand
        if used + n > 64:
            rows.append([])
            used = 0
        rows[-1].append(n)
        used += n
    assert p.rows == len(rows)
    for r, row in enumerate(rows):
        at = 0
        for n in row:
            ids = p.tokens[r, at:at + n]
            assert ids[0] == tok.chat_ids["<|user|>"] and ids[-1] == tok.chat_ids["<|end|>"]
            at += n
        assert (p.tokens[r, at:] == tok.eot_id).all() and (p.labels[r, at:] == -1).all()  # masked padding
    trained = p.labels >= 0
    assert (p.labels[trained] == p.tokens[trained]).all()
    assert trained.sum() == sum(m + 1 for _, m in [(10, 5), (20, 10), (3, 3), (30, 20), (40, 2), (5, 5)]) + 2
    assert 0 < p.trained_fraction() < 0.5


def test_batches_are_a_pure_function_of_seed_and_index_and_cover_each_epoch():
    tok = CharTokenizer(CHARS)
    p = pack((template.turns(tok, [Message(r["role"], r["content"]) for r in c["messages"]])
              for c in conversations(40)), 95, tok.eot_id)
    a, b = ChatBatches([p], [1.0]), ChatBatches([p], [1.0])
    for index in (7, 0, 3):
        assert all(np.array_equal(u, v) for u, v in zip(a.windows(4, 5, index), b.windows(4, 5, index), strict=True))
    epoch = np.concatenate([a.windows(1, 5, i)[0] for i in range(p.rows)])
    assert sorted(map(bytes, epoch)) == sorted(map(bytes, p.tokens))  # every row once per epoch
    assert not np.array_equal(a.windows(4, 6, 0)[0], a.windows(4, 5, 0)[0])
    other = pack((template.turns(tok, [Message("user", "x"), Message("assistant", "y")]) for _ in range(9)), 95,
                 tok.eot_id)
    mix = ChatBatches([p, other], [3.0, 1.0])  # a --data mixture: each row draws its source by weight
    rows = np.concatenate([mix.windows(8, 5, i)[0] for i in range(50)])
    from_other = (rows == other.tokens[0]).all(axis=1).mean()
    assert 0.1 < from_other < 0.4 and np.array_equal(rows[:8], ChatBatches([p, other], [3.0, 1.0]).windows(8, 5, 0)[0])


# ---------------------------------------------------------------------------------------------
# mypt finetune


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A base trained briefly by train.py (char tokenizer, block 96), and chat data."""
    root = tmp_path_factory.mktemp("ft")
    (root / "input.txt").write_text(corpus_text(60_000), encoding="utf-8")
    flags = [f"--{k}={str(v).lower()}" for k, v in ARCH.items()]
    r = run("--model_name", "base", "--tokenizer", "char", "--input_file", "input.txt", *flags, "--max_iters", "20",
            "--eval_interval", "20", "--eval_iters", "1", "--device", "cpu", cwd=root, env=ONE_THREAD)
    assert r.returncode == 0, r.stdout + r.stderr
    write_jsonl(root / "chat.jsonl", conversations(80))
    return root


SCHEDULE = ["--learning_rate", "3e-3", "--warmup_iters", "2", "--lr_decay_iters", "16", "--eval_interval", "4",
            "--eval_iters", "2", "--log_interval", "1", "--dropout", "0.1"]


@pytest.mark.slow
def test_finetune_a_trained_base_leaves_it_unchanged_and_records_it(trained):
    base = trained / "checkpoints" / "base"
    before = snapshot(base)
    r = finetune(trained, "--from", "base", "--model_name", "chat", "--input_file", "chat.jsonl", "--max_iters", "6",
                 *SCHEDULE)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "80 conversations" in out and "of the training targets are trained on" in out
    assert "fine-tuning for --max_iters 6; defaults: learning_rate" not in out  # given flags are not defaults
    assert "of the targets trained on" in out and "done: iteration 6" in out
    assert snapshot(base) == before
    folder = trained / "checkpoints" / "chat"
    assert {"model.pt", "config.json", "tokenizer.json", "training_state.json", "optimizer.pt"} <= \
        {p.name for p in folder.iterdir()}
    state = json.loads((folder / "training_state.json").read_text())
    weights = hashlib.sha256((base / "model.pt").read_bytes()).hexdigest()
    assert state["finetune"]["base_model"] == "base" and state["finetune"]["base_sha256"] == weights
    assert json.loads((folder / "tokenizer.json").read_text())["chat_format"] == "mypt-chat-1"
    assert (folder / "best" / "model.pt").exists()
    ck = load_checkpoint(folder)
    assert not torch.equal(ck.model_state["lm_head.weight"], load_checkpoint(base).model_state["lm_head.weight"])
    again = finetune(trained, "--model_name", "chat", "--max_iters", "6")
    assert again.returncode == 0 and "already fine-tuned to iteration 6" in again.stdout
    wrong = run("--model_name", "chat", "--max_iters", "8", cwd=trained, env=ONE_THREAD)  # train.py
    assert wrong.returncode == 2 and "resume it with mypt finetune --model_name chat" in wrong.stderr


def straight_and_in_halves(root: Path, straight: str, halves: str, iters: int, flags: list[str]) -> tuple:
    """Fine-tunes of base: `straight` to iters at once, `halves` to iters / 2 and then resumed to
    iters (given only its name), each asserted to succeed; their three results."""
    runs = (finetune(root, "--from", "base", "--model_name", straight, "--max_iters", str(iters), *flags),
            finetune(root, "--from", "base", "--model_name", halves, "--max_iters", str(iters // 2), *flags),
            finetune(root, "--model_name", halves, "--max_iters", str(iters)))
    for r in runs:
        assert r.returncode == 0, r.stdout + r.stderr
    return runs


@pytest.mark.slow
def test_resumed_finetune_equals_the_straight_run_bit_for_bit(trained):
    straight, first, second = straight_and_in_halves(trained, "straight", "halves", 16,
                                                     ["--input_file", "chat.jsonl", *SCHEDULE])
    assert "resuming the fine-tune 'halves' of 'base' from iteration 8" in second.stdout
    expected = logged_losses(straight.stdout)
    assert sorted(expected) == list(range(1, 17))
    assert logged_losses(first.stdout, second.stdout) == expected
    ckpts = trained / "checkpoints"
    assert_same_checkpoint(ckpts / "straight", ckpts / "halves")
    changed = write_jsonl(trained / "changed.jsonl", conversations(80, start=1))
    r = finetune(trained, "--model_name", "halves", "--max_iters", "18", "--input_file", str(changed))
    assert r.returncode == 2 and "--allow_data_change" in r.stderr


@pytest.mark.slow
def test_a_lora_finetune_trains_only_its_adapters_resumes_bit_for_bit_and_exports(trained, capsys):
    straight, _, _ = straight_and_in_halves(trained, "lora", "lora2", 8, ["--input_file", "chat.jsonl", "--lora_rank",
                                                                          "4", "--lora_targets", "attn", *SCHEDULE])
    assert "LoRA rank 4 (alpha 8, dropout 0) on the blocks' attn linear layers" in straight.stdout
    ckpts = trained / "checkpoints"
    assert_same_checkpoint(ckpts / "lora", ckpts / "lora2")
    base, tuned = load_checkpoint(ckpts / "base").model_state, load_checkpoint(ckpts / "lora")
    chat = sorted(tokenizer_from_json(tuned.tokenizer, "tokenizer.json").chat_ids.values())
    assert tuned.config["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": "attn", "tokens": chat}
    adapters = {k for k in tuned.model_state if ".lora_" in k}
    assert adapters == {f"transformer.h.{i}.attn.{m}.lora_{x}" for i in range(2) for m in ("c_attn", "c_proj")
                        for x in "AB"}
    rows = {k for k in tuned.model_state if k.endswith("rows_delta")}  # the chat tokens' rows train too
    layers = ("transformer.wte",) + (() if ModelConfig.from_dict(tuned.config, "c").tie_embeddings else ("lm_head",))
    assert {k: tuple(tuned.model_state[k].shape) for k in rows} == {
        f"{m}.rows_delta": (len(chat), TINY_ARCH["n_embd"]) for m in layers}
    for name, tensor in base.items():  # frozen: every weight of the base is saved as it was
        assert torch.equal(tuned.model_state[name], tensor), name
    assert any(tuned.model_state[k].abs().sum() > 0 for k in adapters if k.endswith("lora_B"))  # B has moved
    assert all(tuned.model_state[k].abs().sum() > 0 for k in rows)
    moments = torch.load(ckpts / "lora" / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    learned = sum(tuned.model_state[k].numel() for k in adapters | rows)
    assert sum(v["exp_avg"].numel() for v in moments.values()) == learned
    assert run_command("export", ["--model_name", "lora", "--checkpoints_dir", str(ckpts), "--format", "peft",
                                  "--out", str(trained / "adapter")]) == 0
    assert (trained / "adapter" / "adapter_model.safetensors").is_file()
    bad = finetune(trained, "--from", "base", "--model_name", "lora3", "--input_file", "chat.jsonl",
                   "--lora_alpha", "8")
    assert bad.returncode == 2 and "add --lora_rank R" in bad.stderr and not (ckpts / "lora3").exists()


@pytest.mark.slow
@pytest.mark.parametrize("tie", [True, False])
def test_a_base_without_chat_tokens_grows_its_embedding(tmp_path, tie):
    """A char tokenizer saved before the chat tokens: 4 rows more, each the mean of the base's rows
    plus small noise; the base's own rows unchanged until training moves them."""
    ck = tmp_path / "checkpoints"
    old = CharTokenizer(CHARS, chat=False)
    make_base(ck, "old", old, tie=tie)
    write_jsonl(tmp_path / "chat.jsonl", conversations(20))
    r = finetune(tmp_path, "--from", "old", "--model_name", "new", "--input_file", "chat.jsonl", "--max_iters", "1",
                 "--learning_rate", "1e-9", "--eval_iters", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    grown = old.n_vocab + 4
    layers = "embedding" if tie else "embedding and the output layer"
    added = 4 * TINY_ARCH["n_embd"] * (1 if tie else 2)
    assert f"the {layers} grow from {old.n_vocab} to {grown} rows (+{added:,} parameters" in r.stdout
    base, new = load_checkpoint(ck / "old"), load_checkpoint(ck / "new")
    assert new.config["vocab_size"] == grown
    for name in ["transformer.wte.weight"] + ([] if tie else ["lm_head.weight"]):
        rows, before = new.model_state[name], base.model_state[name]
        assert torch.allclose(rows[:old.n_vocab], before, atol=1e-6)
        mean, spread = before.mean(dim=0), before.std()
        assert ((rows[old.n_vocab:] - mean).abs().max() < 0.5 * spread) and not torch.equal(rows[-1], rows[-2])
    tok = json.loads((ck / "new" / "tokenizer.json").read_text())
    assert tok["special_tokens"]["<|end|>"] == old.n_vocab + 3
    assert base.tokenizer["special_tokens"] == {"<|endoftext|>": old.eot_id}  # the base is not changed


@pytest.mark.slow
def test_finetune_from_a_transformers_folder(tmp_path):
    """BASE may be a folder mypt import reads: GPT-2's 50257 ids grow to 50304 rows (padded to 64)."""
    transformers = require("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    write_jsonl(tmp_path / "chat.jsonl", conversations(10))
    before = snapshot(tmp_path / "hf")
    r = finetune(tmp_path, "--from", str(tmp_path / "hf"), "--model_name", "g", "--input_file", "chat.jsonl",
                 "--max_iters", "1", "--batch_size", "2", "--eval_iters", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "grow from 50257 to 50304 rows" in r.stdout and snapshot(tmp_path / "hf") == before
    state = json.loads((tmp_path / "checkpoints" / "g" / "training_state.json").read_text())
    sha = hashlib.sha256((tmp_path / "hf" / "model.safetensors").read_bytes()).hexdigest()
    assert state["finetune"]["base_sha256"] == sha and state["finetune"]["imported"] == "GPT-2"


# ---------------------------------------------------------------------------------------------
# The template in transformers


MULTI_TURN = [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": LINES[0]},
              {"role": "assistant", "content": LINES[1]}, {"role": "user", "content": "  And then?\n"},
              {"role": "assistant", "content": LINES[2]}, {"role": "user", "content": LINES[3]}]


@pytest.mark.parametrize("kind", ["gpt2", "bpe", "char"])
def test_exported_chat_template_gives_mypts_ids_in_transformers(tmp_path, kind):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = require("transformers")
    text = corpus_text(100_000)
    tok = {"gpt2": GPT2Tokenizer, "bpe": lambda: train_bpe([text], 400, "t"),
           "char": lambda: CharTokenizer(sorted(set(text) | set("<|>")))}[kind]()
    tok.chat_format = template.TEMPLATE
    make_base(tmp_path / "ck", "m", tok)
    assert run_command("export", ["--model_name", "m", "--checkpoints_dir", str(tmp_path / "ck"),
                                  "--out", str(tmp_path / "hf")]) == 0
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for upto in (2, 4, 6):
        messages = MULTI_TURN[:upto]
        ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        assert ids == template.prompt_ids(tok, [Message(m["role"], m["content"]) for m in messages]), upto
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.eot_id, tok.chat_ids["<|end|>"]]
    assert run_command("import", ["--hf_dir", str(tmp_path / "hf"), "--model_name", "back",
                                  "--checkpoints_dir", str(tmp_path / "ck")]) == 0
    assert json.loads((tmp_path / "ck" / "back" / "tokenizer.json").read_text()) == tok.to_json()
    assert isinstance(tok, (BPETokenizer, CharTokenizer, GPT2Tokenizer))


# ---------------------------------------------------------------------------------------------
# Chat: the server and the terminal


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A fine-tune that answers every message with "Ay." (learned in a few dozen steps)."""
    root = tmp_path_factory.mktemp("chat")
    make_base(root / "checkpoints", "base", block_size=64)
    records = [{"prompt": LINES[i], "completion": "Ay."} for i in range(60)]
    write_jsonl(root / "ay.jsonl", records)
    r = finetune(root, "--from", "base", "--model_name", "ay", "--input_file", "ay.jsonl", "--max_iters", "60",
                 "--learning_rate", "1e-2", "--eval_iters", "1", "--eval_interval", "60")
    assert r.returncode == 0, r.stdout + r.stderr
    return root / "checkpoints"


@pytest.mark.slow
def test_chat_completions_use_the_template_and_stop_at_end_of_turn(chat_model):
    from serving import running_server

    openai = require("openai")
    from mypt.api import load_model

    lm = load_model("ay", chat_model, device="cpu", dtype="fp32")
    messages = [{"role": "system", "content": "Answer."}, {"role": "user", "content": LINES[100]}]
    expected = lm.chat(messages, temperature=0, max_new_tokens=20).text()
    assert expected == "Ay."
    with running_server(chat_model, ["ay"]) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        reply = client.chat.completions.create(model="ay", messages=messages, temperature=0, max_tokens=20)
        assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
        assert reply.usage.prompt_tokens == len(template.prompt_ids(
            lm.tokenizer, [Message(m["role"], m["content"]) for m in messages]))
        streamed = client.chat.completions.create(model="ay", messages=messages, temperature=0, max_tokens=20,
                                                  stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected
        with pytest.raises(openai.BadRequestError, match="messages"):
            client.chat.completions.create(model="ay", messages=[{"role": "user", "content": "€"}], max_tokens=2)


@pytest.mark.slow
def test_mypt_chat_reads_lines_and_keeps_the_conversation(chat_model):
    lines = [LINES[200], "", LINES[201]]
    r = subprocess.run([sys.executable, "-m", "mypt", "chat", "--model_name", "ay", "--checkpoints_dir",
                        str(chat_model), "--temperature", "0", "--max_new_tokens", "20", "--device", "cpu"],
                       input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120,
                       env={**os.environ, **ONE_THREAD}, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Ay.\nAy.\n"
    from mypt.api import load_model

    lm = load_model("ay", chat_model, device="cpu")
    history = [{"role": "user", "content": LINES[200]}, {"role": "assistant", "content": "Ay."},
               {"role": "user", "content": LINES[201]}]
    assert lm.chat(history, temperature=0, max_new_tokens=20).text() == "Ay."
    base = subprocess.run([sys.executable, "-m", "mypt", "chat", "--model_name", "base", "--checkpoints_dir",
                           str(chat_model)], input="hi\n", capture_output=True, text=True, timeout=120,
                          env={**os.environ, **ONE_THREAD}, cwd=REPO)
    assert base.returncode == 2 and "has no chat template" in base.stderr and "Traceback" not in base.stderr


@pytest.mark.slow
def test_readme_chat_walkthrough_runs_as_written(tmp_path, capsys):
    """The README's fine-tuning commands (iterations and data shrunk) and its openai client code."""
    import re

    from serving import running_server
    from test_readme import readme_blocks, to_argv
    from test_readme import run as run_line

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = next(b for b in readme_blocks() if "mypt finetune --from shake" in b)
    pretrain, data, tune, chat = (to_argv(line) for line in block.strip().splitlines())
    run_line([*pretrain, "--max_iters", "3", "--eval_interval", "3", "--eval_iters", "1"], tmp_path)
    run_line([*data, "--n_train", "60", "--n_heldout", "10"], tmp_path)
    at = tune.index("--epochs")  # the README's length, shortened
    tune = tune[:at] + tune[at + 2:]
    out = run_line([*tune, "--max_iters", "2", "--eval_interval", "1", "--eval_iters", "1"], tmp_path).stdout
    assert "fine-tuning 'shake' into 'shake-chat'" in out and "60 conversations" in out
    r = subprocess.run(chat, input="ROMEO:\\nBut soft!\\n\\nWho speaks next?\n", capture_output=True, text=True,
                       cwd=tmp_path, timeout=300, env={**os.environ, **ONE_THREAD})
    assert r.returncode == 0 and r.stdout.endswith("\n") and "Traceback" not in r.stderr, r.stderr
    assert any(b.strip() == "mypt serve --model_name shake-chat" for b in readme_blocks())
    python = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if '"shake-chat"' in b)
    with running_server(tmp_path / "checkpoints", ["shake-chat"]) as url:
        exec(compile(python.replace("http://127.0.0.1:8000", url), "README.md", "exec"), {})
    assert capsys.readouterr().out.endswith("\n")
