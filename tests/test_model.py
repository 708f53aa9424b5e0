"""The GPT model: exact parameter accounting, the fused loss head, the KV cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

from mypt import kernels
from mypt.config import ModelConfig, load_model_config
from mypt.estimate import count_params, estimate_memory, flops_per_token, param_breakdown
from mypt.model import GPT, RMSNorm, apply_rope, rope_table
from mypt.ops import linear_cross_entropy, row_max, squared_relu

PRESETS = sorted(p.name for p in (REPO / "configs").glob("*.json"))
EXPECTED = {"tiny.json": 11_454_144, "small.json": 30_036_864, "150M.json": 152_101_632,
            "200M.json": 199_472_000, "250M.json": 253_133_824}


VARIANTS_FOR_COUNTS = {
    "gpt2": {},
    "rope": {"position": "rope"},
    "rmsnorm": {"norm": "rmsnorm"},
    "swiglu": {"mlp": "swiglu", "intermediate_size": 96},
    "relu2": {"mlp": "relu2"},
    "qk_norm_ln": {"qk_norm": True},
    "gqa": {"n_kv_head": 2},
    "mqa": {"n_kv_head": 1},
    "untied": {"tie_embeddings": False, "zero_init": True},
    "llama": {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2, "tie_embeddings": False},
    "qwen3": {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2, "qk_norm": True},
}


def formula(cfg: ModelConfig) -> int:
    """The GPT-2 count with a tied head and no biases (the issue's formula)."""
    c = cfg.n_embd
    return cfg.vocab_size * c + cfg.block_size * c + cfg.n_layer * (12 * c * c + 2 * c) + c


@pytest.mark.parametrize("name", PRESETS)
def test_count_equals_unique_parameters_of_the_built_model(name):
    cfg = load_model_config(REPO / "configs" / name)
    with torch.device("meta"):
        model = GPT(cfg)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert count_params(cfg) == sum(unique.values()) == general_formula(cfg)
    if name in EXPECTED:
        assert count_params(cfg) == EXPECTED[name] == formula(cfg)


def general_formula(cfg: ModelConfig) -> int:
    """The count of every variant: written out field by field, independently of the model code."""
    c, hs, nh, nkv, hidden = cfg.n_embd, cfg.head_dim, cfg.n_head, cfg.kv_heads, cfg.hidden_size
    b = 1 if cfg.bias else 0
    norm = c * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    attn = c * (nh + 2 * nkv) * hs + c * c + b * ((nh + 2 * nkv) * hs + c) + (2 * hs if cfg.qk_norm else 0)
    up = 2 * hidden if cfg.mlp == "swiglu" else hidden
    mlp = c * up + hidden * c + b * (up + c)
    layer = attn + mlp + 2 * norm
    embeddings = cfg.vocab_size * c * (1 if cfg.tie_embeddings else 2)
    positions = cfg.block_size * c if cfg.position == "learned" else 0
    return embeddings + positions + cfg.n_layer * layer + norm


@pytest.mark.parametrize("variant", sorted(VARIANTS_FOR_COUNTS))
@pytest.mark.parametrize("bias", [False, True])
def test_every_variant_counts_exactly_what_it_builds(variant, bias):
    cfg = ModelConfig(n_layer=3, n_head=4, n_embd=64, block_size=16, vocab_size=100, bias=bias,
                      **VARIANTS_FOR_COUNTS[variant])
    with torch.device("meta"):
        model = GPT(cfg)
    unique = {id(p): p.numel() for p in model.parameters()}
    parts = param_breakdown(cfg)
    assert count_params(cfg) == sum(unique.values()) == general_formula(cfg) == parts["total"]
    assert parts["token_embedding"] + parts["position_embedding"] + parts["layers"] + parts["final_norm"] \
        + parts["lm_head"] == parts["total"]
    assert (model.lm_head.weight is model.transformer.wte.weight) == cfg.tie_embeddings
    lookups = sum(m.weight.numel() for m in model.modules()
                  if isinstance(m, torch.nn.Embedding) and m.weight is not model.lm_head.weight)
    assert flops_per_token(cfg) == 6 * (parts["total"] - lookups) + 12 * 3 * 64 * 16
    matrices = sum(p.numel() for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2)
    assert parts["hidden_matrices"] == matrices
    adamw, muon = (estimate_memory(cfg, 4, "fp32", optimizer=o) for o in ("adamw", "muon"))
    assert adamw.optimizer - muon.optimizer == 4 * matrices  # Muon keeps one buffer, AdamW two


@pytest.mark.parametrize("tie", [False, True])
def test_zero_init_starts_the_residual_projections_and_an_untied_head_at_zero(tie):
    def zero_names(zero_init: bool) -> set[str]:
        torch.manual_seed(0)
        model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=8, vocab_size=50, tie_embeddings=tie,
                                zero_init=zero_init))
        return {n for n, p in model.named_parameters() if p.dim() == 2 and not p.any()}

    projections = {f"transformer.h.{i}.{part}.c_proj.weight" for i in range(2) for part in ("attn", "mlp")}
    assert zero_names(True) == projections | (set() if tie else {"lm_head.weight"})
    assert zero_names(False) == set()  # GPT-2's initialisation: nothing starts at zero


