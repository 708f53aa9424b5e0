"""Benchmark: batch-1 decoding against the memory-bandwidth roofline, fp32 / bf16 / int8 weights.

    python bench/bench_roofline.py                                  # the issue's three presets
    python bench/bench_roofline.py --new_tokens 32 --repeats 1      # a quick check
    python bench/bench_roofline.py --quality_model q --checkpoints_dir ckpts --input_file text.txt

In one run: (1) the machine's read bandwidth, the best of sums over a 1 GiB fp32 tensor with
--threads threads, measured at the start and right before each timed decoding (it drifts); (2) for
each preset (random weights, seed 0, dropout 0) greedy decoding of --new_tokens tokens at batch 1
after a 16-token prompt through MyPT's own path (sampling.generate_ids, KV cache), timed from the
first new token to the last, best of --repeats, each as load_model lays it out
(mypt.ops.lay_out_for_decoding): in fp32 (where mypt.kernels runs, each token one call of the fused
step, mypt.decode_step; else column-major matrices), the same decoded by eager PyTorch's operations
with MyPT's kernel for each product (fp32-ops), in fp32 as plain row-major nn.Linear layers and
torch's products (fp32-rows), in bf16 weights where the CPU has native bf16 (avx512_bf16 or AMX;
else said and skipped) and in int8 (mypt.quant; fused, and int8-ops as fp32-ops); bytes per token
are the weights a step reads (every matrix whole, one embedding row, the norms) plus the KV cache
at the mean context length, and the roofline fraction is tokens/s x bytes per token / bandwidth
(each run against the bandwidth just before it, the median of the runs); (3) batch-1 matrix-vector
products through 150M.json's block stack (16 x 768-wide blocks: 64 matrices, no attention) in fp32
nn.Linear, MyPT's int8 kernel, torch._weight_int8pack_mm and torchao's Int8WeightOnlyConfig (when
torchao is installed), in alternating rounds, best of --repeats; (4) with --profile, where an int8
step of 150M.json spends its time; (5) with --quality_model, the validation loss of a trained
checkpoint in fp32 and int8 on the last 10% of --input_file, and the greedy agreement over 256
tokens from prompts taken from it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from _machine import header

from mypt import kernels, quant
from mypt.config import load_model_config
from mypt.model import GPT
from mypt.ops import lay_out_for_decoding
from mypt.sampling import SamplingConfig, generate_ids

PRESETS = ["small-modern.json", "150M.json", "shakespeare-char.json"]
PROMPT_LEN = 16
GIB = 1 << 30


def bandwidth(repeats: int) -> float:
    """Bytes per second of the best streaming read (torch sum) over a 1 GiB fp32 tensor."""
    t = torch.ones(GIB // 4)
    t.sum()
    best = min(_seconds(t.sum) for _ in range(max(repeats, 3)))
    del t
    return GIB / best


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def build(preset: str) -> GPT:
    cfg = dataclasses.replace(load_model_config(preset), dropout=0.0)
    torch.manual_seed(0)
    return GPT(cfg).eval()


def variant(model: GPT, kind: str) -> GPT:
    """The model as load_model gives it for `kind` (fp32-rows: fp32 without the decoding layout;
    a kind ending in -ops: as without it, decoded by eager PyTorch's operations instead of the
    fused step, see decode_runs)."""
    m = copy.deepcopy(model)
    kind = kind.removesuffix("-ops")
    if kind == "fp32-rows":
        return m
    if kind == "bf16":
        m = m.to(torch.bfloat16)
    elif kind == "int8":
        m = quant.quantize(m)
    return lay_out_for_decoding(m)


def bytes_per_token(model: GPT, context: float) -> float:
    """What one decoding step reads: every matrix and norm whole (a tied head as a matrix, once),
    one row of each embedding, and the KV cache of `context` positions (in the weights' dtype)."""
    cfg, total = model.config, 0
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            total += m.weight[0].nbytes
        elif isinstance(m, quant.Int8Linear):
            total += sum(b.nbytes for b in m.buffers())
        elif not list(m.children()):
            total += sum(p.nbytes for p in m.parameters(recurse=False))
    kv = 2 * cfg.n_layer * cfg.kv_heads * cfg.head_dim * context * model.transformer.wte.weight.element_size()
    return total + kv


def decode_runs(model: GPT, new_tokens: int, repeats: int, before: Callable[[], float],
                fused: bool = True) -> list[tuple[float, float]]:
    """(tokens/s, what `before()` returned just before) of each of `repeats` greedy batch-1
    decodings, first new token to last (the prefill excluded), after a warm-up; fused=False:
    without mypt.decode_step's one-call step (MYPT_DECODE_STEP=0)."""
    if not fused:
        os.environ["MYPT_DECODE_STEP"] = "0"
        try:
            return decode_runs(model, new_tokens, repeats, before)
        finally:
            del os.environ["MYPT_DECODE_STEP"]
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=0, ignore_eot=True)
    prompt = torch.randint(0, model.config.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1))
    runs = []
    for i in range(repeats + 1):  # the first is a warm-up
        ids = generate_ids(model, prompt.tolist(), cfg, vocab_size=model.config.vocab_size, seed=0)
        next(ids)
        measured = before()
        start = time.perf_counter()
        n = sum(1 for _ in ids)
        if i:
            runs.append((n / (time.perf_counter() - start), measured))
    return runs


