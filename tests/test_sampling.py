"""Tests for mypt.sampling: settings, logits processing, the context window, token and text streams.

A randomly initialised 2-layer model stands in for a trained one: these tests are about the
decoding machinery, not the text.
"""

from __future__ import annotations

import math

import pytest
import torch

from mypt.config import ModelConfig
from mypt.errors import MyPTError
from mypt.kvcache import PrefixCache
from mypt.model import GPT
from mypt.sampling import (
    BOUNDS,
    Continuation,
    Decoder,
    SamplingConfig,
    StopFilter,
    TextStream,
    argmax_rows,
    generate_ids,
    penalize,
    pick_token,
    pick_tokens,
    window_start,
)
from mypt.tokenizers import CharTokenizer, GPT2Tokenizer

VOCAB = 40
ROTARY = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 1, "qk_norm": True}


def sharp_model(**fields) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=VOCAB, dropout=0.0, **fields)
    m = GPT(cfg).eval()
    with torch.no_grad():  # varied, sharp logits instead of the init's near-uniform ones
        for p in m.transformer.h.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
        m.transformer.wte.weight.mul_(10)
    return m


@pytest.fixture(scope="module")
def model() -> GPT:
    return sharp_model()


@pytest.fixture(scope="module")
def rotary() -> GPT:
    return sharp_model(**ROTARY)


def rotary_reference_greedy(model: GPT, prompt: list[int], n: int, vocab: int) -> list[int]:
    """Greedy decoding as the model defines it past block_size: one forward over the whole
    sequence (each token attends to the block_size tokens ending at itself), nothing dropped."""
    seq, out = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            logits, _ = model(torch.tensor([seq]))
        token = int(logits[0, -1, :vocab].argmax())
        seq.append(token)
        out.append(token)
    return out


def reference_greedy(model: GPT, prompt: list[int], n: int, vocab: int) -> list[int]:
    """Greedy decoding written independently: full forward over the window, same sliding rule."""
    block, seq, start = model.config.block_size, list(prompt), 0
    out = []
    for _ in range(n):
        if len(seq) - start > block:
            start = len(seq) - block // 2
        with torch.no_grad():
            logits, _ = model(torch.tensor([seq[start:]]))
        token = int(logits[0, -1, :vocab].argmax())
        seq.append(token)
        out.append(token)
    return out


def ids(model: GPT, prompt: list[int], seed: int = 0, vocab: int = VOCAB, **options) -> list[int]:
    return list(generate_ids(model, prompt, SamplingConfig(**options), vocab_size=vocab, seed=seed))


# ----------------------------------------------------------------------------- settings


def test_defaults_are_valid() -> None:
    cfg = SamplingConfig()
    assert cfg.temperature > 0 and cfg.use_cache


def test_every_bad_setting_is_reported_at_once() -> None:
    with pytest.raises(MyPTError) as e:
        SamplingConfig(max_new_tokens=-1, temperature=-0.5, top_k=-2, top_p=0.0, repetition_penalty=0.0,
                       stop=("",))
    msg = str(e.value)
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "stop"):
        assert name in msg


def test_a_setting_that_could_overflow_the_logits_is_refused_naming_it() -> None:
    """A repetition penalty of 1e-38 once passed and scaled a seen logit past float32's range."""
    logits, seen = torch.tensor([4.0, -4.0, 1.0]), torch.tensor([True, True, False])
    assert not torch.isfinite(penalize(logits, seen, 1e-38)).all()  # why the range matters
    for bad in ({"repetition_penalty": 1e-38}, {"repetition_penalty": 1e38}, {"temperature": 1e300},
                {"top_k": 10**12}, {"max_new_tokens": 10**12}, {"seed": 2**64}, {"stop": ("x" * 1001,)},
                {"use_cache": "no"}, {"top_p": float("nan")}, {"temperature": True}, {"temperature": 10**400},
                {"max_new_tokens": 5.0}):
        field = next(iter(bad))
        with pytest.raises(MyPTError, match=rf"sampling settings: {field} \(.*\) must be"):
            SamplingConfig(**bad)


