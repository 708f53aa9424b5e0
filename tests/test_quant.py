"""Tests for --quantize int8 (mypt.quant): the kernel against the dequantised matrix product, a
quantised trained model against its fp32 self, and every command that loads a model.

One tiny char model is trained by train.py: 2 layers, 48 wide (not a multiple of the kernel's
32-value blocks), learned positions, tied head; a rotary gpt2 one is built from a config.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, corpus_text, require, run_cli

from mypt import kernels, quant
from mypt.api import load_model
from mypt.cli import run_command
from mypt.errors import MyPTError
from mypt.model import GPT

ARCH = ["--n_layer", "2", "--n_head", "2", "--n_embd", "48", "--block_size", "32", "--batch_size", "8",
        "--dropout", "0"]
TRAIN = ["--max_iters", "150", "--eval_interval", "150", "--eval_iters", "2", "--dtype", "fp32",
         "--learning_rate", "3e-3"]
PROMPT = "ROMEO:\nWhat"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("quant")
    (root / "input.txt").write_text(corpus_text(60_000), encoding="utf-8")
    (root / "held_out.txt").write_text(corpus_text(64_000)[60_000:], encoding="utf-8")
    r = run_cli("--model_name", "chars", "--tokenizer", "char", "--input_file", "input.txt", *ARCH, *TRAIN,
                cwd=root, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    return root / "checkpoints"


def error_bound(q: quant.Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """The most the kernel may differ from x @ W^T (W dequantised): each activation is rounded to
    the nearest multiple of its block's scale (largest magnitude of 32 values / 127)."""
    blocks = torch.nn.functional.pad(x.abs(), (0, -x.size(1) % 32)).view(x.size(0), -1, 32)
    step = (blocks.amax(-1) / 127).repeat_interleave(32, dim=1)[:, : x.size(1)]  # (M, K)
    return (step / 2) @ q.weight.abs().t() + 1e-4


def test_the_kernel_builds_here() -> None:
    assert kernels.available(), kernels.problem()  # CI's runners are x86-64 with AVX2 and g++


@pytest.mark.parametrize("rows", [1, 3, kernels.MAX_ROWS, kernels.MAX_ROWS + 1, 40])
@pytest.mark.parametrize("out_in", [(37, 33), (64, 95), (130, 768), (5, 7)])
def test_int8_linear_equals_the_dequantised_product(rows: int, out_in: tuple[int, int]) -> None:
    torch.manual_seed(rows)
    layer = torch.nn.Linear(out_in[1], out_in[0], bias=True)
    q = quant.Int8Linear.from_weight(layer.weight, layer.bias)
    assert ((q.weight - layer.weight).abs() <= q.scale[:, None] / 2 + 1e-7).all()  # rounding to the nearest step
    x = torch.randn(rows, out_in[1]) * torch.rand(out_in[1]) * 3
    reference = torch.nn.functional.linear(x, q.weight, q.bias)
    got = q(x)
    assert got.shape == reference.shape and got.dtype == torch.float32
    assert ((got - reference).abs() <= error_bound(q, x)).all()
    if rows <= kernels.MAX_ROWS:  # activations already on the kernel's grid: no rounding at all
        steps = torch.randint(-127, 128, x.shape).float()
        steps[:, ::32] = 127  # every block's largest magnitude: its scale is exactly 1
        torch.testing.assert_close(q(steps), torch.nn.functional.linear(steps, q.weight, q.bias),
                                   rtol=1e-5, atol=1e-4)


def test_leading_dimensions_and_bf16_inputs_keep_their_shape_and_dtype() -> None:
    q = quant.Int8Linear.from_weight(torch.randn(20, 40))
    x = torch.randn(1, 1, 40)
    assert q(x).shape == (1, 1, 20)
    assert q(x.bfloat16()).dtype == torch.bfloat16


def test_quantize_swaps_the_matrices_and_keeps_the_embeddings() -> None:
    from mypt.config import ModelConfig

    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100, dropout=0.0,
                      position="rope", mlp="swiglu")
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        before, _ = model(idx)
    quant.quantize(model)
    layers = [m for m in model.modules() if isinstance(m, quant.Int8Linear)]
    assert len(layers) == 2 * 4 + 1  # c_attn, attn c_proj, c_fc, mlp c_proj per block, and the tied head
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert model.transformer.wte.weight.dtype == torch.float32
    assert model.new_cache(1, torch.device("cpu"), torch.float32).head is None  # the int8 head runs itself
    with torch.no_grad():
        after, _ = model(idx)
        cache = model.new_cache(1, torch.device("cpu"), torch.float32)
        cached = model.next_logits(idx, cache)  # prefill: the dequantised path, then the head's one row
        step = model.next_logits(idx[:, :1], cache)  # one row: the kernel
        full, _ = model(torch.cat([idx, idx[:, :1]], dim=1))
    torch.testing.assert_close(after, before, atol=0.05, rtol=0)
    torch.testing.assert_close(cached, after[:, -1], atol=0.01, rtol=0)
    torch.testing.assert_close(step, full[:, -1], atol=0.02, rtol=0)


