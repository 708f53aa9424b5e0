"""Benchmark: MyPT's generation speed with and without the KV cache, against Hugging Face
transformers' GPT2LMHeadModel.generate on the same weights and the same shapes.

    python bench/bench_generate.py                       # tiny and small presets
    python bench/bench_generate.py --presets tiny --repeats 5 --threads 1

For each preset a MyPT GPT is built (random weights, seed 0, fp32, CPU) and its weights are
copied into a GPT2LMHeadModel (GPT-2's Conv1D weights are the transpose of nn.Linear's; the
presets have no biases, so HF's biases are zero); the two models' logits are checked to agree.
Both then generate greedily at batch 1 from the same 16-token prompt, 256 new tokens
(HF: use_cache=True, do_sample=False, min_new_tokens=max_new_tokens=256). So that the 272
positions fit without MyPT's sliding context, block_size (HF n_positions) is raised to 272 for
this comparison; MyPT at the preset's own block_size (context sliding) is timed too. Each figure
is the best of --repeats runs after a warm-up, since the machine may be shared. Finally the
--long_presets (small and small-modern) generate 512 tokens with and without the cache, best
of two runs each: small's 256-token context jumps (the cache is refilled from the last 128
tokens), small-modern's rotary context slides one token at a time (its cache overwrites its
oldest entry; without a cache each step re-runs every token that can still reach the next).
Prints the machine, tokens per second and the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import time
from collections.abc import Callable

import torch

from mypt.config import load_model_config
from mypt.model import GPT
from mypt.sampling import SamplingConfig, generate_ids

PROMPT_LEN = 16
NEW_TOKENS = 256
LONG_TOKENS = 512
OURS = "MyPT, KV cache, fp32"
HF = "HF GPT2LMHeadModel.generate, fp32"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    import transformers

    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} logical CPUs, load average {load}\n"
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}, python {platform.python_version()}")


def build_mypt(preset: str, block_size: int | None = None) -> GPT:
    cfg = load_model_config(preset)
    cfg = dataclasses.replace(cfg, dropout=0.0, block_size=block_size or cfg.block_size)
    torch.manual_seed(0)
    return GPT(cfg).eval()


def to_hf(model: GPT):  # -> transformers.GPT2LMHeadModel
    """A GPT2LMHeadModel holding model's weights (Conv1D weights transposed, biases zero)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf_cfg = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                        n_head=c.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True)
    hf = GPT2LMHeadModel(hf_cfg).eval()
    ours = model.state_dict()
    state = {}
    for key, value in hf.state_dict().items():
        src = ours.get(key)  # same names: nanoGPT follows GPT-2's
        if src is None:  # a bias MyPT does not have, or HF's attention mask buffer
            state[key] = torch.zeros_like(value) if key.endswith(".bias") and value.is_floating_point() else value
        elif key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            state[key] = src.t().contiguous()  # Conv1D stores (in, out)
        else:
            state[key] = src
    hf.load_state_dict(state)
    return hf