def test_every_setting_at_the_edge_of_its_range_keeps_finite_logits_finite() -> None:
    logits = torch.tensor([1e30, -1e30, 3.0, -3.0, 0.0, 1e-30])
    seen = torch.tensor([True, True, True, False, False, True])
    g = torch.Generator().manual_seed(0)
    for penalty in (BOUNDS["repetition_penalty"].low, BOUNDS["repetition_penalty"].high):
        scores = penalize(logits, seen, penalty)
        assert torch.isfinite(scores).all()
        for temperature in (0, 1e-300, BOUNDS["temperature"].high):
            for top_p, top_k in ((1e-300, 0), (1.0, 0), (1.0, 1)):
                cfg = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=penalty)
                assert 0 <= pick_token(scores, cfg, g) < len(logits)


def test_unknown_option_lists_known_ones() -> None:
    with pytest.raises(MyPTError, match="temprature.*temperature"):
        SamplingConfig.from_options({"temprature": 1.0})


# ----------------------------------------------------------------------------- logits -> token


def test_temperature_zero_is_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert pick_token(logits, SamplingConfig(temperature=0), torch.Generator().manual_seed(0)) == 1


@pytest.mark.parametrize("options", [{"top_k": 1}, {"top_p": 0.01, "top_k": 0}])
def test_top_k_1_and_tiny_top_p_pick_the_likeliest(options: dict) -> None:
    logits = torch.randn(100, generator=torch.Generator().manual_seed(1))
    cfg = SamplingConfig(temperature=1.0, **options)
    g = torch.Generator().manual_seed(0)
    assert {pick_token(logits, cfg, g) for _ in range(20)} == {int(logits.argmax())}


def test_top_k_samples_only_among_k() -> None:
    logits = torch.randn(100, generator=torch.Generator().manual_seed(2))
    allowed = set(torch.topk(logits, 5).indices.tolist())
    cfg = SamplingConfig(temperature=2.0, top_k=5)
    g = torch.Generator().manual_seed(0)
    picks = {pick_token(logits, cfg, g) for _ in range(200)}
    assert picks <= allowed and len(picks) > 1


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    cfg = SamplingConfig(temperature=1.0, top_k=0, top_p=0.75)
    g = torch.Generator().manual_seed(0)
    assert {pick_token(probs.log(), cfg, g) for _ in range(200)} == {0, 1}


def test_same_generator_seed_same_picks() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    cfg = SamplingConfig(temperature=1.0)
    runs = [[pick_token(logits, cfg, g) for _ in range(30)] for g in
            (torch.Generator().manual_seed(7), torch.Generator().manual_seed(7))]
    assert runs[0] == runs[1]


def test_repetition_penalty_scales_seen_tokens_toward_unlikely() -> None:
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0])
    seen = torch.tensor([True, True, False, False])
    assert penalize(logits, seen, 2.0).tolist() == [1.0, -4.0, 2.0, -2.0]


# ----------------------------------------------------------------------------- window and decoding


def test_window_slides_in_steps_of_half_a_block() -> None:
    assert window_start(16, 0, 16) == 0  # fits
    assert window_start(17, 0, 16) == 9  # jumps: keeps the last 8
    assert window_start(20, 9, 16) == 9  # still fits after the jump
    assert window_start(26, 9, 16) == 18
    assert window_start(5, 0, 1) == 4  # block_size 1 keeps one token


def test_cached_greedy_equals_uncached_and_reference_across_slides(model: GPT) -> None:
    prompt = [1, 2, 3, 4, 5]
    n = 50  # with block_size 16: several slides of the context
    cached = ids(model, prompt, max_new_tokens=n, temperature=0)
    uncached = ids(model, prompt, max_new_tokens=n, temperature=0, use_cache=False)
    assert cached == uncached == reference_greedy(model, prompt, n, VOCAB)
    assert len(set(cached)) > 2  # not a degenerate repeat of one token


def test_rotary_greedy_slides_one_token_at_a_time_cached_equals_uncached(rotary: GPT) -> None:
    prompt = [1, 2, 3, 4, 5]
    n = 60  # with block_size 16 the cache has overwritten every entry several times
    cached = ids(rotary, prompt, max_new_tokens=n, temperature=0)
    uncached = ids(rotary, prompt, max_new_tokens=n, temperature=0, use_cache=False)
    assert cached == uncached == rotary_reference_greedy(rotary, prompt, n, VOCAB)
    assert len(set(cached)) > 2
    sampled = ids(rotary, prompt, seed=3, max_new_tokens=n, temperature=1.0)  # varied far past block_size
    assert len(set(sampled[-20:])) > 5
    assert sampled == ids(rotary, prompt, seed=3, max_new_tokens=n, temperature=1.0, use_cache=False)
    assert cached != ids(sharp_model(**ROTARY, rope_theta=10.0), prompt, max_new_tokens=n, temperature=0)


