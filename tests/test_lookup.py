"""Tests for mypt.lookup: prompt-lookup decoding gives plain decoding's tokens in fewer steps.

Randomly initialised 2-layer models with sharp logits and block_size 16 (test_sampling's) stand
in for trained ones: greedy decoding of such a model soon repeats itself, so drafts hold, and
60 new tokens take the context past block_size several times (a learned-position window jumps,
a rotary cache row wraps around).
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from test_sampling import ROTARY, VOCAB, reference_greedy, rotary_reference_greedy, sharp_model

from mypt.config import ModelConfig
from mypt.errors import MyPTError
from mypt.lookup import MAX_LOOKUP, PAUSE, Lookup
from mypt.model import GPT
from mypt.sampling import Continuation, Decoder, SamplingConfig, generate_ids
from mypt.tokenizers import CharTokenizer


@pytest.fixture(scope="module")
def models() -> dict[str, GPT]:
    return {"learned": sharp_model(), "rotary": sharp_model(**ROTARY)}


def run(model: GPT, prompt: list[int], seed: int = 0, **options) -> tuple[list[int], int, Lookup | None]:
    """(new tokens, decoder steps taken, the continuation's Lookup) of one continuation."""
    c = Continuation(prompt, SamplingConfig(**options), seed=seed, vocab_size=VOCAB)
    decoder = Decoder(model, 1)
    decoder.add(c)
    steps = 0
    while c.finish_reason is None:
        decoder.step()
        steps += 1
    return c.tokens[len(c.tokens) - c.n_new:], steps, c.lookup


def reference(kind: str, model: GPT, prompt: list[int], n: int) -> list[int]:
    if kind == "learned":
        return reference_greedy(model, prompt, n, VOCAB)
    return rotary_reference_greedy(model, prompt, n, VOCAB)


# ----------------------------------------------------------------------------- drafting


def drafts(tokens: list[int], room: int = 10, max_ngram: int = 3) -> list[int]:
    return Lookup(room, max_ngram)._draft(tokens, room)


def test_draft_follows_the_latest_longest_suffix_match() -> None:
    assert drafts([5, 6, 7, 8, 9, 1, 2, 6, 7], room=3) == [8, 9, 1]  # "6 7" matched
    assert drafts([1, 2, 3, 4, 9, 2, 3, 5, 9, 2, 3], room=2) == [5, 9]  # "9 2 3": the latest occurrence
    assert drafts([1, 2, 3, 4, 9, 3, 7, 2, 3], room=2, max_ngram=3) == [4, 9]  # "2 3" beats the later "3"
    assert drafts([1, 2, 3, 4], room=5) == []  # "4" never occurred before
    assert drafts([7], room=5) == []


def test_a_match_near_the_end_drafts_the_repeating_stretch() -> None:
    assert drafts([9, 1, 2, 3, 1, 2, 3], room=7) == [1, 2, 3, 1, 2, 3, 1]
    assert drafts([4, 4, 4], room=4) == [4, 4, 4, 4]


def test_the_index_grows_with_the_text() -> None:
    lookup, tokens = Lookup(4), [1, 2, 3]
    assert lookup._draft(tokens, 4) == []
    tokens += [1, 2]
    assert lookup._draft(tokens, 4) == [3, 1, 2, 3]


# ----------------------------------------------------------------------------- greedy: plain greedy's tokens


@pytest.mark.parametrize("kind", ["learned", "rotary"])
@pytest.mark.parametrize(("prompt", "n"), [([25, 25, 25], 8), ([3, 1, 4, 1, 5, 9, 2, 6] * 2, 60)])
def test_greedy_lookup_equals_plain_greedy_in_fewer_steps(kind: str, prompt: list[int], n: int,
                                                          models: dict[str, GPT]) -> None:
    """Prompts that repeat: drafts are accepted. 11 tokens fit in block_size (16); 76 go past it
    several times (a learned-position window jumps, a rotary cache row wraps around)."""
    m = models[kind]
    plain, plain_steps, _ = run(m, prompt, max_new_tokens=n, temperature=0)
    fast, steps, lookup = run(m, prompt, max_new_tokens=n, temperature=0, lookup=8)
    assert fast == plain == reference(kind, m, prompt, n)
    assert plain_steps == n and steps == n - lookup.accepted  # one step per token not drafted
    assert lookup.accepted >= (2 if n < 10 else n // 3)


@pytest.mark.parametrize("kind", ["learned", "rotary"])
def test_greedy_lookup_equals_plain_greedy_when_drafts_are_rejected(kind: str, models: dict[str, GPT]) -> None:
    """Prompts whose every suffix recurs with other tokens after it: drafts are proposed and the
    model's greedy tokens mostly reject them (the cache rewound each time); the tokens stay plain greedy's."""
    m = models[kind]
    for seed in range(6):
        prompt = torch.randint(0, VOCAB, (16,), generator=torch.Generator().manual_seed(seed)).tolist()
        plain, _, _ = run(m, prompt, max_new_tokens=40, temperature=0)
        fast, _, lookup = run(m, prompt, max_new_tokens=40, temperature=0, lookup=5)
        assert fast == plain == reference(kind, m, prompt, 40)
        assert lookup.drafted > lookup.accepted


@pytest.mark.parametrize("kind", ["learned", "rotary"])
def test_rejected_drafts_are_undone_also_in_a_full_rotary_row(kind: str, models: dict[str, GPT]) -> None:
    """Drafting from the first step on, every step, past block_size: rejected drafts in a full ring row
    overwrote entries the next tokens still attend to; without restoring them the tokens differ."""
    m = models[kind]
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16] * 2  # every token has a successor to draft
    for seed in range(4):
        tail = torch.randint(0, VOCAB, (16,), generator=torch.Generator().manual_seed(seed)).tolist()
        plain, _, _ = run(m, prompt + tail, max_new_tokens=30, temperature=0)
        fast, _, lookup = run(m, prompt + tail, max_new_tokens=30, temperature=0, lookup=MAX_LOOKUP)
        assert fast == plain
        assert lookup.drafted > 0


@pytest.mark.parametrize("kind", ["learned", "rotary"])
def test_lookup_drafts_no_further_than_max_new_tokens(kind: str, models: dict[str, GPT]) -> None:
    """The cache of generate_ids is sized for the text (here shorter than block_size): a draft past
    max_new_tokens would not fit in it."""
    m, prompt = models[kind], [2, 9, 2, 9, 2]
    for n in (1, 2, 3, 7):
        fast = list(generate_ids(m, prompt, SamplingConfig(max_new_tokens=n, temperature=0, lookup=10),
                                 vocab_size=VOCAB, seed=0))
        assert fast == reference(kind, m, prompt, n)


# ----------------------------------------------------------------------------- sampling and the other settings


SETTINGS = [  # sampling options under which lookup must give plain decoding's tokens
    dict(temperature=1.0, top_k=0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.2, top_p=0.8),
    dict(temperature=0, repetition_penalty=1.3),
    dict(temperature=0.9, repetition_penalty=0.8, top_k=10),
]


@pytest.mark.parametrize("kind", ["learned", "rotary"])
@pytest.mark.parametrize("options", SETTINGS)
def test_sampling_with_lookup_draws_plain_sampling_tokens_for_a_seed(kind: str, options: dict,
                                                                      models: dict[str, GPT]) -> None:
    """Each token is drawn from the same distribution with the same generator draws, so a seed gives
    plain decoding's tokens, past block_size, with repetition penalty, top-k and top-p."""
    m, prompt = models[kind], [3, 1, 4, 1, 5, 9, 2, 6] * 2
    for seed in range(3):
        plain, _, _ = run(m, prompt, seed=seed, max_new_tokens=50, **options)
        fast, _, lookup = run(m, prompt, seed=seed, max_new_tokens=50, lookup=6, **options)
        assert fast == plain
        assert lookup.drafted > 0  # (the draws accepting drafts: test_sampling_with_lookup_keeps_the_distribution)


@pytest.mark.slow
def test_sampling_with_lookup_keeps_the_distribution() -> None:
    """Chi-square over many seeds: the first two sampled tokens after a prompt whose suffix recurs
    (so a draft is proposed and accepted or rejected at random) follow the model's own joint
    distribution p(a) p(b | a), computed exactly from full forward passes."""
    vocab, prompt = 6, [0, 1, 1, 3, 0, 1]  # "0 1" recurs: the draft is 1, 3, 0, ...
    torch.manual_seed(2)
    m = GPT(ModelConfig(n_layer=1, n_head=1, n_embd=16, block_size=16, vocab_size=vocab, dropout=0.0)).eval()
    with torch.no_grad():
        m.transformer.wte.weight.mul_(5)  # probabilities spread unevenly over the 6 tokens
        p = m(torch.tensor([prompt]))[0][0, -1].softmax(-1)
        second = m(torch.tensor([[*prompt, a] for a in range(vocab)]))[0][:, -1].softmax(-1)
    expected = (p[:, None] * second).flatten()  # (a, b) -> probability
    n = 2000
    counts = Counter()
    for seed in range(n):
        out = list(generate_ids(m, prompt, SamplingConfig(max_new_tokens=2, temperature=1.0, top_k=0, lookup=4),
                                vocab_size=vocab, seed=seed))
        counts[out[0] * vocab + out[1]] += 1
    cells = [i for i in range(vocab * vocab) if expected[i] * n >= 5]  # the rest pooled into one cell
    observed = [counts[i] for i in cells] + [n - sum(counts[i] for i in cells)]
    wanted = [float(expected[i]) * n for i in cells] + [n * (1 - float(expected[cells].sum()))]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, wanted, strict=True) if e > 0)
    dof = len(cells)
    assert 0.3 < float(p[1]) < 0.7  # the draft is accepted in a fair share of the samples, not all
    assert chi2 < dof + 4 * math.sqrt(2 * dof)  # about the 99.9th percentile of chi-square(dof)