def test_breakdown_adds_up_and_head_is_tied():
    cfg = load_model_config("tiny")
    parts = param_breakdown(cfg)
    assert parts["token_embedding"] + parts["position_embedding"] + parts["layers"] + parts["final_norm"] \
        == parts["total"]
    assert parts["layers"] == cfg.n_layer * parts["per_layer"]
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=50))
    assert model.lm_head.weight is model.transformer.wte.weight


def test_bias_adds_the_bias_parameters():
    a = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=8, vocab_size=50, bias=False)
    b = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=8, vocab_size=50, bias=True)
    per_layer_biases = 3 * 32 + 32 + 4 * 32 + 32 + 2 * 32  # c_attn, c_proj, c_fc, mlp c_proj, 2 LayerNorms
    assert count_params(b) - count_params(a) == 2 * per_layer_biases + 32


@pytest.mark.parametrize("rows", [7, 1500])  # below and above one loss chunk
def test_fused_loss_head_matches_plain_cross_entropy(rows):
    torch.manual_seed(0)
    x = torch.randn(rows, 48, dtype=torch.float64, requires_grad=True)
    w = torch.randn(300, 48, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 300, (rows,))
    loss = linear_cross_entropy(x, w, t)
    gx, gw = torch.autograd.grad(loss * 3.0, (x, w))
    ref = F.cross_entropy(x @ w.T, t)
    rx, rw = torch.autograd.grad(ref * 3.0, (x, w))
    assert torch.allclose(loss, ref, atol=1e-10)
    assert torch.allclose(gx, rx, atol=1e-10) and torch.allclose(gw, rw, atol=1e-10)
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(x, w, t), ref, atol=1e-10)