def test_batched_greedy_over_rows_at_different_lengths_equals_one_row_at_a_time(rotary: GPT) -> None:
    """The decoding a server runs: one cache, rows joining at different times, one forward per step."""
    prompts = [[1, 2, 3], [7] * 10, [4, 5]]
    n = 30
    singles = [ids(rotary, p, max_new_tokens=n, temperature=0) for p in prompts]
    cache = rotary.new_cache(len(prompts), torch.device("cpu"), torch.float32)
    outs: list[list[int]] = [[] for _ in prompts]
    last = torch.zeros(len(prompts), dtype=torch.long)

    def start(row: int) -> None:  # prefill one row while the others keep their content
        logits = rotary.next_logits(torch.tensor([prompts[row]]), cache, rows=torch.tensor([row]))
        last[row] = logits[0, :VOCAB].argmax()
        outs[row].append(int(last[row]))

    start(0)
    start(1)
    for step in range(n + 5):
        if step == 5:  # row 2 joins later
            start(2)
        active = torch.tensor([r for r in range(3) if 0 < len(outs[r]) < n])
        if len(active) == 0:
            break
        logits = rotary.next_logits(last[active][:, None], cache, rows=active)
        for i, row in enumerate(active.tolist()):
            last[row] = logits[i, :VOCAB].argmax()
            outs[row].append(int(last[row]))
    assert outs == singles


MIXED = [  # (prompt, seed, sampling options): different lengths and settings in one batch
    ([1, 2, 3], 0, dict(max_new_tokens=40, temperature=0)),
    ([7] * 10, 1, dict(max_new_tokens=25, temperature=1.0, top_k=5)),
    ([4, 5], 2, dict(max_new_tokens=33, temperature=0.7, top_p=0.8, repetition_penalty=1.3)),
    (list(range(20)), 3, dict(max_new_tokens=12, temperature=1.5, top_k=0)),
    ([9], 4, dict(max_new_tokens=1, temperature=0)),
]


@pytest.mark.parametrize("kind", ["learned", "rotary"])
def test_decoder_batch_gives_each_continuation_its_solo_tokens(kind: str, model: GPT, rotary: GPT) -> None:
    """Continuations joining a 3-row decoder at different steps, leaving when done, with their own
    seeds and settings, each get exactly the tokens generate_ids gives them alone (windows slide)."""
    m = model if kind == "learned" else rotary
    solo = [ids(m, p, seed=seed, **o) for p, seed, o in MIXED]
    decoder = Decoder(m, slots=3)
    waiting = [Continuation(p, SamplingConfig(**o), seed=seed, vocab_size=VOCAB) for p, seed, o in MIXED]
    everyone, steps = list(waiting), 0
    while waiting or decoder.active:
        if waiting and decoder.free_slots and steps % 2 == 0:  # join between steps, one at a time
            decoder.add(waiting.pop(0))
        decoder.step()
        steps += 1
        assert len(decoder.active) <= 3
    assert [c.tokens[-c.n_new:] for c in everyone] == solo
    assert [c.finish_reason for c in everyone] == ["length"] * len(MIXED)


def test_pick_tokens_gives_each_row_its_one_row_token() -> None:
    """The vectorised sampler: rows of every kind (greedy, top_k of different sizes, top_p, plain)
    picked together, each with its own generator, equal pick_token row by row, draw after draw."""
    torch.manual_seed(1)
    logits = torch.randn(7, VOCAB) * 3
    cfgs = [SamplingConfig(temperature=0), SamplingConfig(temperature=0.9, top_k=5),
            SamplingConfig(temperature=1.3, top_k=11, top_p=0.7), SamplingConfig(temperature=0.7, top_k=0, top_p=0.8),
            SamplingConfig(temperature=1.0, top_k=0), SamplingConfig(temperature=1e-30, top_k=0),
            SamplingConfig(temperature=2.0, top_k=5)]
    together = [torch.Generator().manual_seed(i) for i in range(7)]
    alone = [torch.Generator().manual_seed(i) for i in range(7)]
    for _ in range(30):
        picked = pick_tokens(logits, cfgs, together).tolist()
        assert picked == [pick_token(row, cfg, g) for row, cfg, g in zip(logits, cfgs, alone, strict=True)]
    assert len({pick_token(logits[4], cfgs[4], alone[4]) for _ in range(50)}) > 5  # they do sample