def test_a_trained_model_loses_under_one_percent_and_decodes_alike(ckpts: Path) -> None:
    text = (ckpts.parent / "held_out.txt").read_text(encoding="utf-8")
    fp32 = load_model("chars", ckpts, device="cpu")
    int8 = load_model("chars", ckpts, device="cpu", quantize="int8")
    assert isinstance(int8.model.lm_head, quant.Int8Linear) and int8.num_params == fp32.num_params
    loss32, loss8 = fp32.evaluate(text).loss, int8.evaluate(text).loss
    assert loss32 < 2.6  # trained: well below a uniform guess over its ~65 characters (4.2)
    assert abs(loss8 - loss32) / loss32 < 0.01
    a = fp32.generate(PROMPT, max_new_tokens=60, temperature=0)  # past block_size: the context slides
    b = int8.generate(PROMPT, max_new_tokens=60, temperature=0)
    agree = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    assert agree >= 20, (a, b)


def test_generate_eval_and_compare_accept_quantize(capsys: pytest.CaptureFixture, ckpts: Path) -> None:
    base = ["--checkpoints_dir", str(ckpts), "--device", "cpu"]
    expected = load_model("chars", ckpts, device="cpu", quantize="int8").generate(
        PROMPT, max_new_tokens=30, temperature=0)
    assert run_command("generate", ["--model_name", "chars", "--prompt", PROMPT, "--max_new_tokens", "30",
                                    "--temperature", "0", "--quantize", "int8", *base]) == 0
    assert capsys.readouterr().out == PROMPT + expected + "\n"
    held_out = str(ckpts.parent / "held_out.txt")
    rows = {}
    for flags in ([], ["--quantize", "int8"]):
        assert run_command("eval", ["--model_name", "chars", "--input_file", held_out, *flags, *base]) == 0
        rows[bool(flags)] = capsys.readouterr().out.splitlines()[-1].split()
    assert rows[True][2] == rows[False][2]  # the architecture's parameters, however they are stored
    loss32, loss8 = float(rows[False][5]), float(rows[True][5])
    assert loss8 != loss32 and abs(loss8 - loss32) / loss32 < 0.01
    assert run_command("compare", ["--model_name", "chars", "--prompt", PROMPT, "--max_new_tokens", "30",
                                   "--temperature", "0", "--seed", "1", "--quantize", "int8", *base]) == 0
    assert PROMPT + expected in capsys.readouterr().out


def test_bad_quantize_values_and_devices_exit_2(ckpts: Path) -> None:
    base = ["--model_name", "chars", "--checkpoints_dir", str(ckpts)]
    r = run_cli(*base, "--quantize", "int4", script="generate.py", cwd=ckpts.parent)
    assert r.returncode == 2 and "--quantize: invalid choice: 'int4'" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(MyPTError, match="--quantize int8 runs on CPUs only .* not on cuda:0; pass --device cpu"):
        quant.check_kind("int8", torch.device("cuda:0"))  # (this machine may have no GPU to load onto)
    with pytest.raises(MyPTError, match="'int4' is not one of int8"):
        load_model("chars", ckpts, device="cpu", quantize="int4")


def test_without_a_compiler_int8_still_runs_and_says_so_once(tmp_path: Path, ckpts: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"CXX": str(tmp_path / "no-such-compiler"), "MYPT_KERNEL_DIR": str(tmp_path / "kernels"),
           "OMP_NUM_THREADS": "1"}
    args = ["--model_name", "chars", "--checkpoints_dir", str(ckpts), "--prompt", PROMPT, "--max_new_tokens", "20",
            "--temperature", "0", "--quantize", "int8"]
    r = run_cli(*args, script="generate.py", cwd=ckpts.parent, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("MyPT's int8 kernel is not available here (no C++ compiler") == 1
    assert not (tmp_path / "kernels").exists()
    monkeypatch.setattr(kernels, "_loaded", lambda: (None, "off"))  # the same dequantising path in this process
    dequantised = load_model("chars", ckpts, device="cpu", quantize="int8")
    assert r.stdout == PROMPT + dequantised.generate(PROMPT, max_new_tokens=20, temperature=0) + "\n"


@pytest.mark.slow
def test_mypt_serve_accepts_quantize(ckpts: Path) -> None:
    httpx = require("httpx")
    from mypt.cli.serve import bind

    port = bind("127.0.0.1", 0).getsockname()[1]
    expected = load_model("chars", ckpts, device="cpu", quantize="int8").generate(
        PROMPT, max_new_tokens=10, temperature=0)
    cmd = [sys.executable, "-m", "mypt", "serve", "--model_name", "chars", "--checkpoints_dir", str(ckpts),
           "--port", str(port), "--log_level", "warning", "--quantize", "int8"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            try:
                httpx.get(url + "/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.2)
        body = {"model": "chars", "prompt": PROMPT, "max_tokens": 10, "temperature": 0}
        got = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        assert got["choices"][0]["text"] == expected
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