@pytest.mark.parametrize("rows", [7, 1500])
def test_fused_loss_head_with_a_frozen_weight_gives_the_input_gradient_alone(rows):
    """LoRA freezes the output layer: the input gradient is the same, the weight gets none, and
    the (vocab, n_embd) weight-gradient product is not made (fewer floating-point operations)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    x = torch.randn(rows, 48, dtype=torch.float64, requires_grad=True)
    w = torch.randn(300, 48, dtype=torch.float64)
    t = torch.randint(-1, 300, (rows,))  # some ignored
    flops = {}
    for frozen in (True, False):
        w.requires_grad_(not frozen)
        with FlopCounterMode(display=False) as counter:
            loss = linear_cross_entropy(x, w, t)
            loss.backward()
        flops[frozen] = counter.get_total_flops()
        assert (w.grad is None) == frozen
        gx, x.grad, w.grad = x.grad, None, None
        ref = F.cross_entropy(x @ w.detach().T, t, ignore_index=-1)
        (rx,) = torch.autograd.grad(ref, (x,))
        assert torch.allclose(loss, ref, atol=1e-10) and torch.allclose(gx, rx, atol=1e-10)
    assert flops[False] - flops[True] >= 2 * 300 * 48 * min(rows, 1024)  # (FlopCounterMode skips addmm_)


@pytest.mark.parametrize("rows", [7, 1500])
def test_fused_loss_head_trains_a_row_delta_of_a_frozen_weight(rows):
    """LoRA's trained chat rows: the loss and gradients are those of weight + delta at the rows,
    the frozen weight gets no gradient, and delta's comes from its rows alone."""
    torch.manual_seed(0)
    x = torch.randn(rows, 48, dtype=torch.float64, requires_grad=True)
    w = torch.randn(300, 48, dtype=torch.float64)
    ids = torch.tensor([5, 17, 299])
    delta = torch.randn(3, 48, dtype=torch.float64, requires_grad=True)
    t = torch.randint(-1, 300, (rows,))
    t[:3] = ids  # the rows are targets too
    loss = linear_cross_entropy(x, w, t, ids, delta)
    gx, gd = torch.autograd.grad(loss * 3.0, (x, delta))
    ref = F.cross_entropy(x @ w.index_add(0, ids, delta).T, t, ignore_index=-1)
    rx, rd = torch.autograd.grad(ref * 3.0, (x, delta))
    assert torch.allclose(loss, ref, atol=1e-10)
    assert torch.allclose(gx, rx, atol=1e-10) and torch.allclose(gd, rd, atol=1e-10) and gd.abs().sum() > 0
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(x, w, t, ids, delta), ref, atol=1e-10)


def test_fused_loss_head_in_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(0)
    x = torch.randn(512, 64, requires_grad=True)
    w = (torch.randn(1000, 64) * 0.1).requires_grad_()
    t = torch.randint(0, 1000, (512,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, t)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(x @ w.T, t)
    assert abs(loss.item() - ref.item()) / ref.item() < 0.01


def test_forward_loss_equals_cross_entropy_of_returned_logits():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=70, dropout=0.0)).eval()
    idx = torch.randint(0, 70, (3, 16))
    logits, none = model(idx)
    _, loss = model(idx, idx)
    assert none is None and logits.shape == (3, 16, 70)
    assert torch.allclose(loss, F.cross_entropy(logits.flatten(0, 1), idx.flatten()), atol=1e-5)


VARIANTS = {
    "gpt2": {},
    "rope": {"position": "rope"},
    "llama": {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2, "tie_embeddings": False},
    "qwen3": {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 1, "qk_norm": True},
    "relu2": {"position": "rope", "mlp": "relu2", "intermediate_size": 48, "zero_init": True},
}


def varied_model(block_size: int = 8, vocab: int = 50, **fields) -> GPT:
    """A small model of the variant with random weights large enough for sharp, varied logits."""
    torch.manual_seed(0)
    shape = dict(n_layer=2, n_head=4, n_embd=32, block_size=block_size, vocab_size=vocab, dropout=0.0)
    cfg = ModelConfig(**{**shape, **fields})
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = 1.0 if "norm" in name or "ln" in name else 0.0
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 2 else 0.2) + gain)
    return model


def full_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Every position's logits from one uncached forward (sliding windows past block_size)."""
    with torch.no_grad():
        return model(idx)[0]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kv_cache_gives_the_same_logits_as_a_full_forward(variant):
    model = varied_model(block_size=16, **VARIANTS[variant])
    idx = torch.randint(0, 50, (2, 12))
    full = full_logits(model, idx)
    cache = model.new_cache(2, torch.device("cpu"), torch.float32)
    steps = [model.next_logits(idx[:, :5], cache)]  # prefill 5, then 3 at once, then one at a time
    steps.append(model.next_logits(idx[:, 5:8], cache))
    steps += [model.next_logits(idx[:, i:i + 1], cache) for i in range(8, 12)]
    positions = [4, 7, 8, 9, 10, 11]
    for logits, pos in zip(steps, positions, strict=True):
        torch.testing.assert_close(logits, full[:, pos], atol=1e-5, rtol=1e-5)
    assert cache.pos.tolist() == [12, 12]