def filtered_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution a row's token is drawn from, computed plainly: tempered, top_k, top_p."""
    x = logits / cfg.temperature
    if 0 < cfg.top_k < x.numel():
        x = x.masked_fill(x < x.topk(cfg.top_k).values[-1], float("-inf"))
    probs = x.softmax(-1)
    if cfg.top_p < 1:
        ordered, order = probs.sort(descending=True)
        keep = ordered.cumsum(0) - ordered < cfg.top_p
        keep[0] = True
        probs = torch.zeros_like(probs).index_put((order[keep],), ordered[keep])
        probs /= probs.sum()
    return probs


@pytest.mark.parametrize("options", [
    dict(temperature=0.8, top_k=0),  # the whole vocabulary
    dict(temperature=1.2, top_k=9),
    dict(temperature=0.8, top_k=0, top_p=0.7),  # a nucleus among the 256 likeliest
    dict(temperature=4.0, top_k=0, top_p=0.5),  # a nucleus of several hundred: more candidates looked at
    dict(temperature=1.0, top_k=30, top_p=0.8),
])
def test_sampled_tokens_follow_the_filtered_distribution(options: dict) -> None:
    """Thousands of rows of the same logits, each with its own generator: the tokens' frequencies
    match the tempered, top-k and top-p filtered distribution, and nothing outside it is drawn."""
    vocab, n = 2500, 6000
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(4)) * 2
    cfg = SamplingConfig(**options)
    expected = filtered_probs(logits, cfg)
    picks = pick_tokens(logits.expand(n, vocab), [cfg] * n, [torch.Generator().manual_seed(i) for i in range(n)])
    freq = torch.bincount(picks, minlength=vocab).double() / n
    assert freq[expected == 0].sum() == 0
    # the L1 distance of n draws' frequencies from their distribution is about sqrt(2 / (pi n)) sum sqrt(p (1 - p))
    typical = (2 / (math.pi * n)) ** 0.5 * (expected * (1 - expected)).double().sqrt().sum()
    assert (freq - expected.double()).abs().sum() < 1.3 * typical + 0.01