def test_stop_strings_end_of_text_and_max_tokens_end_where_plain_decoding_ends(models: dict[str, GPT]) -> None:
    """A continuation with text: stop strings and end-of-text inside an accepted draft end the text
    there, as one step at a time does."""
    tok = CharTokenizer("ABCDEFGHIJKLMNabcdefghijklmnopqrstuvwxyz")
    m = models["learned"]
    prompt = tok.encode("abcabcabcabcdefg", "prompt")
    plain_text, _, _ = text_run(m, prompt, tok, stop=(), eot_id=None)
    assert len(plain_text) == 40
    for stop, eot in (((plain_text[20:23],), None), ((), prompt[-1]), ((plain_text[3:5], "zz"), 7)):
        assert text_run(m, prompt, tok, stop=stop, eot_id=eot, lookup=8)[:2] == text_run(
            m, prompt, tok, stop=stop, eot_id=eot)[:2]


def text_run(m: GPT, prompt: list[int], tok: CharTokenizer, stop: tuple[str, ...], eot_id: int | None,
             lookup: int = 0) -> tuple[str, str, int]:
    cfg = SamplingConfig(max_new_tokens=40, temperature=0, stop=stop, lookup=lookup)
    c = Continuation(prompt, cfg, seed=0, vocab_size=VOCAB, tokenizer=tok, eot_id=eot_id)
    decoder, text = Decoder(m, 1), ""
    decoder.add(c)
    while c.finish_reason is None:
        decoder.step()
        text += c.take_text()
    return text, c.finish_reason, c.n_new