@pytest.mark.parametrize("variant", [v for v in sorted(VARIANTS) if v != "gpt2"])
def test_rotary_cache_slides_past_block_size_like_the_uncached_forward(variant):
    """A full row overwrites its oldest entry; prefills that wrap (7 > 8 - 5) attend side by side."""
    model = varied_model(block_size=8, **VARIANTS[variant])
    idx = torch.randint(0, 50, (1, 40))
    full = full_logits(model, idx)  # sliding-window attention over all 40 positions
    cache = model.new_cache(1, torch.device("cpu"), torch.float32)
    chunks = [5, 7, 1, 1, 12, 3, 1, 10]  # the 12 is longer than a whole row
    at = 0
    for n in chunks:
        logits = model.next_logits(idx[:, at:at + n], cache)
        at += n
        torch.testing.assert_close(logits, full[:, at - 1], atol=1e-5, rtol=1e-5)
    assert int(cache.pos[0]) == 40


def test_uncached_forward_past_block_size_sees_only_the_last_block_size_tokens():
    model = varied_model(block_size=8, position="rope", n_layer=1)
    a = torch.randint(0, 50, (1, 20))
    b = a.clone()
    b[0, :12] = (b[0, :12] + 1) % 50  # differs only outside the last token's window of 8
    assert torch.equal(full_logits(model, a)[0, -1], full_logits(model, b)[0, -1])
    assert not torch.equal(full_logits(model, a)[0, -9], full_logits(model, b)[0, -9])


@pytest.mark.parametrize("variant", ["gpt2", "llama", "qwen3"])
def test_batched_rows_at_different_lengths_match_single_sequences(variant):
    """Rows of one cache hold different requests: prefill and decode chosen rows, reset a row."""
    model = varied_model(block_size=8, **VARIANTS[variant])
    rotary = model.config.position == "rope"
    seqs = [torch.randint(0, 50, (1, n)) for n in (5, 3, 7 if not rotary else 20)]
    cache = model.new_cache(3, torch.device("cpu"), torch.float32)
    for row in (2, 0):  # row 1 stays empty meanwhile
        model.next_logits(seqs[row][:, :-1], cache, rows=torch.tensor([row]))
    assert cache.pos.tolist() == [4, 0, seqs[2].size(1) - 1]
    last = torch.cat((seqs[2][:, -1:], seqs[0][:, -1:]))  # one decode step over rows 2 and 0, in that order
    logits = model.next_logits(last, cache, rows=torch.tensor([2, 0]))
    torch.testing.assert_close(logits[0], full_logits(model, seqs[2])[0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], full_logits(model, seqs[0])[0, -1], atol=1e-5, rtol=1e-5)
    cache.reset(torch.tensor([0]))  # row 0 takes a new request; row 2 keeps its content
    fresh = torch.randint(0, 50, (1, 6))
    torch.testing.assert_close(model.next_logits(fresh, cache, rows=torch.tensor([0]))[0],
                               full_logits(model, fresh)[0, -1], atol=1e-5, rtol=1e-5)
    more = torch.randint(0, 50, (1, 1))
    torch.testing.assert_close(model.next_logits(more, cache, rows=torch.tensor([2]))[0],
                               full_logits(model, torch.cat((seqs[2], more), 1))[0, -1], atol=1e-5, rtol=1e-5)
    assert cache.pos.tolist() == [6, 0, seqs[2].size(1) + 1]


