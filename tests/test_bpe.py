"""The bpe tokenizer end to end: train.py --tokenizer bpe, resume, generate, eval and compare,
inspect, a tokenizer file shared by two models, and export to transformers and back.

Models are the tiny test architecture trained for a few iterations on 60 KB of real text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_ARCH, corpus_text, require, tiny_arch_flags
from forked_cli import ONE_THREAD, run

from mypt.api import load_model
from mypt.cli import run_command
from mypt.data import dataset as ds
from mypt.data import split as splits
from mypt.tokenizers import EOT, BPETokenizer, load_tokenizer, train_bpe

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TRAIN = ["--max_iters", "6", "--eval_interval", "6", "--eval_iters", "2", "--device", "cpu", "--dtype", "fp32"]


def bpe_text_ends(output: str) -> list[int]:
    """Where the text ends that the run's bpe tokenizer was trained on, for each training, in bytes."""
    lines = [x for x in output.splitlines() if x.startswith("bpe tokenizer trained in")]
    return [int(x.split(" on the first ")[1].split(" bytes")[0].replace(",", "")) for x in lines]


def dataset_of(folder: Path, tok: BPETokenizer) -> tuple[Path, dict]:
    """The run's data prepared with `tok`: the folder in the token cache, and its manifest."""
    [found] = (folder / "checkpoints" / ".cache").glob(f"{tok.id_string()}-*")
    return found, json.loads((found / "manifest.json").read_text())


