"""Benchmark: the same model in MyPT and in llama.cpp (llama-cpp-python), side by side on a CPU.

    pip install llama-cpp-python       # compiles llama.cpp
    python bench/bench_gguf.py                                  # small, small-modern (llama-compatible), 150M
    python bench/bench_gguf.py --presets tiny --repeats 1       # a quick run

For each preset a MyPT GPT is built (random weights, seed 0, fp32) with block_size raised to
--context so that the whole prompt and continuation fit, exported with `mypt export --format gguf`
at each --outtypes, and timed at batch 1 with --threads threads (torch and llama.cpp alike):

* decode: tokens/s of --new_tokens greedy tokens after a 16-token prompt, timed from the first new
  token to the last (MyPT: sampling.generate_ids with its KV cache, as generate.py; llama.cpp: one
  Llama.eval per token, argmax of the logits);
* prefill: tokens/s of one --prefill-token prompt into an empty cache (MyPT: GPT.next_logits with a
  KV cache; llama.cpp: one Llama.eval of the prompt, n_batch covering it).

small-modern.json has a squared-ReLU MLP and LayerNorm, which no llama.cpp architecture computes:
its llama-compatible variant (RMSNorm, SwiGLU of width 1024, so about the same parameters) is
timed instead, as llama.cpp's qwen3 (it keeps QK-norm). MyPT runs in fp32 and with
`--quantize int8` (mypt.quant: int8 weights, MyPT's kernel), which q8_0 compares with. Each
figure is the best of --repeats runs after a warm-up; each llama.cpp
outtype runs in its own process, so a crash (q8_0 crashed on one CPU) is reported, not fatal.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _machine import header

from mypt.build import Built
from mypt.config import ModelConfig, load_model_config
from mypt.formats.gguf import export_gguf
from mypt.model import GPT
from mypt.ops import lay_out_for_decoding
from mypt.quant import quantize
from mypt.sampling import SamplingConfig, generate_ids
from mypt.tokenizers import GPT2Tokenizer

PROMPT_LEN = 16


def preset_config(preset: str, context: int) -> ModelConfig:
    cfg = load_model_config(preset)
    if cfg.mlp == "relu2":  # small-modern: its llama-compatible variant
        cfg = dataclasses.replace(cfg, name=cfg.name + " (RMSNorm, SwiGLU 1024)", norm="rmsnorm", norm_eps=1e-6,
                                  mlp="swiglu", intermediate_size=1024, zero_init=False)
    return dataclasses.replace(cfg, dropout=0.0, block_size=max(cfg.block_size, context))


def build(cfg: ModelConfig) -> GPT:
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" not in n and "ln_" not in n:
                p.normal_(0.0, 0.02)
    return model


def best(fn, repeats: int) -> float:
    """The least of fn()'s measured seconds over repeats runs, after a warm-up run."""
    fn()
    return min(fn() for _ in range(repeats))


def time_mypt(model: GPT, prompt: list[int], new_tokens: int, prefill: list[int], repeats: int) -> dict:
    vocab = GPT2Tokenizer().sampled_vocab
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=0, ignore_eot=True, seed=0)

    def decode() -> float:
        """Seconds from the first new token (which includes the prompt's prefill) to the last."""
        ids = generate_ids(model, prompt, cfg, vocab_size=vocab, seed=0)
        next(ids)
        start = time.perf_counter()
        assert len(list(ids)) == new_tokens - 1
        return time.perf_counter() - start

    def fill() -> float:
        cache = model.new_cache(1, torch.device("cpu"), torch.float32, capacity=len(prefill))
        start = time.perf_counter()
        model.next_logits(torch.tensor([prefill]), cache)
        return time.perf_counter() - start

    return {"decode": (new_tokens - 1) / best(decode, repeats), "prefill": len(prefill) / best(fill, repeats)}