def roofline(args: argparse.Namespace) -> None:
    """The decode table. This VM's read bandwidth drifts (26-52 GB/s within an hour, even within
    a minute), so it is measured again right before each timed decoding (the best of two sums
    over 1 GiB), and a row's roofline fraction is the median over its runs of each run's bytes
    per second against the bandwidth measured just before it."""
    kinds = ["fp32", "fp32-ops", "fp32-rows", "bf16", "int8", "int8-ops"]
    if not native_bf16():
        kinds.remove("bf16")
    context = PROMPT_LEN + args.new_tokens / 2
    big = torch.ones(GIB // 4)
    seen: list[float] = []

    def bandwidth_now() -> float:
        seen.append(GIB / min(_seconds(big.sum) for _ in range(2)))
        return seen[-1]

    rows = []
    for preset in args.presets:
        model = build(preset)
        for kind in kinds:
            m = variant(model, kind)
            runs = decode_runs(m, args.new_tokens, args.repeats, bandwidth_now, fused=not kind.endswith("-ops"))
            nbytes = bytes_per_token(m, min(context, m.config.block_size))
            fraction = statistics.median(speed * nbytes / bw for speed, bw in runs)
            rows.append((preset, kind, nbytes, max(speed for speed, _ in runs), fraction))
            print(f"  {preset} {kind}: {rows[-1][3]:.1f} tokens/s", flush=True)
            del m
    print(f"\n## Batch-1 decode against the roofline\n\nread bandwidth measured before each of {len(seen)} timed runs: "
          f"{min(seen) / 1e9:.1f}-{max(seen) / 1e9:.1f} GB/s (median {statistics.median(seen) / 1e9:.1f}); tokens/s "
          "the best run, roofline the median of each run's fraction of the bandwidth just before it\n")
    print(f"{'preset':<24}{'weights':>10}{'MB/token':>10}{'tokens/s':>10}{'GB/s':>8}{'roofline':>10}{'vs fp32':>9}")
    base = {}
    for preset, kind, nbytes, speed, fraction in rows:
        base.setdefault(preset, speed)
        print(f"{preset:<24}{kind:>10}{nbytes / 1e6:>10.1f}{speed:>10.1f}{speed * nbytes / 1e9:>8.1f}"
              f"{fraction:>10.0%}{speed / base[preset]:>8.2f}x")
    if "bf16" not in kinds:
        print("bf16: skipped, this CPU has no native bf16 (avx512_bf16 or AMX): torch would convert every weight")


def block_stack() -> list[nn.Linear]:
    """150M.json's 16 blocks as their 64 matrices (attention's qkv and output, the MLP's two)."""
    torch.manual_seed(0)
    shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 16
    return [nn.Linear(k, n, bias=False).eval() for k, n in shapes]


def stack_runners() -> dict[str, Callable[[], object]]:
    layers = block_stack()
    inputs = {k: torch.randn(1, k) for k in (768, 3072)}

    def chain(fns: list[tuple[int, Callable[[torch.Tensor], torch.Tensor]]]) -> Callable[[], object]:
        def run() -> None:
            with torch.inference_mode():
                for k, fn in fns:
                    fn(inputs[k])
        return run

    runners = {"fp32 nn.Linear": chain([(m.in_features, m) for m in layers])}
    q = [quant.Int8Linear.from_weight(m.weight) for m in layers]
    runners["MyPT int8 kernel"] = chain([(m.in_features, m) for m in q])
    packed = [(m.in_features, m.qweight, m.scale) for m in q]
    for dtype in (torch.float32, torch.bfloat16):
        try:
            torch._weight_int8pack_mm(inputs[768].to(dtype), q[0].qweight, q[0].scale.to(dtype))
        except RuntimeError as e:
            print(f"torch._weight_int8pack_mm with {dtype} inputs: not supported ({str(e).splitlines()[0][:100]})")
            continue
        runners[f"torch._weight_int8pack_mm {str(dtype)[6:]}"] = chain(
            [(k, lambda x, w=w, s=s, d=dtype: torch._weight_int8pack_mm(x.to(d), w, s))
             for k, w, s in ((k, w, s.to(dtype)) for k, w, s in packed)])
    try:
        from torchao import __version__ as ao_version
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        print("torchao: not installed (pip install torchao), its row is left out")
    else:
        ao = nn.Sequential(*copy.deepcopy(layers))
        quantize_(ao, Int8WeightOnlyConfig())
        runners[f"torchao {ao_version} Int8WeightOnlyConfig"] = chain([(m.in_features, m) for m in ao])
    return runners


def stack(args: argparse.Namespace) -> None:
    print("\n## 150M.json's block stack at batch 1 (64 matrix-vector products, 113M weights)\n")
    runners = stack_runners()
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(args.repeats + 1):
        for name, run in runners.items():  # alternating, so a busy moment hurts all alike
            best[name] = min(best[name], _seconds(run))
    base = best["fp32 nn.Linear"]
    for name, t in best.items():
        print(f"{name:<44}{t * 1e3:>9.2f} ms{base / t:>8.2f}x fp32")


def profile(args: argparse.Namespace) -> None:
    """Where an int8 decoding step of 150M.json goes: the int8 layers (timed by hooks), the rest.
    With hooks the model decodes through its modules (mypt.decode_step steps aside): this is the
    eager path's profile (int8-ops in the table)."""
    model = quant.quantize(build("150M.json"))
    spent = [0.0]
    for m in model.modules():
        if isinstance(m, quant.Int8Linear):
            m.register_forward_pre_hook(lambda *_: spent.append(-time.perf_counter()))
            m.register_forward_hook(lambda *_: spent.append(time.perf_counter()))
    spent[:] = [0.0]
    start = time.perf_counter()
    speed = decode_runs(model, args.new_tokens, 1, lambda: 0.0)[0][0]  # its warm-up and one run
    total = time.perf_counter() - start
    layers = sum(spent)
    print(f"\n## Profile: 150M.json int8 (eager), {speed:.1f} tokens/s: {layers / total:.0%} of the time in the "
          f"int8 layers (65 per token, incl. the head), {1 - layers / total:.0%} elsewhere (attention, norms, "
          "sampling, Python)")


def quality(args: argparse.Namespace) -> None:
    from mypt.api import load_model

    fp32 = load_model(args.quality_model, args.checkpoints_dir, device="cpu")
    int8 = load_model(args.quality_model, args.checkpoints_dir, device="cpu", quantize="int8")
    text = Path(args.input_file).read_text(encoding="utf-8")
    held_out = text[int(len(text) * 0.9):][: args.quality_chars]
    l32, l8 = fp32.evaluate(held_out).loss, int8.evaluate(held_out).loss
    print(f"\n## Quality: {args.quality_model} ({fp32.num_params:,} parameters)\n")
    print(f"validation loss on {len(held_out):,} held-out characters: fp32 {l32:.4f}, int8 {l8:.4f} "
          f"({(l8 - l32) / l32:+.2%})")
    agree, first = 0, []
    for i in range(args.quality_prompts):
        at = len(held_out) * i // args.quality_prompts
        prompt = held_out[at: at + 64]
        a = fp32.tokenizer.encode(fp32.generate(prompt, max_new_tokens=256, temperature=0, ignore_eot=True))
        b = int8.tokenizer.encode(int8.generate(prompt, max_new_tokens=256, temperature=0, ignore_eot=True))
        agree += sum(x == y for x, y in zip(a, b, strict=False))
        first.append(next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))))
    print(f"greedy agreement over 256 tokens, {args.quality_prompts} prompts: {agree / (256 * len(first)):.1%} of "
          f"positions equal; first difference at token {sorted(first)} (256: none)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=PRESETS)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no_stack", action="store_true", help="leave out the block-stack kernel comparison")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--quality_model", help="a trained checkpoint to measure int8's loss and greedy agreement on")
    p.add_argument("--checkpoints_dir", default="checkpoints")
    p.add_argument("--input_file", help="its training text (the last 10%% is held out)")
    p.add_argument("--quality_chars", type=int, default=50_000)
    p.add_argument("--quality_prompts", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(header("MyPT batch-1 decoding against the memory roofline"))
    print(f"kernels: {'MyPT AVX2 kernels' if kernels.available() else 'not available: ' + str(kernels.problem())}")
    bw = bandwidth(args.repeats)
    print(f"read bandwidth at the start: {bw / 1e9:.1f} GB/s (best torch sum over 1 GiB, {args.threads} threads)")
    roofline(args)
    if not args.no_stack:
        stack(args)
    if args.profile:
        profile(args)
    if args.quality_model:
        quality(args)


if __name__ == "__main__":
    main()