def split_tokens(folder: Path, tok: BPETokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The (training, validation) token ids of the run's data, split as training splits them."""
    found, manifest = dataset_of(folder, tok)
    cut = manifest["cut"]["token"] if manifest["cut"] else None
    split = splits.split(*ds.documents(found, manifest), 0.1, cut, "input")
    store = ds.shards(found, manifest)
    return tuple(np.concatenate([store.take(np.arange(a, b)) for a, b in runs]) for runs in (split.train, split.val))


def assert_split_at_the_text_it_learned_from(folder: Path, tok: BPETokenizer, output: str) -> None:
    """The tokenizer was trained once, on the input's bytes before its cut; the training tokens are
    exactly those bytes and the validation tokens exactly the rest."""
    raw = (folder / "input.txt").read_bytes()
    cut = dataset_of(folder, tok)[1]["cut"]["byte"]
    assert bpe_text_ends(output) == [cut] and output.count("training a bpe tokenizer") == 1
    train_ids, val_ids = split_tokens(folder, tok)
    assert tok.decode(train_ids.tolist()).encode() == raw[:cut]
    assert tok.decode(val_ids.tolist()).encode() == raw[cut:] + EOT.encode()
    assert train_bpe([raw[:cut].decode()], tok.n_vocab, "t").ranks == tok.ranks


def train(root: Path, *args: str) -> str:
    r = run(*tiny_arch_flags(), *TRAIN, "--input_file", "input.txt", *args, cwd=root, env=ONE_THREAD)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with input.txt, a bpe model 'b' (vocab 500) and a char model 'c'."""
    root = tmp_path_factory.mktemp("bpe")
    (root / "input.txt").write_text(corpus_text(60_000), encoding="utf-8")
    out = train(root, "--model_name", "b", "--tokenizer", "bpe", "--vocab_size", "500")
    assert "bpe tokenizer: vocab_size is 512 (its 500 tokens padded to a multiple of 64), not the config's" in out
    (root / "b-output.txt").write_text(out)
    train(root, "--model_name", "c", "--tokenizer", "char")
    return root


def test_new_bpe_model_is_self_contained(root: Path) -> None:
    folder = root / "checkpoints" / "b"
    tok_json = json.loads((folder / "tokenizer.json").read_text())
    assert tok_json["kind"] == "bpe" and tok_json["special_tokens"] == {
        "<|endoftext|>": 495, "<|system|>": 496, "<|user|>": 497, "<|assistant|>": 498, "<|end|>": 499}
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == 512
    state = json.loads((folder / "training_state.json").read_text())
    assert state["tokenizer"] == "bpe" and state["iteration"] == 6
    tok = load_tokenizer(folder / "tokenizer.json")
    assert isinstance(tok, BPETokenizer) and dataset_of(root, tok)[1]["tokenizer"]["id"] == tok.id_string()


def test_bpe_is_trained_on_the_training_split_only(root: Path) -> None:
    tok = load_tokenizer(root / "checkpoints" / "b" / "tokenizer.json")
    assert isinstance(tok, BPETokenizer)
    assert_split_at_the_text_it_learned_from(root, tok, (root / "b-output.txt").read_text())
    whole = train_bpe([(root / "input.txt").read_text(encoding="utf-8")], 500, "t")
    assert whole.ranks != tok.ranks  # the validation text would have changed it


def test_tokenizer_train_with_val_split_learns_what_train_py_learns(root: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "t.json"
    assert run_command("tokenizer", ["train", "--input_file", str(root / "input.txt"), "--vocab_size", "500",
                                     "--val_split", "0.1", "--out", str(out)]) == 0
    cut = bpe_text_ends((root / "b-output.txt").read_text())[0]
    assert f"(the first {cut:,} bytes of " in capsys.readouterr().out
    assert load_tokenizer(out).to_json() == load_tokenizer(root / "checkpoints" / "b" / "tokenizer.json").to_json()


def test_bpe_is_trained_once_even_when_the_end_tokenizes_compactly(tmp_path: Path) -> None:
    # The last tenth of this text is one line repeated: it tokenizes far more compactly than the
    # rest. The split is decided in bytes before the tokenizer exists, so that changes nothing.
    text = corpus_text(45_000)
    (tmp_path / "input.txt").write_text(text + "to be or not to be\n" * 400, encoding="utf-8")
    out = train(tmp_path, "--model_name", "e", "--tokenizer", "bpe", "--vocab_size", "400")
    tok = load_tokenizer(tmp_path / "checkpoints" / "e" / "tokenizer.json")
    assert isinstance(tok, BPETokenizer)
    assert_split_at_the_text_it_learned_from(tmp_path, tok, out)
    point = int((tmp_path / "input.txt").stat().st_size * 0.9)
    assert point - 20 < bpe_text_ends(out)[0] <= point  # inside the repeated line: its last line break


def test_bpe_never_learns_from_validation_documents(tmp_path: Path) -> None:
    docs = [f"Document {i}.\n" + corpus_text(2_000 * (i + 2))[-2_000:] for i in range(30)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    r = run(*tiny_arch_flags(), *TRAIN, "--input_file", "docs.jsonl", "--model_name", "d", "--tokenizer", "bpe",
            "--vocab_size", "300", cwd=tmp_path, env=ONE_THREAD)
    assert r.returncode == 0, r.stdout + r.stderr
    tok = load_tokenizer(tmp_path / "checkpoints" / "d" / "tokenizer.json")
    assert isinstance(tok, BPETokenizer)
    train_ids, val_ids = split_tokens(tmp_path, tok)
    training = tok.decode(train_ids.tolist()).split(EOT)[:-1]
    held_out = tok.decode(val_ids.tolist()).split(EOT)[:-1]
    assert held_out and sorted(training + held_out) == sorted(docs)
    assert "bpe tokenizer trained in " in r.stdout and f"{len(training)} of the 30 documents" in r.stdout
    assert train_bpe(training, 300, "t").ranks == tok.ranks  # what it learned from: the training documents
    assert train_bpe(docs, 300, "t").ranks != tok.ranks  # (the validation documents would have changed it)


def test_resume_keeps_the_saved_tokenizer(root: Path, tmp_path: Path) -> None:
    before = (root / "checkpoints" / "b" / "tokenizer.json").read_bytes()
    out = train(root, "--model_name", "b", "--max_iters", "8", "--tokenizer", "bpe", "--vocab_size", "1000")
    assert "warning: --tokenizer bpe --vocab_size 1000 ignored: 'b' uses its saved bpe tokenizer (500 tokens)" in out
    assert "resuming 'b' from iteration 6" in out and "training a bpe tokenizer" not in out
    assert (root / "checkpoints" / "b" / "tokenizer.json").read_bytes() == before
    assert json.loads((root / "checkpoints" / "b" / "training_state.json").read_text())["iteration"] == 8


def test_generate_stream_and_evaluate(root: Path) -> None:
    lm = load_model("b", root / "checkpoints", device="cpu")
    text = lm.generate("ROMEO:", max_new_tokens=20, seed=1)
    assert text and text == "".join(lm.stream("ROMEO:", max_new_tokens=20, seed=1))
    r = run("--model_name", "b", "--prompt", "ROMEO:", "--max_new_tokens", "20", "--seed", "1", "--device", "cpu",
            cwd=root, script="generate.py", env=ONE_THREAD)
    assert r.returncode == 0 and text in r.stdout, r.stderr
    held_out = corpus_text(70_000)[62_000:]
    result = lm.evaluate(held_out)
    assert result.n_chars == len(held_out) and result.n_tokens < 0.5 * len(held_out)
    assert 0 < result.bits_per_char < 12


def test_eval_and_compare_across_tokenizers(root: Path, capsys: pytest.CaptureFixture) -> None:
    held_out = root / "held_out.txt"
    text = corpus_text(70_000)[62_000:]
    held_out.write_text("".join(ch for ch in text if ch in set(corpus_text(60_000))), encoding="utf-8")
    ckpts = str(root / "checkpoints")
    code = run_command("eval", ["--model_name", "b", "c", "--input_file", str(held_out), "--checkpoints_dir", ckpts,
                                "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (["b"], ["c"])}
    assert " bpe " in rows["b"] and " char " in rows["c"]
    bpc = load_model("b", ckpts, device="cpu").evaluate(held_out.read_text(encoding="utf-8")).bits_per_char
    assert rows["b"].split()[-1] == f"{bpc:.4f}"  # the table prints 4 decimals
    code = run_command("compare", ["--model_name", "b", "c", "--prompt", "ROMEO:", "--max_new_tokens", "10",
                                   "--seed", "1", "--checkpoints_dir", ckpts, "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "bpe tokenizer" in out and "char tokenizer" in out


def test_inspect_shows_the_bpe_tokenizer(root: Path, capsys: pytest.CaptureFixture) -> None:
    tok = load_tokenizer(root / "checkpoints" / "b" / "tokenizer.json")
    ckpts = str(root / "checkpoints")
    assert run_command("inspect", ["--model_name", "b", "--checkpoints_dir", ckpts]) == 0
    assert f"Tokenizer     : bpe, 500 tokens (end-of-text 495, chat tokens 496-499; {tok.id_string()})" in \
        capsys.readouterr().out
    args = ["inspect", "--model_name", "b", "--checkpoints_dir", ckpts, "--input_file", str(root / "input.txt")]
    assert run_command("tokenizer", [*args, "--top", "3"]) == 0
    out = capsys.readouterr().out
    n_tokens = len(tok.encode((root / "input.txt").read_text(encoding="utf-8")))
    assert f"{n_tokens:,} tokens" in out and "Longest tokens (3 of 495):" in out


def test_one_tokenizer_file_serves_two_models(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "input.txt").write_text(corpus_text(60_000), encoding="utf-8")
    tok_file = tmp_path / "my_tokenizer.json"
    assert run_command("tokenizer", ["train", "--input_file", str(tmp_path / "input.txt"), "--vocab_size", "300",
                                     "--out", str(tok_file)]) == 0
    assert f"wrote {tok_file}: bpe, 300 tokens" in capsys.readouterr().out
    for name, width in (("x", "32"), ("y", "64")):
        out = train(tmp_path, "--model_name", name, "--tokenizer", str(tok_file), "--n_embd", width)
        assert "bpe tokenizer: vocab_size is 320" in out
    folder = tmp_path / "checkpoints"
    saved = [json.loads((folder / m / "tokenizer.json").read_text()) for m in ("x", "y")]
    assert saved[0] == saved[1] == json.loads(tok_file.read_text())
    assert len([p for p in (folder / ".cache").iterdir() if p.is_dir()]) == 1  # one prepared dataset for both


def test_export_to_transformers_and_back(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    transformers = require("transformers")
    ckpts = str(root / "checkpoints")
    out = tmp_path / "hf"
    assert run_command("export", ["--model_name", "b", "--checkpoints_dir", ckpts, "--out", str(out)]) == 0
    lm = load_model("b", ckpts, device="cpu")
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    text = "ROMEO:\r\n  Whose   naïve 🙂 words?\n\n\n"
    assert theirs.encode(text) == lm.tokenizer.encode(text)
    model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    prompt = theirs("ROMEO:", return_tensors="pt")["input_ids"]
    greedy = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, prompt.shape[1]:]
    assert theirs.decode(greedy) == lm.generate("ROMEO:", max_new_tokens=8, temperature=0)
    assert run_command("import", ["--hf_dir", str(out), "--model_name", "back", "--checkpoints_dir",
                                  str(tmp_path / "ck")]) == 0, capsys.readouterr().err
    back = load_model("back", tmp_path / "ck", device="cpu")
    assert back.tokenizer.id_string() == lm.tokenizer.id_string()
    assert back.generate("ROMEO:", max_new_tokens=8, temperature=0) == lm.generate("ROMEO:", max_new_tokens=8,
                                                                                   temperature=0)
    assert back.config.vocab_size == lm.config.vocab_size == 512 and TINY_ARCH["n_embd"] == back.config.n_embd
