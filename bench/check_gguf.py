"""Check: MyPT's GGUF export, run by llama.cpp itself (through llama-cpp-python).

    pip install llama-cpp-python       # compiles llama.cpp: several minutes on 2 cores
    python bench/check_gguf.py                                   # four small models, f32 f16 q8_0
    python bench/check_gguf.py --model_name dante --checkpoints_dir checkpoints
    python bench/check_gguf.py --converter path/to/convert_hf_to_gguf.py   # also llama.cpp's converter

Not part of the test suite (the compile would take CI's time); tests/test_gguf.py reads the files
back without llama.cpp. For each model and each --outtypes, the model is exported with
`mypt export --format gguf`, loaded by llama_cpp.Llama in a child process (a crash, such as a
segmentation fault, is reported as that outtype's result instead of ending the check), and:

* greedy continuations of several prompts, 32 tokens each, are compared with MyPT's generate
  (sampling.generate_ids at temperature 0, end-of-text ignored): both start from MyPT's prompt ids
  and both choose among the ids MyPT may sample (Tokenizer.sampled_vocab). f32 and f16 must agree
  token for token; q8_0's agreement is reported;
* llama.cpp's tokenization of a few texts (unicode, whitespace runs, the end-of-text string as
  plain text) is compared with MyPT's ids.

The default models are random (seed 0, weights of std 0.5, so greedy choices are far from ties):
gpt2 (GPT-2 recipe, gpt2 tokenizer), llama (rotary + RMSNorm + SwiGLU, grouped-query, untied,
gpt2 tokenizer), qwen3 (the same with QK-norm, a bpe tokenizer) and char (GPT-2 recipe, char
tokenizer). With --converter, the gpt2 model also goes through `mypt export --format hf` and
llama.cpp's own convert_hf_to_gguf.py (vendored in llama-cpp-python's source package), and that
file is checked the same way. Exits 1 if an f32 or f16 file disagrees with MyPT.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _machine import header

from mypt.api import load_model
from mypt.checkpoint import save_checkpoint
from mypt.config import ModelConfig
from mypt.model import GPT
from mypt.sampling import SamplingConfig, generate_ids
from mypt.tokenizers import EOT, CharTokenizer, GPT2Tokenizer, Tokenizer, train_bpe

NEW_TOKENS = 32
PROMPTS = ["ROMEO:", "The quick brown fox", "Once upon a time, in a land far away,", "\n", "1 2 3 4"]
TEXTS = ["Hello, world! It's a test.", "naïve café, Ærøskøbing, 日本語, emoji 🎉👍🏽",
         "  leading spaces,   runs   of spaces,\n\n\nnewlines\tand\ttabs   \n",
         f"plain text {EOT} is not the special token", "I'm sure they'll say we've done it; 12345 3.14159"]
CHAR_TEXT = "".join(sorted(set("".join(PROMPTS + TEXTS))))
SHAPE = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 128, "batch_size": 4, "dropout": 0.0, "bias": False}
LLAMA = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "intermediate_size": 160, "rope_theta": 10000.0,
         "norm_eps": 1e-6}


def default_models(root: Path) -> list[str]:
    """The four random models in root (a checkpoints folder); their names."""
    bpe = train_bpe([" ".join(PROMPTS + TEXTS) * 20], 384, "check_gguf")
    models = {"gpt2": ({}, GPT2Tokenizer()), "llama": ({**LLAMA, "n_kv_head": 2, "tie_embeddings": False},
                                                         GPT2Tokenizer()),
              "qwen3": ({**LLAMA, "qk_norm": True, "n_kv_head": 2}, bpe),
              "char": ({}, CharTokenizer.from_text(CHAR_TEXT))}
    for name, (fields, tok) in models.items():
        torch.manual_seed(0)
        cfg = ModelConfig(**{**SHAPE, "vocab_size": tok.model_vocab_size(), **fields})
        model = GPT(cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                gain = 1.0 if "norm" in n or "ln_" in n else 0.0
                p.copy_(torch.randn_like(p) * (0.3 if gain else 0.5) + gain)
        save_checkpoint(root / name, model_state=model.state_dict(), config=cfg.to_dict(), tokenizer=tok.to_json(),
                        training_state={"iteration": 0}, optimizer_state={})
    return list(models)


def mypt_greedy(loaded, prompt_ids: list[int], n: int) -> list[int]:
    cfg = SamplingConfig(max_new_tokens=n, temperature=0, ignore_eot=True, seed=0)
    return list(generate_ids(loaded.model, prompt_ids, cfg, vocab_size=loaded.tokenizer.sampled_vocab, seed=0,
                             eot_id=loaded.tokenizer.eot_id))


def last_logits(llm):
    """The logits after llama.cpp's last evaluated token (Llama.scores holds them only with logits_all)."""
    import llama_cpp
    import numpy as np

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def llama_cpp_child(path: str, job: dict) -> dict:
    """Run in a child process: greedy continuations and tokenizations by llama.cpp."""
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=job["n_ctx"], n_threads=job["threads"], n_batch=job["n_ctx"],
                verbose=False)
    continuations = []
    for ids, n in zip(job["prompts"], job["new_tokens"], strict=True):
        llm.reset()
        llm.eval(ids)
        new = []
        for _ in range(n):
            logits = last_logits(llm)[:job["sampled_vocab"]]
            new.append(int(logits.argmax()))
            llm.eval([new[-1]])
        continuations.append(new)
    tokens = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in job["texts"]]
    return {"continuations": continuations, "tokens": tokens}