def check_logits(model: GPT, hf) -> float:
    idx = torch.randint(0, 50257, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-3, f"logits differ by {diff}: the weight copy is wrong"
    return diff


def best_rates(runs: dict[str, Callable[[], list[int]]], repeats: int,
               warmup: bool = True) -> dict[str, tuple[float, list[int]]]:
    """Per run: (best tokens/s of `repeats` timed runs, after a warm-up run, and its tokens).

    The runs take turns (A B C A B C ...) so that a change in the machine's load hits all alike.
    """
    if warmup:
        for run in runs.values():
            run()
    best = {name: (0.0, []) for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            out = run()
            rate = len(out) / (time.perf_counter() - t0)
            best[name] = max(best[name], (rate, out), key=lambda r: r[0])
    return best


def mypt_run(model: GPT, prompt: list[int], n: int, use_cache: bool, dtype: torch.dtype | None = None):
    cfg = SamplingConfig(max_new_tokens=n, temperature=0, use_cache=use_cache)
    amp = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else contextlib.nullcontext
    return lambda: list(generate_ids(model, prompt, cfg, vocab_size=50257, seed=0, amp=amp))


def hf_run(hf, prompt: list[int], n: int):
    idx = torch.tensor([prompt])

    def run() -> list[int]:
        with torch.no_grad():
            out = hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, use_cache=True,
                              max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    return run


def same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def bench_preset(preset: str, prompt: list[int], repeats: int) -> None:
    model = build_mypt(preset, block_size=PROMPT_LEN + NEW_TOKENS)
    hf = to_hf(model)
    c = model.config
    print(f"\n== {preset}: {c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, vocab {c.vocab_size}, "
          f"{model.num_params() / 1e6:.2f}M parameters; block_size / n_positions {c.block_size} ==")
    print(f"max |logit difference| MyPT vs HF: {check_logits(model, hf):.2e}")
    native = build_mypt(preset)
    runs = {
        OURS: mypt_run(model, prompt, NEW_TOKENS, True),
        HF: hf_run(hf, prompt, NEW_TOKENS),
        "MyPT, KV cache, bf16 autocast": mypt_run(model, prompt, NEW_TOKENS, True, torch.bfloat16),
        f"MyPT, KV cache, block_size {native.config.block_size}": mypt_run(native, prompt, NEW_TOKENS, True),
    }
    results = best_rates(runs, repeats)
    for name, (rate, _) in results.items():
        print(f"{name:<44}{rate:9.1f} tokens/s")
    (ours, ours_ids), (theirs, hf_ids) = results[OURS], results[HF]
    agree = same_prefix(ours_ids, hf_ids)
    print(f"{'ratio MyPT / HF (fp32, KV cache)':<44}{ours / theirs:9.2f}x   "
          f"(greedy tokens agree: {agree} of {NEW_TOKENS})")


def bench_long(preset: str, prompt: list[int], repeats: int) -> None:
    model = build_mypt(preset)
    how = "rotary: slides one token at a time" if model.config.position == "rope" else "learned: jumps and refills"
    print(f"\n== {preset}, {LONG_TOKENS} new tokens, block_size {model.config.block_size} ({how}) ==")
    mypt_run(model, prompt, NEW_TOKENS, True)()  # warm-up; the uncached run is too slow to repeat many times
    runs = {"cache": mypt_run(model, prompt, LONG_TOKENS, True),
            "no cache": mypt_run(model, prompt, LONG_TOKENS, False)}
    results = best_rates(runs, max(1, min(repeats, 2)), warmup=False)
    (cached, cached_ids), (uncached, uncached_ids) = results["cache"], results["no cache"]
    print(f"{'MyPT, KV cache':<44}{cached:9.1f} tokens/s")
    print(f"{'MyPT, no cache':<44}{uncached:9.1f} tokens/s")
    print(f"{'ratio cache / no cache':<44}{cached / uncached:9.2f}x   "
          f"(greedy tokens agree: {same_prefix(cached_ids, uncached_ids)} of {LONG_TOKENS})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="*", default=["tiny", "small"], help="presets to compare with HF "
                   "(none: only the cache / no-cache run)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure, best kept (default: 3)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument("--skip_long", action="store_true", help="skip the 512-token cache / no-cache comparison")
    p.add_argument("--long_presets", nargs="*", default=["small", "small-modern"],
                   help="presets for the 512-token cache / no-cache comparison (default: %(default)s)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())
    prompt = torch.randint(0, 50257, (PROMPT_LEN,), generator=torch.Generator().manual_seed(2)).tolist()
    for preset in args.presets:
        bench_preset(preset, prompt, args.repeats)
    if not args.skip_long:
        for preset in args.long_presets:
            bench_long(preset, prompt, args.repeats)


if __name__ == "__main__":
    main()
