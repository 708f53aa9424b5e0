"""Tests for task evaluation (mypt.evaluation, `mypt eval --task`): the log-likelihoods against
full forward passes, each task type, the field-name table, few-shot, bad task files, the outputs."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import corpus_text

from mypt.api import load_model
from mypt.cli import run_command
from mypt.config import ModelConfig
from mypt.evaluation import builtin, tasks
from mypt.evaluation.scoring import Request, encode_choices, loglikelihoods
from mypt.model import GPT

ARCH = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
        "--dropout", "0", "--dtype", "fp32", "--eval_iters", "1"]


def reference(model: GPT, r: Request) -> tuple[float, bool]:
    """The continuation's log-likelihood from one full forward pass of the (left-truncated) request."""
    whole = (r.context + r.continuation)[-(model.config.block_size + 1):]
    with torch.no_grad():
        logits, _ = model(torch.tensor([whole[:-1]]))
    lp = torch.log_softmax(logits[0].float(), -1)[-len(r.continuation):]
    target = torch.tensor(r.continuation)
    return lp.gather(1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all())


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_loglikelihoods_match_full_forward_passes(position: str) -> None:
    """Shared contexts through the KV cache, batched and padded, long contexts cut from the left:
    the same numbers as a full forward pass per request."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, dropout=0.0, position=position)
    model = GPT(cfg).eval()
    rng = random.Random(1)
    requests = []
    for _ in range(30):
        context = tuple(rng.randrange(50) for _ in range(rng.randrange(1, 25)))  # up to past block_size
        for _ in range(rng.randrange(1, 4)):
            requests.append(Request(context, tuple(rng.randrange(50) for _ in range(rng.randrange(1, 6)))))
    got = loglikelihoods(model, requests, torch.device("cpu"), "fp32", max_tokens=200)  # several batches
    for r, g in zip(requests, got, strict=True):
        logprob, greedy = reference(model, r)
        assert g.logprob == pytest.approx(logprob, abs=1e-4)
        assert g.greedy == greedy


def test_loglikelihoods_under_bf16_are_near_fp32s() -> None:
    """Under bf16 autocast (--dtype bf16, and auto on a GPU) the cache is bf16 and the numbers stay
    near fp32's (an fp32 cache made every bf16 scoring stop with a dtype error)."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, dropout=0.0)
    model = GPT(cfg).eval()
    requests = [Request((1, 2, 3, 4), (5, 6)), Request((1, 2, 3, 4), (7,)), Request((9,), (8, 8, 8))]
    fp32 = loglikelihoods(model, requests, torch.device("cpu"), "fp32")
    bf16 = loglikelihoods(model, requests, torch.device("cpu"), "bf16")
    assert [b.logprob for b in bf16] == pytest.approx([f.logprob for f in fp32], abs=0.05)


def encode_pair(tok, context: str, continuation: str, what: str) -> Request:
    return encode_choices(tok, [context], [continuation], what)[0]


def test_encode_pair_takes_the_choice_tokens_after_the_context() -> None:
    from mypt.tokenizers.gpt2 import GPT2Tokenizer

    tok = GPT2Tokenizer()
    r = encode_pair(tok, "The cat sat on the ", "mat", "t")  # the trailing space moves to the choice, as lm-eval
    assert r.context == tuple(tok.encode("The cat sat on the"))
    assert r.continuation == tuple(tok.encode("The cat sat on the mat")[len(r.context):]) == tuple(tok.encode(" mat"))
    assert encode_pair(tok, "", "Hello", "t").context == tuple(tok.start_ids()[:1])


def test_a_context_cut_inside_a_token_backs_off_to_the_shared_tokens() -> None:
    """'daug' + 'hter' is one GPT-2 token ' daughter': lm-eval's split would score no tokens. Every
    choice after the context backs off to the same shared tokens, and what is scored spells the rest."""
    from mypt.tokenizers.gpt2 import GPT2Tokenizer

    tok = GPT2Tokenizer()
    context, choices = "Send for your daug", ["hter", "ht", "hter and son"]
    requests = encode_choices(tok, [context] * 3, choices, "t")
    assert len({r.context for r in requests}) == 1
    head = tok.decode(list(requests[0].context))
    assert context.startswith(head) and len(head) < len(context)
    for r, choice in zip(requests, choices, strict=True):
        assert r.continuation and head + tok.decode(list(r.continuation)) == context + choice
    assert encode_pair(tok, "The cat", " sat", "t") == Request(tuple(tok.encode("The cat")), tuple(tok.encode(" sat")))