def last_logits(llm):
    """The logits after llama.cpp's last evaluated token (Llama.scores holds them only with logits_all)."""
    import llama_cpp
    import numpy as np

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def llama_cpp_child(job: dict) -> dict:
    """In a child process: llama.cpp's decode and prefill speed for one file."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=job["path"], n_ctx=job["n_ctx"], n_batch=job["n_ctx"], n_threads=job["threads"],
                n_threads_batch=job["threads"], verbose=False)

    def decode() -> float:
        llm.reset()
        llm.eval(job["prompt"])
        start = time.perf_counter()
        for _ in range(job["new_tokens"] - 1):
            llm.eval([int(np.argmax(last_logits(llm)))])
        return time.perf_counter() - start

    def fill() -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(job["prefill"])
        return time.perf_counter() - start

    return {"decode": (job["new_tokens"] - 1) / best(decode, job["repeats"]),
            "prefill": len(job["prefill"]) / best(fill, job["repeats"])}


def time_llama_cpp(job: dict) -> dict | str:
    proc = subprocess.run([sys.executable, __file__, "--child"], input=json.dumps(job), capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        what = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        return f"crashed ({what})"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_preset(preset: str, args: argparse.Namespace, work: Path) -> list[tuple[str, str, dict | str]]:
    cfg = preset_config(preset, args.context)
    model = build(cfg)
    tok = GPT2Tokenizer()
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 50000, (PROMPT_LEN,), generator=gen).tolist()
    prefill = torch.randint(0, 50000, (args.prefill,), generator=gen).tolist()
    label = f"{preset} ({cfg.name}, {model.num_params() / 1e6:.1f}M)"
    decoding = lay_out_for_decoding(copy.deepcopy(model))  # as load_model lays it out
    rows: list[tuple[str, str, dict | str]] = [(label, "MyPT fp32", time_mypt(decoding, prompt, args.new_tokens,
                                                                            prefill, args.repeats))]
    del decoding
    print(f"{label}: MyPT {rows[-1][2]}", flush=True)
    for outtype in args.outtypes.split(","):
        path = work / f"{Path(preset).stem}-{outtype}.gguf"
        export_gguf(Built(model=model, config=cfg, tokenizer=tok), path, outtype, cfg.name)
        job = {"path": str(path), "n_ctx": cfg.block_size, "threads": args.threads, "repeats": args.repeats,
               "new_tokens": args.new_tokens, "prompt": prompt, "prefill": prefill}
        rows.append((label, f"llama.cpp {outtype}", time_llama_cpp(job)))
        print(f"{label}: llama.cpp {outtype} {rows[-1][2]}", flush=True)
        path.unlink()
    rows.append((label, "MyPT int8", time_mypt(quantize(model), prompt, args.new_tokens, prefill, args.repeats)))
    print(f"{label}: MyPT int8 {rows[-1][2]}", flush=True)
    return rows


def table(rows: list[tuple[str, str, dict | str]]) -> str:
    lines = ["| model | runtime | decode tok/s | prefill tok/s | MyPT fp32 / this, decode |",
             "| --- | --- | ---: | ---: | ---: |"]
    ours: dict[str, float] = {}
    for label, runtime, r in rows:
        if isinstance(r, str):
            lines.append(f"| {label} | {runtime} | {r} | | |")
            continue
        ours.setdefault(label, r["decode"])
        lines.append(f"| {label} | {runtime} | {r['decode']:.1f} | {r['prefill']:.1f} | "
                     f"{ours[label] / r['decode']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="small.json,small-modern.json,150M.json")
    p.add_argument("--outtypes", default="f32,f16,q8_0")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--prefill", type=int, default=256)
    p.add_argument("--context", type=int, default=512, help="block_size (and llama.cpp's n_ctx) at least this")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import llama_cpp

    print(header("MyPT vs llama.cpp, batch-1 decode and prefill"))
    print(f"llama-cpp-python {llama_cpp.__version__}; {args.threads} threads; decode: {args.new_tokens} greedy "
          f"tokens after {PROMPT_LEN}; prefill: {args.prefill} tokens; best of {args.repeats}\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            rows += bench_preset(preset, args, Path(tmp))
    print("\n" + table(rows))


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        print(json.dumps(llama_cpp_child(json.loads(sys.stdin.read()))))
        raise SystemExit(0)
    main()
