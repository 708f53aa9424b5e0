"""A catalogue of bad input: each gets one clear message, exit status 2, and changes nothing.

Every case runs train.py or generate.py in a copy of a working folder that holds an input text
and a trained model `good`, and checks: status 2, no traceback, exactly one `error:` line that
says what is wrong, and every file and folder under the working folder byte-for-byte as before
(so no checkpoint, lock, token cache or stray folder was written, and `good` is untouched).
The security cases plant a pickle that would create a file if it ever ran.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARCH, corpus_text, fix_manifest, tiny_arch_flags
from forked_cli import run

from mypt import dist
from mypt.errors import MyPTError
from mypt.tokenizers import train_bpe

GOOD = Path("checkpoints/good")
MARKER = "pwned"  # what the planted pickle would create in the working folder
TEXT_CHARS = 30_000


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder with input.txt and a model `good` trained on it for 8 iterations."""
    work = tmp_path_factory.mktemp("base")
    text = corpus_text(TEXT_CHARS)
    (work / "input.txt").write_text(text, encoding="utf-8")
    r = run("--model_name", "good", "--input_file", "input.txt", "--tokenizer", "char", *tiny_arch_flags(),
            "--max_iters", "8", "--eval_interval", "8", "--eval_iters", "2", "--device", "cpu", cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr
    return work


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder or FIFO (None) under root, hidden ones included."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


# ----------------------------------------------------------------------------- ways to spoil a folder


def write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def prepare(work: Path) -> None:
        data = content.encode("utf-8") if isinstance(content, str) else content
        (work / name).write_bytes(data)
    return prepare


def preset(**changes: object) -> Callable[[Path], None]:
    """cfg.json: the tiny test preset with some fields changed (None removes a field)."""
    fields = {"vocab_size": 50304, **TINY_ARCH, **changes}
    return write("cfg.json", json.dumps({k: v for k, v in fields.items() if v is not None}))


def edit_json(name: str, change: Callable[[dict], None], manifest: bool = True) -> Callable[[Path], None]:
    def prepare(work: Path) -> None:
        path = work / GOOD / name
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
        if manifest and name != "training_state.json":
            fix_manifest(work / GOOD, name)
    return prepare


class _Evil:
    """Unpickling this runs `touch pwned`, unless the loader refuses arbitrary globals."""

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {MARKER}",))


def plant_pickle(name: str) -> Callable[[Path], None]:
    def prepare(work: Path) -> None:
        payload = {"transformer.wte.weight": torch.zeros(2), "evil": _Evil()}
        torch.save(payload, work / GOOD / name)
        fix_manifest(work / GOOD, name)  # a careful attacker updates the manifest too
    return prepare


def truncate(name: str, manifest: bool = False) -> Callable[[Path], None]:
    def prepare(work: Path) -> None:
        path = work / GOOD / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        if manifest:
            fix_manifest(work / GOOD, name)
    return prepare


def remove(rel: str) -> Callable[[Path], None]:
    return lambda work: (work / rel).unlink()


def newer_format(work: Path) -> None:
    edit_json("training_state.json", lambda s: s.update(format_version=99))(work)


def edited_bpe_file(name: str) -> Callable[[Path], None]:
    """A bpe tokenizer file with one merge swapped for another: its hash no longer matches."""
    def prepare(work: Path) -> None:
        d = train_bpe([(work / "input.txt").read_text(encoding="utf-8")], 400, "t").to_json()
        d["ranks"][300], d["ranks"][301] = d["ranks"][301], d["ranks"][300]
        (work / name).write_text(json.dumps(d))
    return prepare


def set_field(**changes: object) -> Callable[[dict], None]:
    return lambda d: d.update(changes)


def bpe_file_with_pattern(name: str, pattern: str) -> Callable[[Path], None]:
    """A bpe tokenizer file whose split pattern was replaced and its sha256 recomputed to match."""
    from mypt.tokenizers.bpe import _content_sha256

    def prepare(work: Path) -> None:
        d = train_bpe([(work / "input.txt").read_text(encoding="utf-8")], 300, "t").to_json()
        d["pattern"] = pattern
        d["sha256"] = _content_sha256({k: v for k, v in d.items() if k != "sha256"})
        (work / name).write_text(json.dumps(d))
    return prepare


DEEP = "[" * 100_000 + "]" * 100_000  # nested past json's recursion limit (a RecursionError once)
DIGITS = "9" * 5000  # past Python's int-from-text limit (a ValueError once)


def mixture(*weights: object) -> Callable[[Path], None]:
    sources = [{"name": f"s{i}", "input_file": "input.txt", "weight": w} for i, w in enumerate(weights)]
    return write("mix.json", json.dumps({"sources": sources}))


# ----------------------------------------------------------------------------- the catalogue


@dataclass
class Case:
    args: list[str]
    expect: str  # a fragment of the error message
    prepare: Callable[[Path], None] | None = None
    script: str = "train.py"


NEW_NO_INPUT = ["--model_name", "new", "--tokenizer", "char", "--max_iters", "4", "--eval_iters", "2",
                "--device", "cpu", *tiny_arch_flags()]  # --input_file is repeatable: each case names its own
NEW = ["--model_name", "new", "--input_file", "input.txt", "--tokenizer", "char", "--max_iters", "4",
       "--eval_iters", "2", "--device", "cpu"]
NEW_TINY = [*NEW, *tiny_arch_flags()]
BPE = [*NEW_TINY, "--tokenizer", "bpe"]
PRESET = [*NEW, "--config_file", "cfg.json"]
RESUME = ["--model_name", "good", "--max_iters", "12", "--device", "cpu"]
GENERATE = ["--model_name", "good", "--max_new_tokens", "4", "--seed", "1", "--device", "cpu"]
NAME_RULE = "use 1-100 characters"

CASES: dict[str, Case] = {
    # config files and presets
    "preset-unknown": Case([*NEW, "--config_file", "nosuch"], "--config_file nosuch: no such file. Presets:"),
    "preset-is-a-directory": Case(PRESET, "cfg.json: is a directory", lambda w: (w / "cfg.json").mkdir()),
    "preset-malformed-json": Case(PRESET, "cfg.json: malformed JSON at line 1", write("cfg.json", '{"n_layer": 2,')),
    "preset-not-an-object": Case(PRESET, "expected a JSON object of config fields, got list", write("cfg.json", "[2]")),
    "preset-not-utf8": Case(PRESET, "cannot be read as a UTF-8 JSON config",
                            write("cfg.json", b'{"name": "caf\xe9"}')),
    "preset-missing-field": Case(PRESET, "missing required field 'n_head'", preset(n_head=None)),
    "preset-unknown-field": Case(PRESET, "unknown field 'n_layers' (did you mean 'n_layer'?)", preset(n_layers=2)),
    "preset-wrong-type": Case(PRESET, 'n_layer ("2") must be an integer', preset(n_layer="2")),
    "preset-zero": Case(PRESET, "block_size (0) must be a positive integer", preset(block_size=0)),
    "preset-dropout-range": Case(PRESET, "dropout (1.5) must be at least 0 and below 1", preset(dropout=1.5)),
    "preset-bias-not-bool": Case(PRESET, 'bias ("yes") must be true or false', preset(bias="yes")),
    "preset-heads-do-not-divide": Case(PRESET, "n_embd (32) must be divisible by n_head (3)", preset(n_head=3)),
    "preset-vocab-too-small-for-gpt2": Case([*PRESET, "--tokenizer", "gpt2"],
                                            "vocab_size (100) is smaller than the gpt2 tokenizer's",
                                            preset(vocab_size=100)),
    # input text
    "input-missing": Case([*NEW_NO_INPUT, "--input_file", "nosuch.txt"], "input file nosuch.txt does not exist"),
    "input-empty": Case([*NEW_NO_INPUT, "--input_file", "e.txt"], "input file e.txt is empty", write("e.txt", "")),
    "input-empty-folder": Case([*NEW_NO_INPUT, "--input_file", "d"], "input folder d has no files ending in .txt",
                               lambda w: (w / "d").mkdir()),
    "input-binary": Case([*NEW_NO_INPUT, "--input_file", "b.bin"], "looks binary (it contains NUL bytes",
                         write("b.bin", b"\x7fELF\x02\x01\x00\x00" * 100)),
    "input-not-utf8": Case([*NEW_NO_INPUT, "--input_file", "l.txt"],
                           "is not valid UTF-8 (first bad byte at byte offset 5",
                           write("l.txt", b"caf\xc3\xa9\xe9 latin-1\n" * 50)),
    "input-too-short": Case([*NEW_NO_INPUT, "--input_file", "s.txt"],
                            "s.txt is too short: it has 13 tokens",  # 12 characters and the end-of-text
                            write("s.txt", "hello world\n")),
    # tokenizers: a new bpe, a tokenizer file
    "bpe-vocab-too-small": Case([*BPE, "--vocab_size", "256"], "--vocab_size 256 is out of range for a bpe "
                                "tokenizer: it needs at least 261"),
    "bpe-vocab-too-large-for-text": Case([*BPE, "--vocab_size", "60000"], "the training part of input.txt (--val_split "
                                         "0.1 left out) is too short for a bpe tokenizer of 60000"),
    "bpe-training-split-too-short": Case([*BPE, "--input_file", "s.txt", "--vocab_size", "300"],
                                         "is too short for a bpe tokenizer of 300 tokens", write("s.txt", "hi yo\n")),
    "vocab-size-without-bpe": Case([*NEW_TINY, "--vocab_size", "4096"],
                                   "--vocab_size 4096 sets the size of a new bpe tokenizer: use it with --tokenizer"),
    "tokenizer-file-missing": Case([*NEW_TINY, "--tokenizer", "nosuch.json"],
                                   "--tokenizer nosuch.json: no such file; pass one of gpt2, char, bpe"),
    "tokenizer-file-not-json": Case([*NEW_TINY, "--tokenizer", "t.json"], "t.json: malformed JSON",
                                    write("t.json", "ROMEO: not a tokenizer\n")),
    "tokenizer-file-not-a-tokenizer": Case([*NEW_TINY, "--tokenizer", "t.json"], "t.json: not a MyPT tokenizer file",
                                           write("t.json", '{"model": {"type": "BPE"}}')),
    "tokenizer-file-edited": Case([*NEW_TINY, "--tokenizer", "t.json"], "t.json: its content does not match its "
                                  "sha256; the file is damaged or was edited", edited_bpe_file("t.json")),
    "tokenizer-file-is-a-folder": Case([*NEW_TINY, "--tokenizer", "d"], "d: is a directory, not a file",
                                       lambda w: (w / "d").mkdir()),
    # model names that would leave the checkpoints folder or are not plain names
    "name-parent": Case([*NEW_TINY, "--model_name", "../x"], "it contains a path separator"),
    "name-absolute": Case([*NEW_TINY, "--model_name", "/tmp/x"], "it contains a path separator"),
    "name-nested": Case([*NEW_TINY, "--model_name", "a/b"], "it contains a path separator"),
    "name-backslash": Case([*NEW_TINY, "--model_name", "a\\b"], "it contains a path separator"),
    "name-empty": Case([*NEW_TINY, "--model_name", ""], "it is empty"),
    "name-dotdot": Case([*NEW_TINY, "--model_name", ".."], "it starts with '.'"),
    "name-too-long": Case([*NEW_TINY, "--model_name", "m" * 101], "it is 101 characters long (the limit is 100)"),
    "name-control-char": Case([*NEW_TINY, "--model_name", "a\x1b[2Jb"], "it contains control characters"),
    "name-newline": Case([*NEW_TINY, "--model_name", "a\nb"], "it contains control characters"),
    "name-space": Case([*NEW_TINY, "--model_name", "my model"], "it contains the character(s) ' '"),
    "checkpoints-dir-is-a-file": Case([*NEW_TINY, "--checkpoints_dir", "input.txt"],
                                      "--checkpoints_dir input.txt: input.txt is not a folder"),
    "name-is-a-file": Case([*NEW_TINY, "--model_name", "f"], "checkpoints/f is not a folder",
                           write("checkpoints/f", "not a model\n")),
    # training flags
    "max-iters-zero": Case([*NEW_TINY, "--max_iters", "0"], "--max_iters (0) must be a positive integer"),
    "max-iters-negative": Case([*NEW_TINY, "--max_iters", "-5"], "--max_iters (-5) must be a positive integer"),
    "max-iters-not-int": Case([*NEW_TINY, "--max_iters", "2.5"], "argument --max_iters: invalid int value: '2.5'"),
    "batch-size-zero": Case([*NEW_TINY, "--batch_size", "0"], "batch_size (0) must be a positive integer"),
    "batch-size-negative": Case([*NEW_TINY, "--batch_size", "-4"], "batch_size (-4) must be a positive integer"),
    "eval-iters-zero": Case([*NEW_TINY, "--eval_iters", "0"], "--eval_iters (0) must be a positive integer"),
    "eval-iters-negative": Case([*NEW_TINY, "--eval_iters", "-1"], "--eval_iters (-1) must be a positive integer"),
    "lr-not-a-number": Case([*NEW_TINY, "--learning_rate", "fast"],
                            "argument --learning_rate: invalid float value: 'fast'"),
    "lr-negative": Case([*NEW_TINY, "--learning_rate", "-0.001"], "--learning_rate (-0.001) must be"),
    "lr-nan": Case([*NEW_TINY, "--learning_rate", "nan"], "--learning_rate (nan) must be"),
    "warmup-negative": Case([*NEW_TINY, "--warmup_iters", "-1"], "--warmup_iters (-1) must be 0 or more"),
    "val-split-too-big": Case([*NEW_TINY, "--val_split", "0.9"], "--val_split (0.9) must be above 0 and at most 0.5"),
    "grad-accum-zero": Case([*NEW_TINY, "--grad_accum_steps", "0"], "--grad_accum_steps (0) must be a positive"),
    "arch-heads-do-not-divide": Case([*NEW_TINY, "--n_head", "3"], "n_embd (32) must be divisible by n_head (3)"),
    "arch-dropout-one": Case([*NEW_TINY, "--dropout", "1"], "dropout (1.0) must be at least 0 and below 1"),
    # CPU has no fp16 autocast; this CPU does have bf16, so --dtype bf16 on CPU is tested where it lacks it
    "dtype-fp16-on-cpu": Case([*NEW_TINY, "--dtype", "fp16"], "--dtype fp16 needs a CUDA GPU"),
    "device-unknown": Case([*NEW_TINY, "--device", "tpu9"], "--device tpu9: unknown device"),
    # resuming a checkpoint folder that is broken, tampered with or from elsewhere
    "resume-newer-format": Case(RESUME, "was made by a newer MyPT (checkpoint format 99", newer_format),
    "resume-pickle-in-model": Case(RESUME, "model.pt holds objects other than tensors", plant_pickle("model.pt")),
    "resume-pickle-in-optimizer": Case(RESUME, "optimizer.pt holds objects other than tensors",
                                       plant_pickle("optimizer.pt")),
    "resume-truncated-optimizer": Case(RESUME, "optimizer.pt does not match its manifest (truncated",
                                       truncate("optimizer.pt")),
    "resume-config-edited": Case(RESUME, "config.json does not match its manifest",
                                 edit_json("config.json", set_field(n_layer=3), manifest=False)),
    "resume-input-changed": Case(RESUME, "its content differs from the text 'good' was trained on",
                                 write("input.txt", "a different text\n" * 3000)),
    "resume-input-gone": Case(RESUME, "which no longer exists; pass --input_file", remove("input.txt")),
    # generate.py with a missing, damaged or mismatched model folder
    "generate-unknown-model": Case([*GENERATE, "--model_name", "nosuch"], "no model named 'nosuch' in checkpoints/",
                                   script="generate.py"),
    "generate-name-escapes": Case([*GENERATE, "--model_name", "../good"], "it contains a path separator",
                                  script="generate.py"),
    "generate-model-missing": Case(GENERATE, "is incomplete: model.pt missing", remove(f"{GOOD}/model.pt"),
                                   script="generate.py"),
    "generate-model-truncated": Case(GENERATE, "model.pt does not match its manifest (truncated",
                                     truncate("model.pt"), script="generate.py"),
    "generate-model-truncated-manifest-too": Case(GENERATE, "model.pt is truncated or corrupt",
                                                  truncate("model.pt", manifest=True), script="generate.py"),
    "generate-config-does-not-match-weights": Case(GENERATE, "model.pt does not match checkpoints/good/config.json",
                                                   edit_json("config.json", set_field(n_embd=64)),
                                                   script="generate.py"),
    "generate-tokenizer-unknown-kind": Case(GENERATE, "unknown tokenizer kind 'sentencepiece'",
                                            edit_json("tokenizer.json", lambda d: d.update(kind="sentencepiece")),
                                            script="generate.py"),
    "generate-newer-format": Case(GENERATE, "was made by a newer MyPT", newer_format, script="generate.py"),
    "generate-pickle-in-model": Case(GENERATE, "it was refused because loading it could run code",
                                     plant_pickle("model.pt"), script="generate.py"),
    # found by trying the tool as a hostile user would (the review's catalogue)
    "flag-prefix-is-not-a-flag": Case([*NEW_TINY, "--lr", "3"], "unrecognized arguments: --lr 3"),
    "seed-negative": Case([*NEW_TINY, "--seed", "-1"], "--seed (-1) must be an integer from 0 to 4294967295"),
    "seed-23-digits": Case([*NEW_TINY, "--seed", "1" * 23], f"--seed ({'1' * 23}) must be an integer from 0"),
    "preset-training-seed-negative": Case(PRESET, "training.seed (-1) must be an integer from 0",
                                          preset(training={"seed": -1})),
    "min-lr-above-lr": Case([*NEW_TINY, "--learning_rate", "0.001", "--min_lr", "0.01"],
                            "--min_lr (0.01) must not exceed --learning_rate (0.001)"),
    "lr-decay-negative": Case([*NEW_TINY, "--lr_decay_iters", "-5"], "--lr_decay_iters (-5) must be a positive"),
    "lr-decay-zero": Case([*NEW_TINY, "--lr_decay_iters", "0"], "--lr_decay_iters (0) must be a positive"),
    "lr-decay-below-warmup": Case([*NEW_TINY, "--lr_decay_iters", "5", "--warmup_iters", "10"],
                                  "--lr_decay_iters (5) must be a positive number of iterations, at least "
                                  "--warmup_iters (10)"),
    "keep-every-negative": Case([*NEW_TINY, "--keep_every", "-2"], "--keep_every (-2) must be 0 (off)"),
    "preset-duplicate-key": Case(PRESET, "cfg.json: the key 'n_layer' appears twice in one object",
                                 write("cfg.json", '{"n_layer": 2, "n_layer": 4}')),
    "preset-fifo": Case(PRESET, "cfg.json: is a FIFO (named pipe), not a regular file",
                        lambda w: os.mkfifo(w / "cfg.json")),
    "input-fifo": Case([*NEW_TINY, "--input_file", "p.txt"], "input file p.txt: is a FIFO (named pipe)",
                       lambda w: os.mkfifo(w / "p.txt")),
    "memory-batch-too-big": Case([*NEW_TINY, "--batch_size", "1000000"],
                                 "the largest batch_size that fits is"),
    "memory-model-too-big": Case([*NEW_TINY, "--n_layer", "1000", "--n_embd", "8192", "--n_head", "16"],
                                 "no batch size fits: use a smaller config"),
    "resume-val-split-changed": Case([*RESUME, "--val_split", "0.2"], "--val_split 0.2: 'good' was trained with "
                                     "--val_split 0.1; another split would move validation text into training"),
    "resume-state-iteration-not-a-number": Case(RESUME, 'training_state.json: iteration ("ten") must be a whole',
                                                edit_json("training_state.json", set_field(iteration="ten"))),
    "resume-state-unknown-flag": Case(RESUME, "training_state.json: train_config: unknown field 'lr'",
                                      edit_json("training_state.json", lambda d: d["train_config"].update(lr=3))),
    "resume-state-flag-wrong-type": Case(RESUME, 'train_config.max_iters ("many") must be an integer',
                                         edit_json("training_state.json",
                                                   lambda d: d["train_config"].update(max_iters="many"))),
    "generate-prompt-fifo": Case([*GENERATE, "--prompt_file", "p"], "--prompt_file p: is a FIFO (named pipe)",
                                 lambda w: os.mkfifo(w / "p"), script="generate.py"),
    "generate-prompt-dev-zero": Case([*GENERATE, "--prompt_file", "/dev/zero"],
                                     "--prompt_file /dev/zero: is a device or socket", script="generate.py"),
    "generate-no-best-yet": Case([*GENERATE, "--best"], "'good' has no best checkpoint yet",
                                 lambda w: shutil.rmtree(w / GOOD / "best"), script="generate.py"),
}
# numbers: every number a user gives is range-checked before use (a 400-digit integer, 1e309 and
# NaN once passed and then raised OverflowError, hung, or failed inside numpy or the allocator)
GIANT = [*NEW_TINY, "--n_layer", "1000", "--n_embd", "65536", "--n_head", "64", "--skip_memory_check"]
CASES |= {
    "preset-value-10**400": Case(PRESET, "rope_theta (1000000000", preset(rope_theta=10**400)),
    "preset-layers-10**8": Case(PRESET, "n_layer (100000000) must be at most 1,024", preset(n_layer=10**8)),
    "preset-width-1e309": Case(PRESET, "n_embd (Infinity) must be an integer",  # TINY_ARCH's first 32 is n_embd
                               write("cfg.json", json.dumps({**TINY_ARCH, "vocab_size": 9}).replace("32", "1e309", 1))),
    "preset-training-lr-10**400": Case(PRESET, "training.learning_rate (1000000",
                                       preset(training={"learning_rate": 10**400})),
    "lr-overflows-to-inf": Case([*NEW_TINY, "--learning_rate", "1e400"], "--learning_rate (inf) must be a number"),
    "max-iters-10**13": Case([*NEW_TINY, "--max_iters", str(10**13)],
                             "must be a positive integer of at most 1,000,000,000,000"),
    "eval-iters-10**7": Case([*NEW_TINY, "--eval_iters", str(10**7)],
                             "--eval_iters (10000000) must be a positive integer of at most"),
    "mixture-weights-sum-to-infinity": Case([*NEW_NO_INPUT, "--data", "mix.json"],
                                            "'weight' (1e+308) must be a number above 0 and at most 1e+06",
                                            mixture(1e308, 1e308)),
    "mixture-weight-10**400": Case([*NEW_NO_INPUT, "--data", "mix.json"], "'weight' (1000000000", mixture(10**400)),
    "memory-check-skipped-impossible-size": Case(GIANT, "(51,539,744,915,456 parameters: n_layer 1000, n_embd 65536, "
                                                 "vocab_size 63, block_size 32) needs 187.50 TiB for its fp32 weights"),
    "arch-batch-size-2**21": Case([*NEW_TINY, "--batch_size", str(2**21)], "batch_size (2097152) must be at most"),
    "generate-seed-2**64": Case([*GENERATE, "--seed", str(2**64)], "--seed (18446744073709551616) must be an integer "
                                "from 0 to 4294967295", script="generate.py"),
    "generate-seed-negative": Case([*GENERATE, "--seed", "-1"], "--seed (-1) must be an integer from 0",
                                   script="generate.py"),
    "generate-seed-past-the-last-sample": Case([*GENERATE, "--seed", "4294967295", "--num_samples", "2"],
                                               "--seed (4294967295) + --num_samples (2) - 1 must be at most",
                                               script="generate.py"),
    "generate-num-samples-10**6": Case([*GENERATE, "--num_samples", str(10**6)], "--num_samples (1000000) must be at "
                                       "most 10,000", script="generate.py"),
}
# JSON nested 100,000 deep, a 5000-digit number or a repeated key: one message naming the file (and line)
JSONL = [*NEW_NO_INPUT, "--input_file", "d.jsonl"]
CASES |= {
    "preset-nested-100000": Case(PRESET, "cfg.json: lists and objects are nested more than 100 deep",
                                 write("cfg.json", '{"n_layer": ' + DEEP + "}")),
    "preset-digits-5000": Case(PRESET, "cfg.json: holds a number MyPT cannot read",
                               write("cfg.json", '{"n_layer": ' + DIGITS + "}")),
    "input-jsonl-nested-100000": Case(JSONL, "d.jsonl line 2: lists and objects are nested more than 100 deep",
                                      write("d.jsonl", '{"text": "a"}\n{"x": ' + DEEP + "}\n")),
    "input-jsonl-digits-5000": Case(JSONL, "d.jsonl line 1: holds a number",
                                    write("d.jsonl", '{"text": "a", "n": ' + DIGITS + "}\n")),
    "input-jsonl-repeated-key": Case(JSONL, "d.jsonl line 2: the key 'text' appears twice",
                                     write("d.jsonl", '{"text": "a"}\n{"text": "b", "text": "c"}\n')),
    "mixture-nested-100000": Case([*NEW_NO_INPUT, "--data", "mix.json"], "mix.json: lists and objects are nested",
                                  write("mix.json", '{"sources": ' + DEEP + "}")),
    "tokenizer-file-nested-100000": Case([*NEW_TINY, "--tokenizer", "t.json"], "t.json: lists and objects are nested",
                                         write("t.json", '{"kind": "bpe", "ranks": ' + DEEP + "}")),
}
# devices MyPT does not run on, refused by name (meta and xpu once gave tracebacks)
for device in ("meta", "xpu", "cuda:99", "junk!"):
    CASES[f"device-{device}"] = Case([*NEW_TINY, "--device", device], f"--device {device}: ")
    CASES[f"generate-device-{device}"] = Case([*GENERATE, "--device", device], f"--device {device}: ",
                                              script="generate.py")
CASES |= {
    "checkpoints-dir-empty": Case([*NEW_TINY, "--checkpoints_dir", ""], "argument --checkpoints_dir: an empty path "
                                  "would mean the current folder"),
    "generate-checkpoints-dir-empty": Case([*GENERATE, "--checkpoints_dir", ""], "argument --checkpoints_dir: an empty "
                                           "path", script="generate.py"),
    "tokenizer-file-pattern-matches-empty": Case([*NEW_TINY, "--tokenizer", "t.json"], "t.json: its split pattern "
                                                 "matches the empty string", bpe_file_with_pattern("t.json", r"\s*")),
    "tokenizer-file-pattern-drops-text": Case([*NEW_TINY, "--tokenizer", "t.json"], "t.json: its split pattern leaves "
                                              "characters", bpe_file_with_pattern("t.json", r"\p{L}+")),
}
if not dist.cpu_has_fast_bf16():
    CASES["dtype-bf16-without-bf16"] = Case([*NEW_TINY, "--dtype", "bf16"], "--dtype bf16: cpu on this machine has no")


def test_catalogue_is_big_enough() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input(case: Case, base: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(base, work, symlinks=True)
    state = work / GOOD / "training_state.json"  # as if `good` was trained here (input paths are absolute)
    state.write_text(state.read_text().replace(str(base), str(work)))
    if case.prepare is not None:
        case.prepare(work)
    before = tree(work)

    r = run(*case.args, cwd=work, script=case.script)

    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, r.stderr
    assert case.expect in r.stderr, r.stderr
    assert not (work / MARKER).exists(), "the planted pickle ran"
    after = tree(work)
    assert after.keys() == before.keys(), f"written: {sorted(after.keys() - before.keys())}"
    assert after == before, [k for k in before if before[k] != after[k]]


# ----------------------------------------------------------------------------- every JSON reader, one reader


def _jsonl_documents(path: Path) -> list:
    from mypt.data.sources import items, list_files

    return list(items(list_files([str(path)])[0], hashlib.sha256(), "text"))


def _import(path: Path) -> object:
    from mypt.formats.hf import import_hf

    return import_hf(path.parent, path.parent.parent / "ck" / "x")


def _chat_template(path: Path) -> object:
    from mypt.serve.chat import load_template

    return load_template(path.parent)


def _mixture(path: Path) -> object:
    from mypt.data import read_mixture

    return read_mixture(path)


def _config(path: Path) -> object:
    from mypt.config import load_model_config

    return load_model_config(path)


def _tokenizer(path: Path) -> object:
    from mypt.tokenizers import load_tokenizer

    return load_tokenizer(path)


# reader: (file name, its text around the nested value, how MyPT reads it)
READERS: dict[str, tuple[str, str, Callable[[Path], object]]] = {
    "config": ("cfg.json", '{"n_layer": %s}', _config),
    "tokenizer file": ("tok.json", '{"kind": "char", "chars": %s}', _tokenizer),
    "mixture file": ("mix.json", '{"sources": %s}', _mixture),
    "JSON lines": ("d.jsonl", '{"text": "a"}\n{"text": %s}\n', _jsonl_documents),
    "transformers config.json": ("hf/config.json", '{"model_type": %s}', _import),
    "chat_template.json": ("m/chat_template.json", '{"stop": %s}', _chat_template),
}


@pytest.mark.parametrize("reader", READERS)
def test_every_json_reader_refuses_100000_deep_nesting_by_name(tmp_path: Path, reader: str) -> None:
    name, template, read = READERS[reader]
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(template % DEEP)
    with pytest.raises(MyPTError, match="lists and objects are nested more than 100 deep") as info:
        read(path)
    assert str(path) in str(info.value) or path.name in str(info.value)
    if reader == "JSON lines":
        assert "d.jsonl line 2:" in str(info.value)


@pytest.mark.parametrize("reader", READERS)
def test_every_json_reader_refuses_a_repeated_key_and_a_5000_digit_number(tmp_path: Path, reader: str) -> None:
    name, template, read = READERS[reader]
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    repeated = '"a", "text": "b"' if reader == "JSON lines" else '{"a": 1, "a": 2}'  # JSON lines: the field read
    for value, message in ((DIGITS, "holds a number MyPT cannot read"),
                           (repeated, "the key '(a|text)' appears twice in one object")):
        path.write_text(template % value)
        with pytest.raises(MyPTError, match=message):
            read(path)


# ----------------------------------------------------------------------------- files whose size reads 0


def test_a_procfs_file_is_read_by_reading_not_by_its_size(tmp_path: Path) -> None:
    """/proc files report size 0 and have content: neither "empty" nor read past a tail limit."""
    from mypt.cli import run_command
    from mypt.cli.options import read_text_file

    assert os.stat("/proc/self/status").st_size == 0
    text, size = read_text_file("/proc/self/status", "--prompt_file", 1 << 20)
    assert text.startswith("Name:") and size == len(text.encode("utf-8"))
    whole, _ = read_text_file("/proc/self/comm", "--prompt_file", 1 << 20)  # this process's name: stable
    tail, size = read_text_file("/proc/self/comm", "--prompt_file", 3)
    assert tail == whole[-3:] and size == len(whole) > 3
    code = run_command("prepare", ["--input_file", "/proc/self/status", "--tokenizer", "char",
                                   "--checkpoints_dir", str(tmp_path / "ck")])
    assert code == 0  # once: "input file /proc/self/status is empty"
    assert any((tmp_path / "ck" / ".cache").iterdir())


def test_an_allocation_that_fails_is_one_message_naming_the_sizes() -> None:
    """What the allocator refuses (here: 1 EiB on the CPU) becomes a MyPTError naming the config's sizes."""
    from mypt.build import allocating
    from mypt.config import ModelConfig

    cfg = ModelConfig(**TINY_ARCH, vocab_size=64)
    with pytest.raises(MyPTError, match=r"the model \([\d,]+ parameters: n_layer 2, n_embd 32, vocab_size 64, "
                                        r"block_size 32\) could not be allocated on cpu \(.*alloc"):
        with allocating(cfg, "cpu"):
            torch.empty(1 << 60, dtype=torch.uint8)


def test_metrics_lines_past_reading_are_skipped_like_a_line_cut_by_a_crash(tmp_path: Path) -> None:
    from mypt.metrics import METRICS_FILE, read_metrics

    good = {"iter": 5, "train_loss": 1.0}
    (tmp_path / METRICS_FILE).write_text(f'{json.dumps(good)}\n{{"iter": {DEEP}}}\n{{"iter": {DIGITS}}}\n[1]\n{{"it')
    assert read_metrics(tmp_path) == [good]