@pytest.mark.parametrize("kind", ["learned", "rotary"])
def test_a_batch_mixing_lookup_and_plain_continuations_gives_each_its_solo_tokens(kind: str,
                                                                                   models: dict[str, GPT]) -> None:
    """The server's way: one Decoder, continuations with and without lookup side by side."""
    m = models[kind]
    jobs = [([3, 1, 4, 1, 5, 9, 2, 6] * 2, dict(lookup=6)), ([7, 7, 2], dict()), ([1, 2, 1, 2, 1], dict(lookup=3)),
            ([5, 4, 3, 5, 4], dict(lookup=4, temperature=1.0, top_k=8))]
    solo = [run(m, p, seed=i, max_new_tokens=35, temperature=0, **o)[0] if "temperature" not in o
            else run(m, p, seed=i, max_new_tokens=35, **o)[0] for i, (p, o) in enumerate(jobs)]
    decoder = Decoder(m, slots=len(jobs))
    group = [Continuation(p, SamplingConfig(**{"max_new_tokens": 35, "temperature": 0, **o}), seed=i, vocab_size=VOCAB)
             for i, (p, o) in enumerate(jobs)]
    for c in group:
        decoder.add(c)
    while decoder.active:
        decoder.step()
    assert [c.tokens[len(c.tokens) - c.n_new:] for c in group] == solo


# ----------------------------------------------------------------------------- back-off and settings


def test_drafting_pauses_after_misses_and_resumes_after_a_hit(models: dict[str, GPT]) -> None:
    """Random prompts with recurring tokens under sampling: most drafts miss; drafting then pauses,
    so far fewer steps verify a draft than steps are taken."""
    m = models["learned"]
    prompt = torch.randint(0, VOCAB, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    c = Continuation(prompt, SamplingConfig(max_new_tokens=200, temperature=3.0, top_k=0, lookup=4), seed=0,
                     vocab_size=VOCAB)
    decoder, verifying, steps = Decoder(m, 1), 0, 0
    decoder.add(c)
    while c.finish_reason is None:
        before = c.lookup.drafted
        decoder.step()
        steps += 1
        verifying += c.lookup.drafted > before
    assert c.lookup.accepted < c.lookup.drafted / 4  # near-uniform sampling: drafts seldom hold
    assert 0 < verifying < steps / (PAUSE / 2)


def test_bad_lookup_values_are_refused_naming_the_field() -> None:
    for bad in (-1, MAX_LOOKUP + 1, 2.5, True):
        with pytest.raises(MyPTError, match=rf"lookup \({bad}\) must be an integer from 0 to {MAX_LOOKUP}"):
            SamplingConfig(lookup=bad)
    with pytest.raises(MyPTError, match=r"lookup \(3\) needs the KV cache"):
        SamplingConfig(lookup=3, use_cache=False)
    assert SamplingConfig(lookup=0, use_cache=False).lookup == 0


def test_draft_length_and_pause_follow_what_held() -> None:
    lookup = Lookup(10)
    # a draft cut short: 1 shorter; a miss (none held): half as long, and a pause that doubles
    # until PAYS (2) tokens of a draft hold; a draft wholly held: 2 longer
    for accepted, length, wait in ((10, 10, 0), (3, 9, 0), (0, 4, PAUSE), (1, 3, 0), (0, 1, 2 * PAUSE), (1, 3, 0),
                                   (2, 2, 0), (0, 1, PAUSE)):
        lookup.drafts = [1] * lookup._length
        lookup._wait = 0
        lookup._score(accepted)
        assert (lookup._length, lookup._wait) == (length, wait)
    lookup.drafts = [1]
    lookup._score(1)
    assert lookup._length == 3  # a wholly accepted draft: 2 longer