def test_every_builtin_item_encodes_with_a_subword_tokenizer() -> None:
    """The built-in set cuts words in half; with GPT-2's tokens each request still spells its text."""
    from mypt.tokenizers.gpt2 import GPT2Tokenizer

    tok = GPT2Tokenizer()
    for task in builtin.builtin_tasks():
        for item in task.items:
            requests = encode_choices(tok, item.contexts, item.choices, task.name)
            for r, context, choice in zip(requests, item.contexts, item.choices, strict=True):
                assert r.continuation and tok.decode(list(r.context + r.continuation)) == context + choice


# ----------------------------------------------------------------------------- task files


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


FORMATS = [
    ({"context": "A", "choices": [" b", " c"], "answer": 1}, (("A", "A"), (" b", " c"), 1)),
    ({"ctx": "A man", "endings": ["runs.", "sits."], "label": "1", "activity_label": "x"},
     (("A man", "A man"), (" runs.", " sits."), 1)),
    ({"question": "Why?", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]}, "answerKey": "C"},
     (("Question: Why?\nAnswer:",) * 3, (" x", " y", " z"), 2)),
    ({"question": {"stem": "Why?", "choices": [{"text": "x", "label": "1"}, {"text": "y", "label": "2"}]},
      "answerKey": "2"}, (("Question: Why?\nAnswer:",) * 2, (" x", " y"), 1)),
    ({"goal": "Open a jar", "sol1": "twist", "sol2": "shout", "label": 0},
     (("Question: Open a jar\nAnswer:",) * 2, (" twist", " shout"), 0)),
    ({"sentence": "Ann gave Bo a gift because _ was kind.", "option1": "Ann", "option2": "Bo", "answer": "1"},
     (("Ann gave Bo a gift because Ann", "Ann gave Bo a gift because Bo"), (" was kind.", " was kind."), 0)),
    ({"context": "Twinkle twinkle little", "target": " star"}, (("Twinkle twinkle little",), (" star",), 0)),
    ({"text": "Twinkle twinkle little star"}, (("Twinkle twinkle little",), (" star",), 0)),
]


@pytest.mark.parametrize(("row", "expected"), FORMATS, ids=["mypt", "hellaswag", "arc", "arc-ai2", "piqa",
                                                            "winogrande", "cloze", "lastword"])
def test_field_names_map_to_items(tmp_path: Path, row: dict, expected: tuple) -> None:
    task = tasks.read_task(str(write_lines(tmp_path / "t.jsonl", [row, row])))
    item = task.items[1]
    assert (item.contexts, item.choices, item.answer, item.line) == (*expected, 2)
    assert task.kind == (tasks.CLOZE if "target" in row or "text" in row else tasks.MULTIPLE_CHOICE)


