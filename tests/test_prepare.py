"""`mypt prepare` and training on prepared data, as real processes: SIGKILL at several points and
resume to byte-identical shards, a full disk, exit status 2 for bad input, a mixture that resumes
bit for bit, a resume from another working folder, and ranks that see different data."""

from __future__ import annotations

import gzip
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import corpus_text, require, tiny_arch_flags
from forked_cli import Run, run

from mypt import data, dist
from mypt.errors import MyPTError

pa = require("pyarrow", "data")
pq = require("pyarrow.parquet", "data")

TEXT = corpus_text(200_000)


def make_corpus(root: Path) -> Path:
    """A folder of every kind: a text file, JSON lines (plain and gzip) and a Parquet file."""
    folder = root / "corpus"
    folder.mkdir(parents=True)
    paras = [p for p in TEXT.split("\n\n") if p.strip()]
    (folder / "book.txt").write_text(TEXT[:80_000], encoding="utf-8")
    with open(folder / "web.jsonl", "w", encoding="utf-8") as f:
        for p in paras[: len(paras) // 3]:
            f.write(json.dumps({"text": p}) + "\n")
    with gzip.open(folder / "more.jsonl.gz", "wt", encoding="utf-8") as f:
        for p in paras[len(paras) // 3: 2 * len(paras) // 3]:
            f.write(json.dumps({"text": p}) + "\n")
    pq.write_table(pa.table({"text": paras[2 * len(paras) // 3:]}), folder / "pages.parquet", row_group_size=50)
    return folder


def dataset_folder(ckpts: Path) -> Path | None:
    found = [p for p in (ckpts / ".cache").glob("*") if p.is_dir()] if (ckpts / ".cache").exists() else []
    return found[0] if found else None


def prepared_bytes(ckpts: Path) -> dict[str, bytes]:
    folder = dataset_folder(ckpts)
    assert folder is not None
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "lock"}


def records(folder: Path | None) -> int:
    if folder is None:
        return 0
    try:
        return sum(1 for n in os.listdir(folder) if n[0].isdigit() and n.endswith(".json"))
    except FileNotFoundError:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer, shard_tokens", [("gpt2", 1200), ("char", 4000)])
def test_prepare_killed_at_several_points_resumes_to_the_same_bytes(tmp_path, tokenizer, shard_tokens):
    corpus = make_corpus(tmp_path)
    args = ["--input_file", str(corpus), "--tokenizer", tokenizer, "--shard_tokens", str(shard_tokens)]
    whole = run(*args, "--checkpoints_dir", "whole", cwd=tmp_path, script="prepare.py")
    assert whole.returncode == 0, whole.stderr
    reference = prepared_bytes(tmp_path / "whole")
    n_shards = sum(name.endswith(".bin") for name in reference)
    assert n_shards >= 30
    killed_at = []
    for target in (1, n_shards // 4, n_shards // 2, 3 * n_shards // 4):
        r = Run(*args, "--checkpoints_dir", "killed", cwd=tmp_path, script="prepare.py")
        deadline = time.monotonic() + 60
        while records(dataset_folder(tmp_path / "killed")) < target and r.poll() is None:
            assert time.monotonic() < deadline
        r.send_signal(signal.SIGKILL)
        assert r.wait() == -signal.SIGKILL, "the prepare finished before it could be killed"
        folder = dataset_folder(tmp_path / "killed")
        assert not (folder / "manifest.json").exists()  # nothing looks complete
        killed_at.append(records(folder))
    assert killed_at == sorted(killed_at) and killed_at[-1] < n_shards  # each run went on from the last
    final = run(*args, "--checkpoints_dir", "killed", cwd=tmp_path, script="prepare.py")
    assert final.returncode == 0, final.stderr
    assert prepared_bytes(tmp_path / "killed") == reference


@pytest.mark.slow
def test_a_full_disk_while_preparing_is_one_clear_error_and_a_rerun_finishes(tmp_path):
    corpus = make_corpus(tmp_path)
    args = ["--input_file", str(corpus), "--shard_tokens", "20000"]
    full = run(*args, cwd=tmp_path, script="prepare.py", fsize_limit=16_000)  # a shard is 40,000 bytes
    assert full.returncode == 2 and "Traceback" not in full.stderr
    [line] = [x for x in full.stderr.splitlines() if "error:" in x]
    assert "could not write the prepared data" in line and "00000.bin" in line
    assert "raise the file size limit (ulimit -f) or write to another disk" in line
    folder = dataset_folder(tmp_path / "checkpoints")
    names = set(os.listdir(folder))
    assert "manifest.json" not in names and "00000.bin" not in names  # only whole shards get their names
    again = run(*args, cwd=tmp_path, script="prepare.py")
    assert again.returncode == 0, again.stderr
    whole = run(*args, "--checkpoints_dir", "whole", cwd=tmp_path, script="prepare.py")
    assert whole.returncode == 0 and prepared_bytes(tmp_path / "checkpoints") == prepared_bytes(tmp_path / "whole")


@pytest.mark.slow
def test_a_full_disk_while_train_py_tokenizes_is_one_clear_error(tmp_path):
    (tmp_path / "input.txt").write_text(TEXT, encoding="utf-8")
    r = run("--model_name", "m", "--input_file", "input.txt", *tiny_arch_flags(), "--max_iters", "2",
            "--device", "cpu", cwd=tmp_path, fsize_limit=50_000)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "could not write the prepared data" in r.stderr and "ulimit -f" in r.stderr
    assert not (tmp_path / "checkpoints" / "m").exists()


def test_prepare_cli_bad_input_exits_2_naming_the_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    r = run("--input_file", "d.jsonl", cwd=tmp_path, script="prepare.py")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().endswith("d.jsonl line 2 has no field 'text' (its fields: 'txt'); pass --text_field "
                                     "NAME to read another field")
    assert not (tmp_path / "checkpoints").exists()
    r = run(cwd=tmp_path, script="prepare.py")
    assert r.returncode == 2 and "name the data to prepare with --input_file" in r.stderr


def test_prepare_then_train_reuses_the_shards(tmp_path):
    corpus = make_corpus(tmp_path)
    r = run("--input_file", str(corpus), cwd=tmp_path, script="prepare.py")
    assert r.returncode == 0, r.stderr
    assert "input: 4 file(s)" in r.stdout
    before = prepared_bytes(tmp_path / "checkpoints")
    t = run("--model_name", "m", "--input_file", str(corpus), *tiny_arch_flags(), "--max_iters", "2",
            "--eval_interval", "2", "--eval_iters", "1", "--device", "cpu", cwd=tmp_path)
    assert t.returncode == 0, t.stderr
    assert "preparing" not in t.stderr and "validation:" in t.stdout and "whole documents" in t.stdout
    assert prepared_bytes(tmp_path / "checkpoints") == before


def test_prepare_with_a_tokenizer_file_makes_the_shards_train_py_uses(tmp_path):
    from mypt.cli import run_command

    (tmp_path / "input.txt").write_text(TEXT[:60_000], encoding="utf-8")
    tok_file = tmp_path / "tok.json"
    assert run_command("tokenizer", ["train", "--input_file", str(tmp_path / "input.txt"), "--vocab_size", "300",
                                     "--val_split", "0.1", "--out", str(tok_file)]) == 0
    r = run("--input_file", "input.txt", "--tokenizer", "tok.json", cwd=tmp_path, script="prepare.py")
    assert r.returncode == 0, r.stderr
    before = prepared_bytes(tmp_path / "checkpoints")
    assert dataset_folder(tmp_path / "checkpoints").name.startswith("bpe-")
    t = run("--model_name", "m", "--input_file", "input.txt", "--tokenizer", "tok.json", *tiny_arch_flags(),
            "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1", "--device", "cpu", cwd=tmp_path)
    assert t.returncode == 0, t.stderr
    assert "preparing" not in t.stderr and prepared_bytes(tmp_path / "checkpoints") == before
    r = run("--input_file", "input.txt", "--tokenizer", "bpe", cwd=tmp_path, script="prepare.py")
    assert r.returncode == 2 and "train one (mypt tokenizer train) and pass --tokenizer FILE.json" in r.stderr


def test_prepare_cuts_a_single_file_for_the_val_split_train_py_uses(tmp_path):
    (tmp_path / "input.txt").write_text(TEXT[:30_000], encoding="utf-8")
    r = run("--input_file", "input.txt", "--tokenizer", "char", "--val_split", "0.2", cwd=tmp_path, script="prepare.py")
    assert r.returncode == 0, r.stderr
    before = prepared_bytes(tmp_path / "checkpoints")
    assert json.loads(before["manifest.json"])["cut"]["val_split"] == 0.2
    t = run("--model_name", "m", "--input_file", "input.txt", "--tokenizer", "char", "--val_split", "0.2",
            *tiny_arch_flags(), "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1", "--device", "cpu",
            cwd=tmp_path)
    assert t.returncode == 0, t.stderr
    assert "preparing" not in t.stderr and prepared_bytes(tmp_path / "checkpoints") == before
    bad = run("--input_file", "input.txt", "--val_split", "0.9", cwd=tmp_path, script="prepare.py")
    assert bad.returncode == 2 and "--val_split (0.9) must be above 0 and at most 0.5" in bad.stderr


def test_a_damaged_shard_stops_training_with_one_message_and_writes_nothing(tmp_path):
    import numpy as np

    (tmp_path / "input.txt").write_text(TEXT[:30_000], encoding="utf-8")
    assert run("--input_file", "input.txt", "--tokenizer", "char", cwd=tmp_path, script="prepare.py").returncode == 0
    folder = dataset_folder(tmp_path / "checkpoints")
    shard = json.loads((folder / "manifest.json").read_text())["shards"][0]
    ids = np.fromfile(folder / shard["file"], dtype=shard["dtype"])
    ids[::20] = 60_000
    ids.tofile(folder / shard["file"])
    t = run("--model_name", "m", "--input_file", "input.txt", "--tokenizer", "char", *tiny_arch_flags(),
            "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1", "--device", "cpu", cwd=tmp_path)
    assert t.returncode == 2 and "Traceback" not in t.stderr, t.stderr
    [line] = [x for x in t.stderr.splitlines() if "error:" in x]
    assert f"the token cache checkpoints/.cache/{folder.name} is damaged: 00000.bin holds the id 60000" in line
    assert "delete that folder (or all of checkpoints/.cache)" in line
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [".cache"]


MIX_FLAGS = ["--dtype", "fp32", "--eval_iters", "2", "--eval_interval", "4", "--warmup_iters", "2",
             "--lr_decay_iters", "8", "--device", "cpu", "--learning_rate", "1e-2", *tiny_arch_flags()]


@pytest.mark.slow
def test_a_mixture_resumes_bit_for_bit_from_another_working_folder(tmp_path):
    make_corpus(tmp_path)
    (tmp_path / "code.jsonl").write_text("".join(json.dumps({"content": f"def f{i}(x):\n    return x * {i}\n"})
                                                 + "\n" for i in range(300)))
    (tmp_path / "mix.json").write_text(json.dumps({"sources": [
        {"name": "prose", "input_file": ["corpus/"], "weight": 0.7},
        {"name": "code", "input_file": "code.jsonl", "weight": 0.3, "text_field": "content"}]}))
    straight = run("--model_name", "straight", "--data", "mix.json", "--max_iters", "8", *MIX_FLAGS, cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    assert "data: source 'prose'" in straight.stdout and "data: source 'code'" in straight.stdout
    half = run("--model_name", "resumed", "--data", "mix.json", "--max_iters", "4", *MIX_FLAGS, cwd=tmp_path)
    assert half.returncode == 0, half.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rest = run("--model_name", "resumed", "--checkpoints_dir", str(tmp_path / "checkpoints"), "--max_iters", "8",
               cwd=elsewhere)
    assert rest.returncode == 0, rest.stderr
    assert "resuming 'resumed' from iteration 4" in rest.stdout
    a, b = (torch.load(tmp_path / "checkpoints" / n / "model.pt", weights_only=True) for n in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "checkpoints" / "resumed" / "training_state.json").read_text())
    assert [s["input_file"] for s in state["data"]["sources"]] == [[str(tmp_path / "corpus")],
                                                                   [str(tmp_path / "code.jsonl")]]


def test_a_rank_that_sees_other_data_stops_with_one_message(tmp_path, monkeypatch):
    from mypt import train_run
    from mypt.tokenizers import build_tokenizer

    (tmp_path / "input.txt").write_text(TEXT[:20_000], encoding="utf-8")
    tok = build_tokenizer("gpt2")
    sources = [data.Source("input", (str(tmp_path / "input.txt"),))]
    corpus = data.prepare_corpus(sources, tok, tmp_path / "checkpoints" / ".cache", val_split=0.1, progress=False)
    ckpt = tmp_path / "checkpoints" / "m"
    cfg, tc = train_run.ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32), train_run.TrainConfig()
    plan = train_run.RunPlan(ckpt, cfg, tc, tok, sources, train_run.TrainState(), None, corpus=corpus)
    rank1 = dist.DistInfo(rank=1, world_size=2, local_rank=1, local_world_size=2)
    train, _ = train_run._splits(plan, rank1)  # the same data on this "machine": fine
    assert len(train) > 0
    (tmp_path / "input.txt").write_text(TEXT[20_000:40_000], encoding="utf-8")  # this machine's copy differs
    with pytest.raises(MyPTError, match=r"process 1: the training data on this machine .*input.txt\) differ from the "
                                        r"data rank 0 trains on; copy rank 0's files here"):
        train_run._splits(plan, rank1)


@pytest.mark.slow
def test_ctrl_c_stops_prepare_with_a_note_and_the_next_run_continues(tmp_path):
    corpus = make_corpus(tmp_path)
    args = ["--input_file", str(corpus), "--shard_tokens", "600"]
    r = Run(*args, cwd=tmp_path, script="prepare.py")
    deadline = time.monotonic() + 60
    while records(dataset_folder(tmp_path / "checkpoints")) < 5 and r.poll() is None:
        assert time.monotonic() < deadline
    r.send_signal(signal.SIGINT)
    assert r.wait() == 130, r.stderr
    assert "interrupted: the finished shards are kept; run the same command to continue" in r.stderr
    assert "Traceback" not in r.stderr
    again = run(*args, cwd=tmp_path, script="prepare.py")
    assert again.returncode == 0, again.stderr
    whole = run(*args, "--checkpoints_dir", "whole", cwd=tmp_path, script="prepare.py")
    assert whole.returncode == 0 and prepared_bytes(tmp_path / "checkpoints") == prepared_bytes(tmp_path / "whole")
