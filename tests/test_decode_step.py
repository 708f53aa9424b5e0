"""The fused batch-1 decoding step (mypt.decode_step, csrc/decode.cpp) against the eager path."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from mypt import kernels, quant
from mypt.config import ModelConfig
from mypt.decode_step import MAX_TOKENS
from mypt.model import GPT
from mypt.ops import lay_out_for_decoding
from mypt.sampling import SamplingConfig, generate_ids

VOCAB, BLOCK = 97, 24
VARIANTS = {
    "gpt2": dict(),  # learned positions, LayerNorm with biases, GELU, tied
    "modern": dict(position="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, n_kv_head=2, bias=False,
                   tie_embeddings=False),
    "swiglu-layernorm": dict(position="rope", mlp="swiglu", qk_norm=True, bias=False),
    "learned-rmsnorm-mqa": dict(norm="rmsnorm", n_kv_head=1),
}
CPU = torch.device("cpu")


def model(variant: str, weights: str = "fp32", seed: int = 0) -> GPT:
    """A 2-layer, 64-wide model laid out for decoding, its norms and biases moved off their
    initial values (so a norm's gain or a bias left out would show)."""
    torch.manual_seed(seed)
    m = GPT(ModelConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=4, n_embd=64, dropout=0.0,
                        **VARIANTS[variant]))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "ln" in name or "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
            if name.endswith("c_proj.weight"):
                p.normal_(0, 0.05)
    m.eval()
    if weights == "int8":
        quant.quantize(m, "int8")
    return lay_out_for_decoding(m)


def assert_close(a: torch.Tensor, b: torch.Tensor, weights: str) -> None:
    """fp32: to the last bits. int8: the kernel rounds the activations to int8 in blocks of 32
    (the eager path for more than kernels.MAX_ROWS rows multiplies them unrounded), so a last-bit
    difference in a layer's input can move a value by a step of its block's scale, and this
    random model's norms amplify it; the whole stays within 3% (a wrong scale, bias or position
    is off by far more)."""
    if weights == "fp32":
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    else:
        assert a.shape == b.shape and float((a - b).norm() / b.norm()) < 0.03