@pytest.mark.parametrize("variant", ["gpt2", "qwen3"])
def test_rows_read_in_place_or_gathered_give_each_row_its_own_logits(variant, monkeypatch):
    """A step over some rows reads the cache rows between them in place (their span) when it is at
    most twice as many rows, else gathers them; rows in between, at other lengths, are left as they were.
    (Without MyPT's kernels: with them, one token a row attends row by row, test_decode_step.)"""
    monkeypatch.setattr(kernels, "available", lambda: False)
    model = varied_model(block_size=16, **VARIANTS[variant])
    seqs = [torch.randint(0, 50, (1, n)) for n in (6, 4, 9, 3, 7)]
    cache = model.new_cache(5, torch.device("cpu"), torch.float32)
    for row, seq in enumerate(seqs):
        model.next_logits(seq, cache, rows=torch.tensor([row]))
    before = cache.k.clone(), cache.v.clone()
    for rows, T, in_place in (([3, 1], 2, True), ([0, 4], 1, False), ([4, 2, 3], 1, True)):
        assert (cache.step(torch.tensor(rows), T).span is not None) == in_place
        new = torch.randint(0, 50, (len(rows), T))
        logits = model.next_logits(new, cache, rows=torch.tensor(rows))
        for i, row in enumerate(rows):
            seqs[row] = torch.cat((seqs[row], new[i:i + 1]), 1)
            torch.testing.assert_close(logits[i], full_logits(model, seqs[row])[0, -1], atol=1e-5, rtol=1e-5)
        others = [r for r in range(5) if r not in rows]
        assert torch.equal(cache.k[:, others], before[0][:, others])
        assert torch.equal(cache.v[:, others], before[1][:, others])
        before = cache.k.clone(), cache.v.clone()
    assert cache.pos.tolist() == [s.size(1) for s in seqs]


def test_learned_position_cache_row_cannot_pass_block_size():
    model = varied_model(block_size=8)
    cache = model.new_cache(1, torch.device("cpu"), torch.float32)
    model.next_logits(torch.zeros(1, 8, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="block_size"):
        model.next_logits(torch.zeros(1, 1, dtype=torch.long), cache)


def test_a_smaller_cache_holds_what_it_was_made_for_and_no_more():
    model = varied_model(block_size=8, **VARIANTS["llama"])
    cache = model.new_cache(2, torch.device("cpu"), torch.float32, capacity=5)
    assert cache.k.shape[3] == 5 and not cache.ring
    idx = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(model.next_logits(idx, cache), full_logits(model, idx)[:, -1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at most 5 tokens"):
        model.next_logits(idx[:, :1], cache)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    """Recomputing block activations in backward (with dropout: the same masks) changes nothing."""
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, dropout=0.2)
    torch.manual_seed(0)
    model = GPT(cfg).train()
    x, y = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    block_calls = []
    model.transformer.h[0].register_forward_pre_hook(lambda *_: block_calls.append(1))
    results = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        block_calls.clear()
        torch.manual_seed(1)
        _, loss = model(x, y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        assert len(block_calls) == (2 if checkpointing else 1)  # recomputed in backward: checkpointing is on
    (plain_loss, plain), (ckpt_loss, ckpt) = results
    assert torch.equal(plain_loss, ckpt_loss)
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_cpu_rmsnorm_has_torchs_values_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 4, 16, dtype=torch.float64).transpose(1, 2)  # non-contiguous, as q and k are
    w = torch.randn(16, dtype=torch.float64)
    norm = RMSNorm(16, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(w)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    wb = w.clone().requires_grad_()
    ya, yb = norm(xa), F.rms_norm(xb, (16,), wb, 1e-6)
    torch.testing.assert_close(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(norm.weight.grad, wb.grad)


def test_rotary_attention_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    table = rope_table(16, 10000.0, 64, torch.device("cpu"))
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> float:
        return (apply_rope(q, table[m, None]) * apply_rope(k, table[n, None])).sum().item()

    assert score(3, 1) == pytest.approx(score(40, 38), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)
    torch.testing.assert_close(apply_rope(q, table[0, None]), q)  # position 0: no rotation


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab", [1024, 1000])
def test_loss_head_row_max_is_amax(dtype, vocab):
    t = (torch.randn(7, vocab) * 5).to(dtype)
    t[3, 700] = 99.0  # the largest value anywhere in a row
    assert torch.equal(row_max(t), t.amax(dim=1))


def test_squared_relu_with_and_without_autograd() -> None:
    """The same values whether a gradient is needed (its own backward) or not (decoding), and the
    gradient 2 relu(x)."""
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = squared_relu(x)
    y.sum().backward()
    assert torch.equal(y.detach(), F.relu(x.detach()) ** 2)
    assert torch.equal(x.grad, 2 * F.relu(x.detach()))
    with torch.inference_mode():
        assert torch.equal(squared_relu(x.detach()), y.detach())
        assert torch.equal(squared_relu(x), y.detach())