def test_argmax_rows_is_argmax_for_any_width_and_ties() -> None:
    g = torch.Generator().manual_seed(5)
    for width in (7, 300, 1000, 50257):
        logits = torch.randn(6, width + 3, generator=g)[:, :width]  # a slice of padded rows, as the head's
        logits[1, :] = 0.0  # all tied: the first
        logits[2, width // 3] = logits[2, width - 1] = 9.0  # two maxima in different blocks
        logits[3, -1] = 9.0  # the maximum in the last, partial block
        assert torch.equal(argmax_rows(logits), logits.argmax(-1))


@pytest.mark.parametrize("kind", ["learned", "rotary"])
def test_chunked_prefill_keeps_the_others_decoding_and_gives_the_same_tokens(kind: str, model: GPT,
                                                                           rotary: GPT) -> None:
    """A 15-token prompt joins while A decodes, at most 4 prompt tokens a step: A gets a token
    every step, B's prompt takes 4 steps, and both get their solo tokens."""
    m = model if kind == "learned" else rotary
    solo_a = ids(m, [1, 2], seed=5, max_new_tokens=30, temperature=0.9)
    long_prompt = [(3 * i) % VOCAB for i in range(15)]
    solo_b = ids(m, long_prompt, max_new_tokens=12, temperature=0)
    decoder = Decoder(m, slots=2, prefill_chunk=4)
    a = Continuation([1, 2], SamplingConfig(max_new_tokens=30, temperature=0.9), seed=5, vocab_size=VOCAB)
    b = Continuation(long_prompt, SamplingConfig(max_new_tokens=12, temperature=0), seed=0, vocab_size=VOCAB)
    decoder.add(a)
    decoder.step()
    decoder.add(b)
    for i in range(4):
        before = a.n_new
        decoder.step()
        assert a.n_new == before + 1 and b.n_new == (1 if i == 3 else 0)
    while decoder.active:
        decoder.step()
    assert a.tokens[-a.n_new:] == solo_a and b.tokens[-b.n_new:] == solo_b


def test_prompts_arriving_together_go_in_whole_in_order_within_the_step_budget(rotary: GPT) -> None:
    """A budget of 10 prompt tokens a step, prompts of 6, 6 and 3 tokens added at once: the first
    goes in whole, the second (6 > 4 left) waits whole for the next step, the third fits the 4
    left; the step reports what it prefilled and how long that took. Each gets its solo tokens."""
    prompts = [[(5 * i + j) % VOCAB for i in range(n)] for j, n in enumerate((6, 6, 3))]
    solos = [ids(rotary, p, max_new_tokens=5, temperature=0) for p in prompts]
    decoder = Decoder(rotary, slots=3, prefill_chunk=10)
    cs = [Continuation(p, SamplingConfig(max_new_tokens=5, temperature=0), seed=0, vocab_size=VOCAB) for p in prompts]
    for c in cs:
        decoder.add(c)
    decoder.step()
    assert [c.n_new for c in cs] == [1, 0, 1] and decoder.prefilled == 9 and decoder.prefill_seconds > 0
    decoder.step()
    assert [c.n_new for c in cs] == [2, 1, 2] and decoder.prefilled == 6
    decoder.step()
    assert decoder.prefilled == 0 and decoder.prefill_seconds == 0
    while decoder.active:
        decoder.step()
    assert [c.tokens[-c.n_new:] for c in cs] == solos


@pytest.mark.parametrize("kind", ["learned", "rotary"])
def test_prefix_cache_reuses_a_prompt_start_and_gives_the_same_tokens(kind: str, model: GPT, rotary: GPT) -> None:
    m = model if kind == "learned" else rotary
    system = [5, 9, 2, 7, 7, 1, 3, 8]  # two blocks of 4
    prompts = [system + [1, 2, 3], system + [4], system[:6] + [11], system + [1, 2, 3]]
    solo = [ids(m, p, seed=i, max_new_tokens=20, temperature=0.8) for i, p in enumerate(prompts)]
    prefix = PrefixCache(block=4, max_tokens=64)
    decoder = Decoder(m, slots=2, prefix_cache=prefix)
    got, reused = [], []
    for i, p in enumerate(prompts):
        c = Continuation(p, SamplingConfig(max_new_tokens=20, temperature=0.8), seed=i, vocab_size=VOCAB)
        decoder.add(c)
        while decoder.active:
            decoder.step()
        got.append(c.tokens[-c.n_new:])
        reused.append(c.reused)
    assert got == solo
    assert reused == [0, 8, 4, 8] and prefix.hits == 3
    assert Continuation(system + [1], SamplingConfig(), seed=0, vocab_size=VOCAB).reused is None  # not in a decoder
    small = PrefixCache(block=4, max_tokens=8)  # two blocks: the least recently used go first
    decoder = Decoder(m, slots=1, prefix_cache=small)
    for p in ([1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 9, 9, 9, 8]):
        decoder.add(Continuation(p, SamplingConfig(max_new_tokens=1), seed=0, vocab_size=VOCAB))
        decoder.step()
    assert len(small) == 2
    c = Continuation([1, 2, 3, 4, 5, 6, 7, 8, 9], SamplingConfig(max_new_tokens=1), seed=0, vocab_size=VOCAB)
    decoder.add(c)
    assert c.reused == 0  # its first block was evicted


def test_kv_cache_is_kept_in_the_compute_dtype(model: GPT) -> None:
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    decoder = Decoder(model, slots=1, amp=amp, dtype=torch.bfloat16)
    c = Continuation([1, 2, 3], SamplingConfig(max_new_tokens=5, temperature=0), seed=0, vocab_size=VOCAB)
    decoder.add(c)
    while decoder.active:
        decoder.step()
    assert decoder.cache.k.dtype == decoder.cache.v.dtype == torch.bfloat16 and c.n_new == 5
    assert Decoder(model, slots=1).cache.k.dtype == torch.float32


def poisoned(model: GPT, mark: int):
    """A forward hook making the embedding of token `mark` NaN, as a broken weight row would: any
    row that holds it gets non-finite logits. (Remove it again: the fixture model is shared.)"""
    return model.transformer.wte.register_forward_hook(
        lambda module, inputs, out: out.masked_fill((inputs[0] == mark)[..., None], float("nan")))


def test_a_row_whose_logits_are_not_finite_fails_alone(model: GPT) -> None:
    """B's logits turn NaN in the middle of a batch: B alone ends with an error, A decoding beside
    it gets exactly its solo tokens, and C, which takes B's row next, too (B's NaN keys and values
    are not left in the row, where the attention product would still meet them, times 0)."""
    a_prompt, c_prompt = list(range(1, 9)), [4, 5]
    solo_a = ids(model, a_prompt, seed=0, max_new_tokens=30, temperature=1.0)
    solo_c = ids(model, c_prompt, max_new_tokens=10, temperature=0)
    mark = min(set(range(VOCAB)) - set(a_prompt + solo_a + c_prompt + solo_c))
    a = Continuation(a_prompt, SamplingConfig(max_new_tokens=30, temperature=1.0), seed=0, vocab_size=VOCAB)
    b = Continuation([mark, 1, 2, 3, 4, 5], SamplingConfig(max_new_tokens=30, temperature=1.0), seed=0,
                     vocab_size=VOCAB)
    c = Continuation(c_prompt, SamplingConfig(max_new_tokens=10, temperature=0), seed=0, vocab_size=VOCAB)
    decoder = Decoder(model, slots=2)
    decoder.add(a)
    decoder.add(b)
    hook = poisoned(model, mark)
    try:
        done = decoder.step()  # A's and B's prompts, in one step
        assert done == [b] and b.finish_reason == "error" and "not finite" in b.error and b.n_new == 0
        decoder.step()
        decoder.add(c)  # B's row, while A is longer than B was: C's rows meet B's old slots, masked
        while decoder.active:
            decoder.step()
    finally:
        hook.remove()
    assert a.tokens[-a.n_new:] == solo_a and a.finish_reason == "length"
    assert c.tokens[-c.n_new:] == solo_c and decoder.free_slots == 2
    with pytest.raises(MyPTError, match="not finite"), poisoned(model, mark):
        ids(model, [mark], max_new_tokens=5)


def test_continuation_text_ends_at_a_stop_string_and_frees_its_row(model: GPT) -> None:
    tok = CharTokenizer([chr(ord("a") + i) for i in range(VOCAB)])
    full = Continuation([1, 2], SamplingConfig(max_new_tokens=30, temperature=0), seed=0, vocab_size=VOCAB,
                        tokenizer=tok)
    decoder = Decoder(model, slots=1)
    decoder.add(full)
    while decoder.active:
        decoder.step()
    text = full.take_text()
    assert len(text) == 30 and full.finish_reason == "length"
    stop = text[10:12]
    cut = Continuation([1, 2], SamplingConfig(max_new_tokens=30, temperature=0, stop=(stop,)), seed=0,
                       vocab_size=VOCAB, tokenizer=tok)
    decoder.add(cut)
    pieces = []
    while decoder.active:
        decoder.step()
        pieces.append(cut.take_text())
    assert "".join(pieces) == text[: text.index(stop)] and cut.finish_reason == "stop"
    assert decoder.free_slots == 1 and cut.n_new < 30


def test_prompt_longer_than_block_keeps_its_end(model: GPT) -> None:
    prompt = list(range(30))
    assert ids(model, prompt, max_new_tokens=10, temperature=0) == reference_greedy(model, prompt[-16:], 10, VOCAB)


def test_sampling_repeats_with_seed_and_cache_does_not_change_it(model: GPT) -> None:
    a = ids(model, [1], seed=5, max_new_tokens=40, temperature=1.0)
    assert a == ids(model, [1], seed=5, max_new_tokens=40, temperature=1.0)
    assert a == ids(model, [1], seed=5, max_new_tokens=40, temperature=1.0, use_cache=False)
    assert a != ids(model, [1], seed=6, max_new_tokens=40, temperature=1.0)


def test_padded_vocab_ids_are_never_produced(model: GPT) -> None:
    out = ids(model, [1], vocab=7, max_new_tokens=60, temperature=3.0, top_k=0)
    assert max(out) < 7


def test_zero_new_tokens_and_empty_prompt(model: GPT) -> None:
    assert ids(model, [1], max_new_tokens=0) == []
    with pytest.raises(MyPTError, match="prompt token"):
        ids(model, [], max_new_tokens=1)


def test_autocast_is_entered_per_step_not_across_yields(model: GPT) -> None:
    stream = generate_ids(model, [1], SamplingConfig(max_new_tokens=3), vocab_size=VOCAB, seed=0,
                          amp=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    for _ in stream:
        assert not torch.is_autocast_enabled("cpu")


# ----------------------------------------------------------------------------- text


def test_stop_filter_finds_stops_across_pieces_and_holds_back_prefixes() -> None:
    f = StopFilter(["END", "\n\n"])
    assert f.feed("abc E") == ("abc ", False)  # "E" may begin END
    assert f.feed("N") == ("", False)
    assert f.feed("Dxyz") == ("", True)
    f = StopFilter(["END"])
    assert f.feed("EN") == ("", False)
    assert f.feed("ough") == ("ENough", False)
    assert f.feed("EN") == ("", False)
    assert f.flush() == "EN"


def test_stream_never_splits_a_utf8_character() -> None:
    tok = GPT2Tokenizer()
    text = "naïve café 😀 — 日本語 ok"
    token_ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([t]) for t in token_ids)  # some tokens hold partial characters
    stream = TextStream(iter(token_ids), tok, stop=(), seed=0)
    pieces = list(stream)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert stream.n_tokens == len(token_ids) and stream.seed == 0 and not stream.stopped


def test_stream_stops_at_a_stop_string_and_leaves_it_out() -> None:
    tok = CharTokenizer(sorted(set("abc XY")))
    stream = TextStream(iter(tok.encode("abc XY abc XY")), tok, stop=("XY",), seed=0)
    assert stream.text() == "abc " and stream.stopped
    assert stream.n_tokens == 6  # generation stopped at the stop string


def test_generation_stops_at_end_of_text_unless_ignore_eot(model: GPT) -> None:
    greedy = reference_greedy(model, [1, 2, 3], 12, VOCAB)
    eot = greedy[5]  # pretend the sixth greedy token is the end-of-text
    first = greedy.index(eot)

    def run(**options: object) -> list[int]:
        cfg = SamplingConfig(max_new_tokens=12, temperature=0, **options)
        return list(generate_ids(model, [1, 2, 3], cfg, vocab_size=VOCAB, seed=0, eot_id=eot))

    assert run() == greedy[:first]  # stops before it, the end-of-text itself not produced
    assert run(ignore_eot=True) == greedy
    with pytest.raises(MyPTError, match=r"ignore_eot \('yes'\) must be true or false"):
        SamplingConfig(ignore_eot="yes")


def test_continuation_ends_at_end_of_text_unless_ignored(model: GPT) -> None:
    tok = CharTokenizer([chr(ord("a") + i) for i in range(VOCAB)])
    greedy = ids(model, [1, 2], max_new_tokens=10, temperature=0)
    k = next(i for i, t in enumerate(greedy) if i >= 2 and t not in greedy[:i])
    eot = greedy[k]  # as if that token were end-of-text
    decoder = Decoder(model, slots=2)
    ended = Continuation([1, 2], SamplingConfig(max_new_tokens=10, temperature=0), seed=0, vocab_size=VOCAB,
                         tokenizer=tok, eot_id=eot)
    ignored = Continuation([1, 2], SamplingConfig(max_new_tokens=10, temperature=0, ignore_eot=True), seed=0,
                           vocab_size=VOCAB, tokenizer=tok, eot_id=eot)
    decoder.add(ended)
    decoder.add(ignored)
    while decoder.active:
        decoder.step()
    assert ended.finish_reason == "stop" and ended.n_new == k and ended.take_text() == tok.decode(greedy[:k])
    assert ignored.finish_reason == "length" and ignored.tokens[-10:] == greedy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decoding_on_a_gpu_never_builds_cudnn_attention_plans() -> None:
    """A KV cache's steps change shape every token: cuDNN's SDPA built a plan for each (2.9 ms of CPU
    a call under bf16, 9x slower decoding than fp32)."""
    from torch.profiler import ProfilerActivity, profile

    model = sharp_model(**ROTARY).cuda()
    amp = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    cfg = SamplingConfig(max_new_tokens=40, temperature=0)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        ids = list(generate_ids(model, [1, 2, 3], cfg, vocab_size=VOCAB, seed=0, amp=amp, dtype=torch.bfloat16))
    assert len(ids) == 40
    assert not [e.key for e in p.key_averages() if "cudnn_attention" in e.key]
