"""Tests for `mypt eval` and `mypt compare` (and LoadedModel.evaluate) on two trained models
of different sizes and tokenizers: 'wide' (char, 48 wide) and 'narrow' (gpt2, 32 wide).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import corpus_text, run_cli

from mypt.api import LoadedModel, load_model
from mypt.cli import run_command

ARCH = ["--n_layer", "2", "--n_head", "2", "--block_size", "32", "--batch_size", "4", "--dropout", "0"]
TRAIN = ["--max_iters", "30", "--eval_interval", "30", "--eval_iters", "2", "--dtype", "fp32"]
MODELS = {"wide": ("char", "48"), "narrow": ("gpt2", "32")}



@pytest.fixture(scope="module")
def texts() -> tuple[str, str]:
    """(training text, held-out text made only of training characters)."""
    text = corpus_text(50_000)
    train = text[:40_000]
    return train, "".join(c for c in text[40_000:43_000] if c in set(train))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, texts: tuple[str, str]) -> Path:
    root = tmp_path_factory.mktemp("evalcmp")
    (root / "train.txt").write_text(texts[0], encoding="utf-8")
    (root / "held_out.txt").write_text(texts[1], encoding="utf-8")
    for name, (tokenizer, width) in MODELS.items():
        r = run_cli("--model_name", name, "--tokenizer", tokenizer, "--input_file", "train.txt", "--n_embd", width,
                    *ARCH, *TRAIN, cwd=root, env={"OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr
    return root


def cli(capsys: pytest.CaptureFixture, root: Path, command: str, *args: str) -> tuple[int, str, str]:
    code = run_command(command, ["--checkpoints_dir", str(root / "checkpoints"), "--device", "cpu", *args])
    out, err = capsys.readouterr()
    return code, out, err


def reference_nats(lm: LoadedModel, text: str) -> float:
    """Total loss written independently: full logits of each window, summed cross-entropy."""
    ids = lm.tokenizer.start_ids()[:1] + lm.tokenizer.encode(text)
    block, total = lm.config.block_size, 0.0
    for i in range(0, len(ids) - 1, block):
        x, y = torch.tensor([ids[i : i + block]]), torch.tensor(ids[i + 1 : i + block + 1])
        with torch.no_grad():
            logits, _ = lm.model(x[:, : len(y)])
        total += F.cross_entropy(logits[0], y, reduction="sum").item()
    return total


def params_cell(name: str, root: Path) -> str:
    """The parameters cell a table should show for a model: its own count, formatted independently."""
    n = load_model(name, root / "checkpoints", device="cpu").model.num_params()
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


# ----------------------------------------------------------------------------- eval


def test_eval_prints_a_row_per_model(capsys: pytest.CaptureFixture, root: Path, texts: tuple[str, str]) -> None:
    code, out, err = cli(capsys, root, "eval", "--model_name", "wide", "narrow",
                         "--input_file", str(root / "held_out.txt"), "--dtype", "fp32")
    assert code == 0, err
    assert f"{len(texts[1]):,} characters" in out
    header = out.splitlines()[1].split()
    assert header == ["model", "tokenizer", "parameters", "iterations", "tokens", "loss", "perplexity", "bits/char"]
    rows = {line.split()[0]: line.split() for line in out.splitlines()[3:]}
    assert set(rows) == {"wide", "narrow"}
    assert rows["wide"][1:5] == ["char", params_cell("wide", root), "30", f"{len(texts[1]):,}"]
    assert rows["narrow"][1:4] == ["gpt2", params_cell("narrow", root), "30"]
    for row in rows.values():
        loss, ppl, bpc = map(float, row[5:8])
        assert ppl == pytest.approx(math.exp(loss), rel=1e-3) and bpc > 0


def test_evaluate_matches_an_independent_computation(root: Path, texts: tuple[str, str]) -> None:
    text = texts[1][:1000]
    for name in MODELS:
        lm = load_model(name, root / "checkpoints", device="cpu", dtype="fp32")
        r = lm.evaluate(text)
        assert r.total_nats == pytest.approx(reference_nats(lm, text), rel=1e-4)
        assert r.bits_per_char == pytest.approx(r.total_nats / math.log(2) / len(text))
        assert lm.evaluate(text, batch_size=1).total_nats == pytest.approx(r.total_nats, rel=1e-5)
        if lm.tokenizer.kind == "char":  # one token per character: bits/char is loss in bits
            assert r.n_tokens == len(text)
            assert r.bits_per_char == pytest.approx(r.loss / math.log(2))


def test_eval_max_chars(capsys: pytest.CaptureFixture, root: Path) -> None:
    code, out, _ = cli(capsys, root, "eval", "--model_name", "wide", "--input_file", str(root / "held_out.txt"),
                       "--max_chars", "100")
    assert code == 0 and "100 characters" in out and re.search(r"^wide .* 100 ", out, re.M)


def test_eval_errors(capsys: pytest.CaptureFixture, root: Path) -> None:
    code, _, err = cli(capsys, root, "eval", "--model_name", "wide", "nope", "--input_file",
                       str(root / "held_out.txt"))
    assert code == 2 and "'nope'" in err and "narrow, wide" in err
    odd = root / "odd.txt"
    odd.write_text("snowman ☃", encoding="utf-8")
    code, _, err = cli(capsys, root, "eval", "--model_name", "wide", "--input_file", str(odd))
    assert code == 2 and "odd.txt" in err and "'☃'" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- compare


def test_compare_shows_each_continuation_and_speed(capsys: pytest.CaptureFixture, root: Path) -> None:
    code, out, err = cli(capsys, root, "compare", "--model_name", "wide", "narrow", "--prompt", "The",
                         "--temperature", "0", "--max_new_tokens", "24", "--seed", "5", "--dtype", "fp32")
    assert code == 0, err
    assert "seed 5" in out.splitlines()[0]
    for name, (tokenizer, _) in MODELS.items():
        assert re.search(rf"^===== {name}: .* parameters, 30 iterations, {tokenizer} tokenizer =====$", out, re.M)
        lm = load_model(name, root / "checkpoints", device="cpu", dtype="fp32")
        assert "The" + lm.generate("The", max_new_tokens=24, temperature=0) + "\n" in out
        assert re.search(rf"^{name} +\S+ +24 +[0-9.]+$", out, re.M)  # summary: tokens and tokens/s
    assert out.count("tokens/s") == 3  # one line per model, one summary header


def test_compare_same_seed_same_output(capsys: pytest.CaptureFixture, root: Path) -> None:
    args = ["--model_name", "wide", "narrow", "--prompt", "To", "--max_new_tokens", "12", "--seed", "9"]
    runs = [cli(capsys, root, "compare", *args)[1] for _ in range(2)]
    texts = [[line for line in run.split("\nmodel ")[0].splitlines() if "tokens/s" not in line] for run in runs]
    assert texts[0] == texts[1]  # all but the speeds
