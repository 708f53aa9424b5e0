"""lm-evaluation-harness as a real client of `mypt serve`: `lm_eval --model local-completions`.

A tiny char-level model is trained by train.py and served by the `mypt serve` command; lm_eval
(its own command line, in a child process, nothing from a hub) runs a multiple-choice task this
test writes as a YAML file and a JSON lines file. Each item's log-likelihoods, as lm_eval logs
them, must equal a direct computation with the model, and so must the accuracy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, corpus_text, require, run_cli
from serving import ARCH, TRAIN

from mypt.api import LoadedModel, load_model
from mypt.evaluation.tasks import lm_eval_yaml

httpx = require("httpx")
require("lm_eval")

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}


def items() -> list[dict]:
    """Lines of the corpus: the start of a line as context, its true rest against the rests of others."""
    lines = list(dict.fromkeys(line for line in corpus_text(20_000).splitlines()
                               if 14 <= len(line) <= 28 and not line.endswith(":")))
    out = []
    for i in range(10):
        line, others = lines[i * 3], [lines[i * 3 + 1], lines[i * 3 + 2], lines[(i * 3 + 7) % len(lines)]]
        cut = 6 + i % 4
        while line[cut - 1].isspace():  # lm_eval moves a context's trailing spaces into each choice
            cut += 1
        choices = [line[cut:]] + [o[cut:] for o in others]
        answer = i % 4
        choices[0], choices[answer] = choices[answer], choices[0]
        out.append({"context": line[:cut], "choices": choices, "answer": answer})
    return out


def loglikelihood(lm: LoadedModel, context: str, choice: str) -> float:
    """Sum of the choice's tokens' log-probabilities given the context, the choice appended as it is."""
    ctx, full = lm.tokenizer.encode(context), lm.tokenizer.encode(context + choice)
    with torch.no_grad():
        logits, _ = lm.model(torch.tensor([full]))
    logprobs = logits[0].float().log_softmax(-1)
    return sum(logprobs[t - 1, full[t]].item() for t in range(len(ctx), len(full)))


def start_server(ckpts: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mypt", "serve", "--model_name", "chars", "--checkpoints_dir", str(ckpts),
           "--port", str(port), "--log_level", "warning"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except httpx.TransportError:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.1)


@pytest.mark.slow
def test_lm_eval_local_completions_against_mypt_serve(tmp_path: Path) -> None:
    from mypt.cli import run_command
    from mypt.cli.serve import bind

    (tmp_path / "input.txt").write_text(corpus_text(60_000), encoding="utf-8")
    r = run_cli("--model_name", "chars", "--tokenizer", "char", "--input_file", "input.txt", *ARCH, *TRAIN,
                cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    ckpts, hf = tmp_path / "checkpoints", tmp_path / "chars-hf"
    assert run_command("export", ["--model_name", "chars", "--checkpoints_dir", str(ckpts), "--format", "hf",
                                  "--out", str(hf)]) == 0
    task = items()
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(t) + "\n" for t in task), encoding="utf-8")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mypt_mc.yaml").write_text(lm_eval_yaml("mypt_mc", tmp_path / "mc.jsonl"), encoding="utf-8")

    port = bind("127.0.0.1", 0).getsockname()[1]
    server = start_server(ckpts, port)
    try:
        args = (f"model=chars,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend=huggingface,"
                f"tokenizer={hf},max_length=32")
        cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
               "--tasks", "mypt_mc", "--include_path", str(tmp_path / "tasks"), "--log_samples",
               "--output_path", str(tmp_path / "out")]
        r = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, **OFFLINE}, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=30)

    samples = [json.loads(line) for p in (tmp_path / "out").rglob("samples_mypt_mc_*.jsonl")
               for line in p.read_text(encoding="utf-8").splitlines()]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text(encoding="utf-8"))
    assert sorted(s["doc_id"] for s in samples) == list(range(len(task)))
    lm = load_model("chars", ckpts, device="cpu", dtype="fp32")
    correct = 0
    for s in samples:
        item = task[s["doc_id"]]
        got = [float(resp[0][0]) for resp in s["resps"]]  # lm_eval logs [[loglikelihood, is_greedy]] as text
        direct = [loglikelihood(lm, item["context"], choice) for choice in item["choices"]]
        assert got == pytest.approx(direct, abs=1e-3)
        correct += max(range(len(direct)), key=direct.__getitem__) == item["answer"]
    assert results["results"]["mypt_mc"]["acc,none"] == pytest.approx(correct / len(task))