def run_child(path: Path, job: dict) -> dict | str:
    """The child's answer, or why there is none (a crash: its signal)."""
    proc = subprocess.run([sys.executable, __file__, "--child", str(path)], input=json.dumps(job),
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:200]
        what = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        return f"crashed ({what}) {tail}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def export(root: Path, name: str, out: Path, outtype: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "mypt", "export", "--model_name", name, "--checkpoints_dir",
                           str(root), "--format", "gguf", "--out", str(out), "--outtype", outtype],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"export of {name} ({outtype}) failed: {proc.stderr.strip()}")


def compare(label: str, path: Path, job: dict, want: list[list[int]], tok: Tokenizer, exact: bool) -> bool:
    """Print one file's agreement with MyPT; False if it had to be exact and was not (or crashed)."""
    got = run_child(path, job)
    if isinstance(got, str):
        print(f"  {label}: llama.cpp {got}")
        return not exact
    same = sum(a == b for a, b in zip(got["continuations"], want, strict=True))
    agree = sum(x == y for a, b in zip(got["continuations"], want, strict=True) for x, y in zip(a, b, strict=True))
    total = sum(job["new_tokens"])
    print(f"  {label}: greedy continuations identical {same}/{len(want)}, tokens agreeing {agree}/{total} "
          f"({100 * agree / total:.1f}%)")
    for prompt, a, b in zip(job["prompts"], got["continuations"], want, strict=True):
        if a != b:
            print(f"    differs after {tok.decode(prompt)!r}: mypt {tok.decode(b)!r} / llama.cpp {tok.decode(a)!r}")
    tok_same = [g == tok.encode(t) for g, t in zip(got["tokens"], job["texts"], strict=True)]
    print(f"  {label}: tokenization identical for {sum(tok_same)}/{len(tok_same)} texts")
    for text, ok, ids in zip(job["texts"], tok_same, got["tokens"], strict=True):
        if not ok:
            print(f"    {text!r}: mypt {tok.encode(text)} / llama.cpp {ids}")
    return not exact or (same == len(want) and all(tok_same))


def make_job(loaded, prompts: list[list[int]], texts: list[str], threads: int) -> tuple[dict, list[list[int]]]:
    """The child's job and MyPT's greedy continuations, each within block_size (llama.cpp's
    context ends there, where MyPT's window slides on)."""
    new_tokens = [min(NEW_TOKENS, loaded.config.block_size - len(p)) for p in prompts]
    want = [mypt_greedy(loaded, p, n) for p, n in zip(prompts, new_tokens, strict=True)]
    job = {"prompts": prompts, "texts": texts, "n_ctx": loaded.config.block_size, "threads": threads,
           "sampled_vocab": loaded.tokenizer.sampled_vocab, "new_tokens": new_tokens}
    return job, want


def check_model(root: Path, name: str, outtypes: list[str], threads: int, work: Path) -> bool:
    loaded = load_model(name, checkpoints_dir=str(root), device="cpu")
    tok = loaded.tokenizer
    texts = [t for t in TEXTS if not isinstance(tok, CharTokenizer) or set(t) <= set(tok.chars)]
    prompts = [tok.encode(p) for p in PROMPTS if not isinstance(tok, CharTokenizer) or set(p) <= set(tok.chars)]
    job, want = make_job(loaded, prompts, texts, threads)
    print(f"{name}: {loaded.config.name}, {loaded.model.num_params():,} parameters, {tok.kind} tokenizer")
    ok = True
    for outtype in outtypes:
        path = work / f"{name}-{outtype}.gguf"
        export(root, name, path, outtype)
        ok &= compare(f"{outtype:5}", path, job, want, tok, exact=outtype != "q8_0")
    return ok


def check_converter(root: Path, converter: Path, threads: int, work: Path) -> bool:
    """The gpt2 model through --format hf and llama.cpp's own convert_hf_to_gguf.py, f32."""
    hf, path = work / "gpt2-hf", work / "gpt2-converted-f32.gguf"
    subprocess.run([sys.executable, "-m", "mypt", "export", "--model_name", "gpt2", "--checkpoints_dir", str(root),
                    "--out", str(hf)], check=True, capture_output=True)
    proc = subprocess.run([sys.executable, str(converter), str(hf), "--outfile", str(path), "--outtype", "f32"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"gpt2 via convert_hf_to_gguf.py: refused: {proc.stderr.strip().splitlines()[-1][:300]}")
        return False
    loaded = load_model("gpt2", checkpoints_dir=str(root), device="cpu")
    tok = loaded.tokenizer
    job, want = make_job(loaded, [tok.encode(p) for p in PROMPTS], TEXTS, threads)
    print("gpt2 via --format hf and llama.cpp's convert_hf_to_gguf.py:")
    return compare("f32  ", path, job, want, tok, exact=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_name", help="check this model (a folder under --checkpoints_dir) instead of the four "
                   "random ones")
    p.add_argument("--checkpoints_dir", default="checkpoints")
    p.add_argument("--outtypes", default="f32,f16,q8_0")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--converter", type=Path, help="llama.cpp's convert_hf_to_gguf.py, to check it too")
    args = p.parse_args()
    import llama_cpp

    print(header("MyPT GGUF export in llama.cpp"))
    print(f"llama-cpp-python {llama_cpp.__version__}; {NEW_TOKENS} greedy tokens per prompt\n")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.model_name:
            root, names = Path(args.checkpoints_dir), [args.model_name]
        else:
            root = work / "checkpoints"
            names = default_models(root)
        for name in names:
            ok &= check_model(root, name, args.outtypes.split(","), args.threads, work)
        if args.converter:
            ok &= check_converter(root, args.converter, args.threads, work)
    print("\nall f32 and f16 files agree with MyPT" if ok else "\nMISMATCH: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(llama_cpp_child(sys.argv[2], json.loads(sys.stdin.read()))))
        raise SystemExit(0)
    raise SystemExit(main())