@pytest.mark.parametrize("weights", ["fp32", "int8"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_step_gives_the_eager_paths_hidden_states_and_cache(variant: str, weights: str, batch: int) -> None:
    """Token by token, in the last row of a cache of `batch` rows, past block_size (a rotary row
    wraps around): the same final hidden states and the same keys and values as eager PyTorch."""
    m = model(variant, weights)
    fused, eager = (m.new_cache(batch, CPU, torch.float32) for _ in range(2))
    assert fused.decode_step is not None
    eager.decode_step = None
    rows = torch.tensor([batch - 1]) if batch > 1 else None
    torch.manual_seed(1)
    steps = 2 * BLOCK if m.config.position == "rope" else BLOCK - 6
    with torch.no_grad():
        prompt = torch.randint(0, VOCAB, (1, 5))
        m.next_hidden(prompt, fused, rows), m.next_hidden(prompt, eager, rows)
        for _ in range(steps):
            token = torch.randint(0, VOCAB, (1, 1))
            a, b = m.next_hidden(token, fused, rows), m.next_hidden(token, eager, rows)
            assert a.shape == b.shape == (1, 64)
            assert_close(a, b, weights)
    assert fused.pos.tolist() == eager.pos.tolist() and int(fused.pos[batch - 1]) == 5 + steps
    assert_close(fused.k, eager.k, weights)
    assert_close(fused.v, eager.v, weights)


@pytest.mark.parametrize("weights", ["fp32", "int8"])
@pytest.mark.parametrize("variant", ["modern", "learned-rmsnorm-mqa"])
def test_several_tokens_at_once_as_eager(variant: str, weights: str) -> None:
    """Feeds of 2 .. MAX_TOKENS tokens (a token and its drafts, a short prompt) with the hidden
    states after each of the last few: as eager PyTorch, also where a full rotary row wraps
    around within one feed (each token sees the block_size positions ending at itself)."""
    m = model(variant, weights, seed=2)
    fused, eager = (m.new_cache(2, CPU, torch.float32) for _ in range(2))
    eager.decode_step = None
    rows, generator = torch.tensor([1]), torch.Generator().manual_seed(4)
    sizes = [MAX_TOKENS, 1, 5, 2, 9, 3, 7] * (3 if m.config.position == "rope" else 1)
    with torch.no_grad():
        for T in sizes[:None if m.config.position == "rope" else 4]:
            idx = torch.randint(0, VOCAB, (1, T), generator=generator)
            last = min(T, 3)
            a, b = m.next_hidden(idx, fused, rows, last=last), m.next_hidden(idx, eager, rows, last=last)
            assert a.shape == b.shape == (1, last, 64)
            assert_close(a, b, weights)
    assert fused.pos.tolist() == eager.pos.tolist()
    assert int(fused.pos[1]) > (2 * BLOCK if m.config.position == "rope" else BLOCK // 2)
    assert_close(fused.k, eager.k, weights)


@pytest.mark.parametrize("weights", ["fp32", "int8"])
@pytest.mark.parametrize("variant", ["modern", "gpt2"])
def test_a_step_of_several_rows_as_eager(variant: str, weights: str) -> None:
    """A decoding step of a server: a few rows of a cache at their own lengths (rows between them
    untouched), one token each, then two rows with two tokens each (drafts), as eager PyTorch."""
    m = model(variant, weights, seed=5)
    fused, eager = (m.new_cache(6, CPU, torch.float32) for _ in range(2))
    eager.decode_step = None
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for row, length in ((1, 3), (3, 7), (4, 1), (0, 2)):  # prompts of their own lengths
            prompt = torch.randint(0, VOCAB, (1, length), generator=generator)
            m.next_hidden(prompt, fused, torch.tensor([row])), m.next_hidden(prompt, eager, torch.tensor([row]))
        rows = torch.tensor([4, 1, 3])
        steps = 2 * BLOCK if m.config.position == "rope" else BLOCK - 12
        for _ in range(steps):
            idx = torch.randint(0, VOCAB, (3, 1), generator=generator)
            a, b = m.next_hidden(idx, fused, rows), m.next_hidden(idx, eager, rows)
            assert a.shape == b.shape == (3, 64)
            assert_close(a, b, weights)
        idx = torch.randint(0, VOCAB, (2, 2), generator=generator)
        a, b = (m.next_hidden(idx, c, torch.tensor([3, 0]), last=2) for c in (fused, eager))
        assert a.shape == b.shape == (2, 2, 64)
        assert_close(a, b, weights)
    assert fused.pos.tolist() == eager.pos.tolist() and fused.pos[[2, 5]].tolist() == [0, 0]
    assert_close(fused.k, eager.k, weights)
    assert_close(fused.v, eager.v, weights)


@pytest.mark.parametrize("variant", ["gpt2", "modern"])
def test_greedy_text_is_the_same_with_and_without_the_fused_step(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past block_size for both position kinds (a learned-position window is refilled by the eager path)."""
    m = model(variant, seed=3)
    cfg = SamplingConfig(max_new_tokens=3 * BLOCK, temperature=0)
    fused = list(generate_ids(m, [5, 6, 7], cfg, vocab_size=VOCAB, seed=0))
    monkeypatch.setenv("MYPT_DECODE_STEP", "0")
    assert m.new_cache(1, CPU, torch.float32).decode_step is None
    eager = list(generate_ids(m, [5, 6, 7], cfg, vocab_size=VOCAB, seed=0))
    assert len(fused) == 3 * BLOCK and fused == eager


def test_fused_step_steps_aside_where_it_does_not_apply() -> None:
    m = model("modern")
    assert m.new_cache(1, CPU, torch.bfloat16).decode_step is None  # a bf16 cache: the eager path
    plain = GPT(m.config).eval()  # not laid out for decoding: nn.Linear layers (a model that may train)
    assert plain.new_cache(1, CPU, torch.float32).decode_step is None
    m.train()
    assert m.new_cache(1, CPU, torch.float32).decode_step is None
    m.eval()
    cache = m.new_cache(2, CPU, torch.float32)
    step = cache.decode_step
    assert step is not None
    assert step.run(torch.tensor([[1]]), cache, None) is None  # a cache of two rows: rows None means both
    big = m.new_cache(MAX_TOKENS + 1, CPU, torch.float32)
    many = torch.ones(MAX_TOKENS + 1, 1, dtype=torch.long)  # more rows than a call takes: torch's products
    assert big.decode_step.run(many, big, None) is None
    with pytest.raises(ValueError, match="shape it was planned for"):
        big.decode_step.run(many, cache, None)
    longer = torch.ones(1, MAX_TOKENS + 1, dtype=torch.long)  # a longer prompt: torch's matrix products
    assert step.run(longer, cache, torch.tensor([0])) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert step.run(torch.tensor([[1]]), cache, torch.tensor([0])) is None
    assert step.run(torch.tensor([[VOCAB]]), cache, torch.tensor([0])) is None  # out of range: eager raises
    calls = []  # a forward hook (a debugger's, a test's) runs only where the modules do: the eager path
    handle = m.transformer.h[1].mlp.register_forward_hook(lambda *_: calls.append(1))
    assert step.run(torch.tensor([[1]]), cache, torch.tensor([0])) is None
    m.next_hidden(torch.tensor([[1]]), cache, torch.tensor([0]))
    handle.remove()
    assert calls == [1] and cache.pos.tolist() == [1, 0]
    cache.reset()
    with pytest.raises(IndexError):
        m.next_hidden(torch.tensor([[VOCAB]]), cache, torch.tensor([0]))
    assert cache.pos.tolist() == [0, 0]
    learned = model("gpt2")
    full = learned.new_cache(1, CPU, torch.float32, capacity=4)
    learned.next_hidden(torch.tensor([[1, 2, 3, 4]]), full)
    with pytest.raises(ValueError, match="at most 4 tokens"):  # a learned-position row cannot grow
        learned.next_hidden(torch.tensor([[5]]), full)



def test_a_dropped_cache_is_freed_at_once() -> None:
    """The step is kept by its cache, not the other way round: no reference cycle that would
    hold a generation's keys and values until the garbage collector's next full pass."""
    m = model("modern")
    cache = m.new_cache(1, CPU, torch.float32)
    assert cache.decode_step is not None
    ref = weakref.ref(cache)
    gc.disable()
    try:
        del cache
        assert ref() is None
    finally:
        gc.enable()


def test_bad_rows_and_replaced_weights_take_the_eager_path() -> None:
    """Arguments the eager path refuses are left to it (nothing written out of bounds), and
    weights assigned anew after the cache was made are read by the eager path (the step's
    pointers are to the old ones)."""
    m = model("modern")
    cache = m.new_cache(2, CPU, torch.float32)
    step, token = cache.decode_step, torch.tensor([[1]])
    for rows in (torch.tensor([-1]), torch.tensor([2]), torch.tensor([[0]]), torch.tensor([0, 1]), [0]):
        assert step.run(token, cache, rows) is None
    with pytest.raises(IndexError):
        m.next_hidden(token, cache, torch.tensor([2]))
    assert cache.pos.tolist() == [0, 0] and not cache.k.any()
    other = model("modern", seed=9)
    with torch.no_grad():
        eager = other.new_cache(1, CPU, torch.float32)
        eager.decode_step = None
        expected = other.next_hidden(torch.tensor([[1, 2, 3]]), eager)
        fused = m.new_cache(1, CPU, torch.float32)
        m.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, assign=True)
        m.tie_weights()
        torch.testing.assert_close(m.next_hidden(torch.tensor([[1, 2, 3]]), fused), expected)
    assert fused.decode_step.stale


@pytest.mark.parametrize("default", [torch.float64, torch.bfloat16])
def test_another_default_dtype_changes_nothing(default: torch.dtype) -> None:
    m = model("gpt2")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        fused, eager = (m.new_cache(1, CPU, torch.float32) for _ in range(2))
        eager.decode_step = None
        with torch.no_grad():
            a, b = (m.next_hidden(torch.tensor([[3, 4]]), c) for c in (fused, eager))
    finally:
        torch.set_default_dtype(previous)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["modern", "gpt2"])
def test_a_step_of_many_rows_attends_row_by_row_as_sdpa(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """More rows than the fused step takes, at their own lengths (some past block_size in a
    rotary ring), fed all together and as a subset: each row's attention over only its own slots
    in MyPT's kernel (CacheStep.by_row) gives what torch's attention over the padded rows does."""
    m = model(variant, seed=7)
    rows_n = MAX_TOKENS + 4
    fast, slow = (m.new_cache(rows_n, CPU, torch.float32) for _ in range(2))
    fast.decode_step = slow.decode_step = None  # the eager path, whose attention is compared
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for r in range(rows_n):
            prompt = torch.randint(0, VOCAB, (1, 1 + r % 9), generator=generator)
            m.next_hidden(prompt, fast, torch.tensor([r])), m.next_hidden(prompt, slow, torch.tensor([r]))
        subset = torch.tensor([0, 3, 4, 9, 17, 18, 19])
        steps = 2 * BLOCK if m.config.position == "rope" else BLOCK - 12
        for i in range(steps):
            rows = subset if i % 3 == 2 else None
            idx = torch.randint(0, VOCAB, (rows_n if rows is None else len(rows), 1), generator=generator)
            a = m.next_hidden(idx, fast, rows)
            with monkeypatch.context() as patch:
                patch.setattr(kernels, "available", lambda: False)
                assert not slow.step(rows, 1).by_row
                b = m.next_hidden(idx, slow, rows)
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        assert fast.step(None, 1).by_row and not fast.step(None, 2).by_row
    assert fast.pos.tolist() == slow.pos.tolist()
    torch.testing.assert_close(fast.k, slow.k, atol=1e-5, rtol=0)