BAD = [
    ({"context": "A", "choices": ["b"]}, "the field 'answer' is missing"),
    ({"choices": ["b"], "answer": 0}, "the field 'context' is missing"),
    ({"context": "A", "choices": ["b", "c"], "answer": 2}, "'answer' is 2, out of range for 2 choices"),
    ({"context": "A", "choices": [], "answer": 0}, "'choices' is an empty list"),
    ({"context": "A", "choices": "b", "answer": 0}, "'choices' must be a list of strings"),
    ({"context": "A"}, "'choices' is missing"),
    ({"ctx": "A", "endings": ["b"], "label": 3}, "'label' is 3, out of range"),
    ({"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}, "no '_' blank"),
    ('{"context": "A", "choices": ["b"], "answer": 0', "is not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ({"context": "A", "target": " b"}, "a cloze item in a file of multiple choice items"),
]


@pytest.mark.parametrize(("bad", "message"), BAD)
def test_bad_task_files_name_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture, trained: Path,
                                           bad: object, message: str) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [{"context": "A", "choices": ["b", "c"], "answer": 0}, "", bad])
    code = run_command("eval", ["--checkpoints_dir", str(trained), "--model_name", "m", "--task", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{path} line 3" in err and message in err
    assert "Traceback" not in err


def test_fewshot_is_repeatable_and_never_the_item_itself(tmp_path: Path) -> None:
    rows = [{"context": f"Q{i}:", "choices": [f" a{i}", f" b{i}"], "answer": i % 2} for i in range(12)]
    task = tasks.read_task(str(write_lines(tmp_path / "t.jsonl", rows)))
    a, b = tasks.prepare(task, 3, 5, seed=7), tasks.prepare(task, 3, 5, seed=7)
    assert a == b and len(a.items) == 5
    assert tasks.prepare(task, 3, 5, seed=8) != a
    for i, item in enumerate(a.items):
        shots = item.contexts[0].split(tasks.FEWSHOT_SEPARATOR)
        assert len(shots) == 4 and shots[-1] == f"Q{i}:"
        assert f"Q{i}:" not in shots[:3]
        for shot in shots[:3]:  # each example carries its right answer
            n = int(shot.split(":")[0][1:])
            assert shot == f"Q{n}: {'ab'[n % 2]}{n}"
    with pytest.raises(tasks.MyPTError, match="at most 11 others"):
        tasks.prepare(task, 12)


def test_builtin_tasks_are_deterministic_with_their_baselines() -> None:
    builtin._held_out.cache_clear()
    first = builtin.builtin_tasks()
    builtin._held_out.cache_clear()
    assert builtin.builtin_tasks() == first
    assert [t.name for t in first] == ["shakespeare-words", "shakespeare-lines", "shakespeare-cloze"]
    assert [t.chance for t in first] == [0.25, 0.25, 0.0]
    held_out = corpus_text()[int(len(corpus_text()) * 0.9):]
    for task in first:
        assert len(task.items) == builtin.ITEMS
        for item in task.items:
            assert item.example in held_out  # the right answer continues its context in the held-out text
        if task.kind == tasks.MULTIPLE_CHOICE:  # the right answer sits anywhere among the four
            assert {item.answer for item in task.items} == {0, 1, 2, 3}


# ----------------------------------------------------------------------------- scoring a trained model


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """checkpoints/ with 'm': a char model trained a little on tinyshakespeare (knowing all its characters)."""
    root = tmp_path_factory.mktemp("evaltasks")
    every_char = "".join(sorted(set(corpus_text())))
    (root / "train.txt").write_text(every_char + corpus_text(40_000), encoding="utf-8")
    code = run_command("train", ["--model_name", "m", "--tokenizer", "char", "--checkpoints_dir", str(root / "ck"),
                                 "--input_file", str(root / "train.txt"), "--max_iters", "40", "--eval_interval",
                                 "40", *ARCH])
    assert code == 0
    return root / "ck"


def eval_json(capsys: pytest.CaptureFixture, ck: Path, *args: str) -> list[dict]:
    code = run_command("eval", ["--checkpoints_dir", str(ck), "--device", "cpu", "--model_name", "m", "--json", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_multiple_choice_scores_from_the_per_choice_loglikelihoods(tmp_path: Path, trained: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    text = corpus_text(40_000)
    rows = [{"context": text[i:i + 20], "choices": [text[i + 20:i + 26], "zzqxzq", text[i + 500:i + 503]],
             "answer": 0} for i in range(0, 3000, 150)]
    path = write_lines(tmp_path / "mc.jsonl", rows)
    [row] = eval_json(capsys, trained, "--task", str(path))
    assert {"model", "task", "acc", "acc_norm", "stderr", "n"} <= row.keys()
    assert (row["model"], row["task"], row["n"], row["chance"]) == ("m", "mc", 20, pytest.approx(1 / 3))
    lm = load_model("m", trained, device="cpu")
    [result] = lm.evaluate_task(str(path))
    picks, picks_norm = [], []
    for item, r in zip(result.items, rows, strict=True):
        lls = [reference(lm.model, encode_pair(lm.tokenizer, r["context"], c, "t"))[0] for c in r["choices"]]
        assert item.logprobs == pytest.approx(lls, abs=1e-4)
        picks.append(lls.index(max(lls)) == 0)
        per_byte = [ll / len(c) for ll, c in zip(lls, r["choices"], strict=True)]
        picks_norm.append(per_byte.index(max(per_byte)) == 0)
    acc, acc_norm = sum(picks) / 20, sum(picks_norm) / 20
    assert row["acc"] == pytest.approx(acc) and row["acc_norm"] == pytest.approx(acc_norm)
    assert row["stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / 19))
    assert row["centered"] == pytest.approx((acc - 1 / 3) / (2 / 3))


def test_cloze_is_the_exact_greedy_continuation(tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture) -> None:
    lm = load_model("m", trained, device="cpu")
    context = corpus_text(100)[:20]  # with its target within block_size, as generate sees it
    greedy = lm.generate(context, max_new_tokens=3, temperature=0)
    wrong = greedy[:2] + ("x" if greedy[2] != "x" else "y")
    path = write_lines(tmp_path / "cloze.jsonl", [{"context": context, "target": greedy},
                                                  {"context": context, "target": wrong}])
    [row] = eval_json(capsys, trained, "--task", str(path))
    assert (row["kind"], row["n"], row["acc"], row["chance"], row["acc_norm"]) == ("cloze", 2, 0.5, 0.0, None)
    [result] = lm.evaluate_task(str(path))
    expected = reference(lm.model, encode_pair(lm.tokenizer, context, greedy, "t"))
    assert result.items[0].logprobs[0] == pytest.approx(expected[0], abs=1e-4) and expected[1]
    assert row["logprob"] == pytest.approx(sum(i.logprobs[0] for i in result.items) / 2)


def test_text_task_gives_bits_per_byte(tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture) -> None:
    text = corpus_text(3000)[2000:]
    (tmp_path / "held.txt").write_text(text, encoding="utf-8")
    [row] = eval_json(capsys, trained, "--task", str(tmp_path / "held.txt"))
    r = load_model("m", trained, device="cpu").evaluate(text)
    assert row["bits_per_char"] == pytest.approx(r.bits_per_char)
    assert row["bits_per_byte"] == pytest.approx(r.total_nats / math.log(2) / len(text.encode()))
    assert row["acc"] is None


def test_table_average_and_plot(tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture) -> None:
    plot = tmp_path / "scores.png"
    code = run_command("eval", ["--checkpoints_dir", str(trained), "--device", "cpu", "--model_name", "m",
                                "--task", "builtin", "--limit", "20", "--num_fewshot", "1", "--plot", str(plot)])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("m ")}
    assert set(lines) == {"shakespeare-words", "shakespeare-lines", "shakespeare-cloze", "average"}
    accs = [float(lines[t][3]) for t in ("shakespeare-words", "shakespeare-lines", "shakespeare-cloze")]
    assert float(lines["average"][3]) == pytest.approx(sum(accs) / 3, abs=1e-4)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_input_file_keeps_working(tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "held.txt").write_text(corpus_text(1000), encoding="utf-8")
    code = run_command("eval", ["--checkpoints_dir", str(trained), "--model_name", "m", "--input_file",
                                str(tmp_path / "held.txt")])
    assert code == 0 and "bits/char" in capsys.readouterr().out
    assert run_command("eval", ["--checkpoints_dir", str(trained), "--model_name", "m"]) == 2
    assert "give --task FILE" in capsys.readouterr().err


# ----------------------------------------------------------------------------- lm-evaluation-harness



def lm_eval_command(export: Path, tasks_dir: Path, out: Path) -> list[str]:
    """The README's command line for lm-eval on a `mypt export --format hf` folder (lm-eval's CLI entry point)."""
    return ["lm_eval", "--model", "hf", "--model_args", f"pretrained={export},dtype=float32", "--tasks", "mypt_mc",
            "--include_path", str(tasks_dir), "--device", "cpu", "--batch_size", "8", "--output_path", str(out),
            "--log_samples"]


@pytest.mark.slow
def test_lm_eval_hf_on_the_export_agrees_with_mypt_eval(tmp_path: Path) -> None:
    """The real lm_eval CLI on the transformers folder `mypt export` writes, on a YAML task with local
    JSON lines: the same per-choice log-likelihoods (within 1e-3) and accuracy as mypt eval --task.
    (Where a context stops inside a GPT-2 token the two differ on purpose: encode_choices.)"""
    import os
    import shutil
    import subprocess
    import sys

    from conftest import require

    require("lm_eval", "eval")
    text = corpus_text(40_000)
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    ck = tmp_path / "ck"
    assert run_command("train", ["--model_name", "g", "--tokenizer", "gpt2", "--checkpoints_dir", str(ck),
                                 "--input_file", str(tmp_path / "train.txt"), "--max_iters", "20",
                                 "--eval_interval", "20", *ARCH]) == 0
    export = tmp_path / "export"
    assert run_command("export", ["--checkpoints_dir", str(ck), "--model_name", "g", "--out", str(export)]) == 0
    cut = [(i, text.index(" ", i + 60), text.index(" ", i + 900)) for i in range(0, 12_000, 600)]
    rows = [{"context": text[i:j], "choices": [text[j:j + 15], text[k:k + 15], " the end."], "answer": 0}
            for i, j, k in cut]  # choices start with a space, as lm-eval's own tasks' do
    data = write_lines(tmp_path / "mc.jsonl", rows)
    tasks_dir = tmp_path / "lm_eval_tasks"
    tasks_dir.mkdir()
    (tasks_dir / "mypt_mc.yaml").write_text(tasks.lm_eval_yaml("mypt_mc", data), encoding="utf-8")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = lm_eval_command(export, tasks_dir, tmp_path / "out")
    command[0] = shutil.which("lm_eval", path=str(Path(sys.executable).parent)) or command[0]
    r = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    [samples] = list((tmp_path / "out").rglob("samples_mypt_mc_*.jsonl"))
    theirs = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda s: s["doc_id"])
    [ours] = load_model("g", ck, device="cpu").evaluate_task(str(data))
    assert len(theirs) == len(ours.items) == len(rows)
    for sample, item in zip(theirs, ours.items, strict=True):
        lls = [float(ll) for ll, _greedy in sample["filtered_resps"]]
        assert item.logprobs == pytest.approx(lls, abs=1e-3)
        assert sample["acc"] == item.acc and sample["acc_norm"] == item.acc_norm


# ----------------------------------------------------------------------------- during training


def test_eval_task_logs_accuracy_beside_val_loss_and_resume_stays_exact(tmp_path: Path) -> None:
    """--eval_task scores at every evaluation go to metrics.jsonl (and loss.png); a run stopped at iteration 2
    and resumed with the flag ends with the same weights as one run straight to 4."""
    from conftest import assert_same

    from mypt.metrics import read_metrics

    text = corpus_text(30_000)
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    rows = [{"context": text[i:i + 20], "choices": [text[i + 20:i + 26], text[i + 400:i + 406]], "answer": 0}
            for i in range(0, 2000, 200)]
    task = write_lines(tmp_path / "mc.jsonl", rows)
    ck = tmp_path / "ck"

    def train(name: str, iters: int, *flags: str) -> int:
        return run_command("train", ["--model_name", name, "--tokenizer", "char", "--checkpoints_dir", str(ck),
                                     "--input_file", str(tmp_path / "train.txt"), "--max_iters", str(iters),
                                     "--eval_interval", "2", "--seed", "3", *ARCH, *flags])

    assert train("straight", 4, "--eval_task", str(task)) == 0
    assert train("resumed", 2, "--eval_task", str(task)) == 0
    assert train("resumed", 4, "--eval_task", str(task)) == 0
    assert train("plain", 4) == 0
    assert_same(torch.load(ck / "straight" / "model.pt"), torch.load(ck / "resumed" / "model.pt"), "model")
    assert_same(torch.load(ck / "straight" / "model.pt"), torch.load(ck / "plain" / "model.pt"), "model")
    logged = read_metrics(ck / "straight")
    assert [r["iter"] for r in logged] == [2, 4]
    lm = load_model("straight", ck, device="cpu")
    [result] = lm.evaluate_task(str(task))
    assert logged[-1]["mc/acc"] == result.acc
    assert [r["mc/acc"] for r in read_metrics(ck / "resumed")] == [r["mc/acc"] for r in logged]
    assert "mc/acc" not in read_metrics(ck / "plain")[-1]


def test_eval_task_bad_file_stops_before_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = write_lines(tmp_path / "bad.jsonl", [{"context": "A", "choices": ["b"], "answer": 1}])
    code = run_command("train", ["--model_name", "x", "--checkpoints_dir", str(tmp_path / "ck"), "--max_iters", "2",
                                 "--eval_task", str(bad), *ARCH])
    assert code == 2
    assert f"{bad} line 1: 'answer' is 1, out of range" in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()
