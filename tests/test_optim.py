"""Optimizers (mypt.optim): Muon against torch's, the parameter split, state round trips, the
learning-rate scales, and the flag's rules (FSDP, resuming with another optimizer)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import snapshot, tiny_arch_flags
from forked_cli import run

from mypt import dist, optim
from mypt.config import ModelConfig, TrainConfig
from mypt.model import GPT
from mypt.optim import Muon, MuonAdamW, make_optimizer, zeropower
from mypt.trainer import Trainer, get_lr

MODERN = dict(position="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, n_kv_head=2, tie_embeddings=False,
              zero_init=True)
CPU = torch.device("cpu")


def tiny_model(**fields) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=60, dropout=0.0, **fields))


def matrices(seed: int, shapes: list[tuple[int, int]]) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in shapes]


def set_grads(params: list[torch.nn.Parameter], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


SHAPES = [(64, 32), (64, 32), (32, 96), (48, 48)]  # two share a shape: orthogonalised as one batch


def test_muon_in_bf16_takes_torch_muons_steps_and_state():
    ours, theirs = matrices(0, SHAPES), matrices(0, SHAPES)
    a = Muon(ours, lr=0.02, momentum=0.95, weight_decay=0.1, ns_dtype=torch.bfloat16)
    b = torch.optim.Muon(theirs, lr=0.02, momentum=0.95, weight_decay=0.1)
    for step in range(3):
        set_grads(ours, step)
        set_grads(theirs, step)
        a.step()
        b.step()
    for p, q, init in zip(ours, theirs, matrices(0, SHAPES), strict=True):
        assert (p - init).abs().max() > 0.01  # three real steps
        torch.testing.assert_close(p, q, rtol=0, atol=2e-5)  # bf16 rounding of a 0.02-sized update
    state = a.state_dict()
    b.load_state_dict(state)  # the same state format as torch.optim.Muon
    assert torch.equal(b.state[theirs[0]]["momentum_buffer"], a.state[ours[0]]["momentum_buffer"])


def test_fp32_orthogonalisation_is_the_float64_iteration():
    G = torch.randn(3, 40, 24, dtype=torch.float64)
    coefficients = (3.4445, -4.775, 2.0315)
    exact = zeropower(G, coefficients, 5, 1e-7, torch.float64)
    torch.testing.assert_close(zeropower(G, coefficients, 5, 1e-7, torch.float32).double(), exact,
                               rtol=0, atol=1e-5)
    singular = torch.linalg.svdvals(exact)
    assert singular.min() > 0.5 and singular.max() < 1.3  # roughly orthogonal, as Muon's iteration gives


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_orthogonalisation_dtype_is_chosen_per_machine(monkeypatch, fast_bf16):
    monkeypatch.setattr(dist, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert optim.orthogonalisation_dtype(CPU) == (torch.bfloat16 if fast_bf16 else torch.float32)
    opt = make_optimizer(tiny_model(**MODERN), TrainConfig(optimizer="muon"), CPU)
    assert opt.muon.ns_dtype == (torch.bfloat16 if fast_bf16 else torch.float32)


@pytest.mark.parametrize("tie", [True, False])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tie):
    model = tiny_model(**{**MODERN, "tie_embeddings": tie})
    opt = make_optimizer(model, TrainConfig(optimizer="muon", learning_rate=4e-3, muon_lr=0.04), CPU)
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["kind"] == "muon" for p in g["params"]}
    adamw = {names[id(p)] for g in opt.param_groups if g["kind"] == "adamw" for p in g["params"]}
    assert muon == {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert "transformer.wte.weight" in adamw and ("lm_head.weight" in adamw) != tie
    assert "transformer.h.0.attn.q_norm.weight" in adamw and not muon & adamw
    assert len(muon) + len(adamw) == len(list(model.parameters()))  # every parameter once
    assert {g["lr_scale"] for g in opt.param_groups} == {1.0, 10.0}


def test_plain_adamw_is_torchs_adamw_with_decay_on_matrices_only():
    opt = make_optimizer(tiny_model(), TrainConfig(weight_decay=0.3), CPU)
    assert type(opt) is torch.optim.AdamW
    assert [(g["weight_decay"], all(p.dim() >= 2 for p in g["params"])) for g in opt.param_groups] \
        == [(0.3, True), (0.0, False)]


def train_steps(model: GPT, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, 60, (3, 16), generator=g)
        _, loss = model(x, x.roll(1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_state_dict_round_trip_continues_bit_for_bit():
    tc = TrainConfig(optimizer="muon")
    model = tiny_model(**MODERN)
    opt = make_optimizer(model, tc, CPU)
    train_steps(model, opt, range(3))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train_steps(model, opt, range(3, 6))

    resumed = tiny_model(**MODERN)
    resumed.load_state_dict(saved_model)
    opt2 = make_optimizer(resumed, tc, CPU)
    opt2.load_state_dict(saved_opt)
    assert opt2.muon.state is opt2.state and opt2.muon.param_groups[0] is opt2.param_groups[0]
    train_steps(resumed, opt2, range(3, 6))
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_the_schedule_scales_muons_rate_with_adamws():
    tc = TrainConfig(optimizer="muon", learning_rate=2e-3, muon_lr=0.03, warmup_iters=3, max_iters=20)
    model = tiny_model(**MODERN)
    data = np.random.default_rng(0).integers(0, 60, 2000).astype(np.uint16)
    trainer = Trainer(model, make_optimizer(model, tc, CPU), data, data, 16, 2, tc, CPU, "fp32", dist.DistInfo())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train_step(5)
    lrs = {g["kind"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs == pytest.approx({"adamw": get_lr(5, tc), "muon": get_lr(5, tc) * 15})
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "c_fc" in n)


# ----------------------------------------------------------------------------- the CLI's rules


def test_fsdp_with_muon_is_one_clear_error_before_anything_is_written(tmp_path: Path, small_text: Path):
    (tmp_path / "checkpoints").mkdir()
    before = snapshot(tmp_path)
    r = run("--model_name", "m", *tiny_arch_flags(), "--tokenizer", "char", "--input_file", str(small_text),
            "--optimizer", "muon", "--fsdp", "--max_iters", "2", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--optimizer muon cannot run with --fsdp" in r.stderr
    assert snapshot(tmp_path) == before


def test_resuming_with_the_other_optimizer_is_refused(tmp_path: Path, small_text: Path):
    common = ("--model_name", "m", *tiny_arch_flags(), "--tokenizer", "char", "--input_file", str(small_text),
              "--eval_interval", "2", "--eval_iters", "1")
    assert run(*common, "--max_iters", "2", cwd=tmp_path).returncode == 0
    before = snapshot(tmp_path / "checkpoints")
    r = run(*common, "--max_iters", "4", "--optimizer", "muon", cwd=tmp_path)
    assert r.returncode == 2
    assert "trained with --optimizer adamw" in r.stderr and "resume with --optimizer adamw" in r.stderr
    assert snapshot(tmp_path / "checkpoints") == before


def test_bad_muon_flags_are_named(tmp_path: Path):
    r = run("--model_name", "m", "--muon_lr", "-1", "--muon_momentum", "1.5", cwd=tmp_path)
    assert r.returncode == 2
    assert "--muon_lr (-1.0) must be a number above 0" in r.stderr
    assert "--muon_momentum (1.5) must be at least 0 and below 1" in r.stderr


def test_a_muon_flag_without_muon_is_refused(tmp_path: Path, small_text: Path):
    before = snapshot(tmp_path)
    r = run("--model_name", "m", *tiny_arch_flags(), "--tokenizer", "char", "--input_file", str(small_text),
            "--muon_lr", "0.03", "--max_iters", "2", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "--muon_lr only applies to --optimizer muon, and this run uses --optimizer adamw" in r.stderr
    assert snapshot(tmp_path) == before
