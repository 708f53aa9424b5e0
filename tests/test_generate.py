"""Tests for `generate.py` / `mypt generate` and the generation API (mypt.api) on trained models.

Two tiny models are trained once per module by train.py itself: a char model and a gpt2 one,
both with block_size 32 so that 80 new tokens slide the context several times.
"""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import corpus_text, run_cli, tiny_arch_flags

from mypt.api import LoadedModel, load_model
from mypt.cli import run_command
from mypt.errors import MyPTError

TRAIN_FLAGS = ["--max_iters", "30", "--eval_interval", "30", "--eval_iters", "2", "--dtype", "fp32"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # two threads on two busy shared cores spin far slower than one



def training_text() -> str:
    return corpus_text(40_000)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """checkpoints/ holding 'chars' (char tokenizer) and 'bpe' (gpt2), trained by train.py."""
    root = tmp_path_factory.mktemp("gen")
    (root / "input.txt").write_text(training_text(), encoding="utf-8")
    for name, tokenizer in (("chars", "char"), ("bpe", "gpt2")):
        r = run_cli("--model_name", name, "--tokenizer", tokenizer, "--input_file", "input.txt",
                    *tiny_arch_flags(), *TRAIN_FLAGS, cwd=root, env=ONE_THREAD)
        assert r.returncode == 0, r.stderr
    return root / "checkpoints"


@pytest.fixture(scope="module")
def chars(ckpts: Path) -> LoadedModel:
    return load_model("chars", ckpts, device="cpu", dtype="fp32")


def generate(capsys: pytest.CaptureFixture, ckpts: Path, *args: str) -> tuple[int, str, str]:
    """Run `mypt generate` in this process: (exit status, stdout, stderr)."""
    code = run_command("generate", ["--checkpoints_dir", str(ckpts), "--device", "cpu", *args])
    out, err = capsys.readouterr()
    return code, out, err


def reference_greedy(lm: LoadedModel, prompt: str, n: int) -> str:
    """Greedy text with no cache: model.forward over the whole window every token."""
    block, seq, start = lm.config.block_size, lm.encode_prompt(prompt)[-lm.config.block_size:], 0
    first = len(seq)
    for _ in range(n):
        if len(seq) - start > block:
            start = len(seq) - block // 2
        with torch.no_grad():
            logits, _ = lm.model(torch.tensor([seq[start:]]))
        seq.append(int(logits[0, -1, : lm.tokenizer.sampled_vocab].argmax()))
    return lm.tokenizer.decode(seq[first:])


# ----------------------------------------------------------------------------- end to end


def test_generate_py_prints_prompt_and_continuation_and_repeats_with_seed(ckpts: Path) -> None:
    args = ["--model_name", "chars", "--checkpoints_dir", str(ckpts), "--prompt", "ROMEO:",
            "--max_new_tokens", "40", "--seed", "7", "--ignore_eot"]  # an untrained model: end-of-text any time
    first = run_cli(*args, cwd=ckpts.parent, script="generate.py", env=ONE_THREAD)
    again = run_cli(*args, cwd=ckpts.parent, script="generate.py", env=ONE_THREAD)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("ROMEO:") and len(first.stdout) > len("ROMEO:") + 1
    assert first.stdout == again.stdout
    assert first.stderr.startswith("[40 tokens, ") and "seed 7" in first.stderr and "tokens/s" in first.stderr


def test_greedy_cli_with_cache_equals_no_cache_and_reference(capsys: pytest.CaptureFixture, ckpts: Path,
                                                             chars: LoadedModel) -> None:
    common = ["--model_name", "chars", "--prompt", "First", "--temperature", "0",
              "--max_new_tokens", "80", "--dtype", "fp32"]  # 80 tokens: the 32-token context slides
    code, cached, _ = generate(capsys, ckpts, *common)
    assert code == 0
    assert generate(capsys, ckpts, *common, "--no-cache")[1] == cached
    assert cached == "First" + reference_greedy(chars, "First", 80) + "\n"


def test_greedy_api_cached_equals_reference_for_gpt2(ckpts: Path) -> None:
    lm = load_model("bpe", ckpts, device="cpu", dtype="fp32")
    text = lm.generate("The king", max_new_tokens=40, temperature=0)  # 40: the context slides
    assert text == lm.generate("The king", max_new_tokens=40, temperature=0, use_cache=False)
    assert text == reference_greedy(lm, "The king", 40)


def test_generation_keeps_its_kv_cache_in_the_compute_dtype(ckpts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 autocast the cache is bf16 (half the memory), as the server's; in fp32 it is fp32."""
    from mypt.model import GPT

    made = []
    new_cache = GPT.new_cache

    def recorded(self: GPT, *args, **kwargs):
        made.append(new_cache(self, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(GPT, "new_cache", recorded)
    for dtype, expected in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        lm = load_model("chars", ckpts, device="cpu", dtype=dtype)
        assert len(lm.generate("To be", max_new_tokens=40, temperature=0)) == 40  # 40: the context slides
        assert made.pop().k.dtype == expected

def test_lookup_gives_the_text_without_it_on_the_cli_and_the_api(capsys: pytest.CaptureFixture, ckpts: Path) -> None:
    """--lookup N: greedy text equal to plain greedy past block_size (32), and a seed's sampled text too."""
    common = ["--model_name", "chars", "--prompt", "To be, or not to be. To be, or not", "--max_new_tokens", "80"]
    for flags in (["--temperature", "0"], ["--temperature", "0.9", "--top_k", "20", "--seed", "5"]):
        code, plain, _ = generate(capsys, ckpts, *common, *flags)
        assert code == 0
        assert generate(capsys, ckpts, *common, *flags, "--lookup", "6")[:2] == (0, plain)
    lm = load_model("bpe", ckpts, device="cpu", dtype="fp32")
    prompt = "The king is dead. The king is dead. The king"
    assert lm.generate(prompt, max_new_tokens=40, temperature=0, lookup=5) == reference_greedy(lm, prompt, 40)


def test_streaming_prints_the_same_text(capsys: pytest.CaptureFixture, ckpts: Path) -> None:
    common = ["--model_name", "bpe", "--prompt", "Hello", "--max_new_tokens", "30", "--seed", "3"]
    streamed = generate(capsys, ckpts, *common, "--stream")[1]
    assert streamed == generate(capsys, ckpts, *common, "--no-stream")[1]
    assert "\ufffd" not in streamed


def test_num_samples_use_consecutive_seeds(capsys: pytest.CaptureFixture, ckpts: Path, chars: LoadedModel) -> None:
    code, out, _ = generate(capsys, ckpts, "--model_name", "chars", "--prompt", "A", "--max_new_tokens", "20",
                            "--seed", "10", "--num_samples", "2", "--dtype", "fp32")
    assert code == 0
    assert "sample 1 of 2 (seed 10)" in out and "sample 2 of 2 (seed 11)" in out
    second = out.split("(seed 11) -----\n")[1]
    assert second == "A" + chars.generate("A", max_new_tokens=20, seed=11) + "\n"


def test_stop_strings_end_the_text(capsys: pytest.CaptureFixture, ckpts: Path, chars: LoadedModel) -> None:
    full = chars.generate("\n", max_new_tokens=60, temperature=0)
    stop = full[30:32]
    expected = full[: full.find(stop)]
    assert chars.generate("\n", max_new_tokens=60, temperature=0, stop=[stop]) == expected
    escaped = stop.replace("\n", "\\n")
    out = generate(capsys, ckpts, "--model_name", "chars", "--temperature", "0", "--max_new_tokens", "60",
                   "--dtype", "fp32", "--prompt_file", str(write(ckpts.parent / "p.txt", "\n")),
                   "--stop", "zzz", escaped)[1]
    assert out == "\n" + expected + "\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_empty_prompt_starts_from_the_start_token(capsys: pytest.CaptureFixture, ckpts: Path,
                                                  chars: LoadedModel) -> None:
    assert chars.encode_prompt("") == chars.tokenizer.encode("\n")
    assert load_model("bpe", ckpts, device="cpu").encode_prompt("") == [50256]
    code, out, _ = generate(capsys, ckpts, "--model_name", "bpe", "--max_new_tokens", "5", "--seed", "1")
    assert code == 0 and out.strip()


def test_long_prompt_is_cropped_with_a_note(capsys: pytest.CaptureFixture, ckpts: Path) -> None:
    prompt = "To be, or not to be, that is the question: whether 'tis nobler in the mind"
    code, out, err = generate(capsys, ckpts, "--model_name", "chars", "--prompt", prompt, "--max_new_tokens", "5")
    assert code == 0 and out.startswith(prompt[-32:]) and not out.startswith(prompt[:-32])  # what it sees
    assert f"{len(prompt)} tokens long" in err and "last 32 tokens are used (and shown)" in err


def test_a_huge_prompt_file_is_read_only_at_its_end(capsys: pytest.CaptureFixture, ckpts: Path,
                                                     tmp_path: Path) -> None:
    from mypt.cli.options import PROMPT_MAX_BYTES

    text = training_text()
    path = tmp_path / "big.txt"
    path.write_text(text * (PROMPT_MAX_BYTES // len(text) + 2), encoding="utf-8")
    code, out, err = generate(capsys, ckpts, "--model_name", "chars", "--prompt_file", str(path),
                              "--max_new_tokens", "3", "--seed", "1")
    assert code == 0, err
    assert f"only its last {PROMPT_MAX_BYTES:,} are read" in err and "last 32 tokens are used (and shown)" in err
    assert len(out) == 32 + 3 + 1  # the 32 characters the model sees, 3 new ones, a newline


def test_a_tiny_temperature_is_greedy_not_nan(capsys: pytest.CaptureFixture, ckpts: Path) -> None:
    args = ["--model_name", "chars", "--prompt", "ROMEO:", "--max_new_tokens", "20", "--seed", "3"]
    code, tiny, err = generate(capsys, ckpts, *args, "--temperature", "1e-300")
    assert code == 0, err
    assert generate(capsys, ckpts, *args, "--temperature", "0")[1] == tiny


def test_ctrl_c_prints_what_was_generated_so_far(capsys: pytest.CaptureFixture, ckpts: Path, chars: LoadedModel,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (a real SIGINT) once 60 tokens are generated, not streamed (nothing printed yet): the
    60 characters are printed all the same. Pressed after a token count, not after a wait."""
    import mypt.api

    real_generate_ids = mypt.api.generate_ids

    def ctrl_c_after_60(*args: object, **kwargs: object) -> Iterator[int]:
        for n, token in enumerate(real_generate_ids(*args, **kwargs)):
            if n == 60:
                signal.raise_signal(signal.SIGINT)  # Python raises KeyboardInterrupt here
            yield token

    monkeypatch.setattr(mypt.api, "generate_ids", ctrl_c_after_60)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C raises KeyboardInterrupt
    code, out, err = generate(capsys, ckpts, "--model_name", "chars", "--prompt", "ROMEO:", "--no-stream",
                              "--max_new_tokens", "1000000", "--ignore_eot", "--seed", "1", "--dtype", "fp32")
    assert code == 130, err
    assert "interrupted" in err and "Traceback" not in err
    monkeypatch.undo()
    full = chars.generate("ROMEO:", max_new_tokens=60, ignore_eot=True, seed=1)  # the same defaults and dtype
    assert out.startswith("ROMEO:") and out.endswith("\n")
    printed = out[len("ROMEO:"):-1]
    assert len(printed) > 50 and full.startswith(printed), (printed, full)


def test_help_shows_every_flag_with_its_default(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        run_command("generate", ["--help"])
    out = capsys.readouterr().out
    for flag in ("--max_new_tokens", "--temperature", "--top_k", "--top_p", "--repetition_penalty", "--seed",
                 "--num_samples", "--prompt_file", "--stop", "--stream", "--device", "--dtype",
                 "--checkpoints_dir", "slides in steps", "--lookup"):
        assert flag in out
    assert "(default: 200)" in out and "(default: 0.8)" in out


# ----------------------------------------------------------------------------- errors


def assert_error(capsys: pytest.CaptureFixture, ckpts: Path, *args: str) -> str:
    code, out, err = generate(capsys, ckpts, *args)
    assert code == 2 and "Traceback" not in err and err.startswith("error: ")
    return err


def broken_copy(ckpts: Path, name: str) -> Path:
    dst = ckpts / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(ckpts / "chars", dst)
    return dst


def test_unknown_model_lists_the_models_there(capsys: pytest.CaptureFixture, ckpts: Path) -> None:
    err = assert_error(capsys, ckpts, "--model_name", "nope")
    assert "'nope'" in err and "bpe" in err and "chars" in err


def test_missing_file_is_named(capsys: pytest.CaptureFixture, ckpts: Path) -> None:
    (broken_copy(ckpts, "no_tok") / "tokenizer.json").unlink()
    assert "tokenizer.json" in assert_error(capsys, ckpts, "--model_name", "no_tok")


@pytest.mark.parametrize("keep_manifest", [True, False])
def test_truncated_model_pt_is_named(capsys: pytest.CaptureFixture, ckpts: Path, keep_manifest: bool) -> None:
    folder = broken_copy(ckpts, f"trunc_{keep_manifest}")
    data = (folder / "model.pt").read_bytes()
    (folder / "model.pt").write_bytes(data[: len(data) // 2])
    if not keep_manifest:
        drop_manifest(folder)
    err = assert_error(capsys, ckpts, "--model_name", folder.name)
    assert "model.pt" in err and ("truncated" in err or "corrupt" in err)


def drop_manifest(folder: Path) -> None:
    state = json.loads((folder / "training_state.json").read_text())
    del state["manifest"]
    (folder / "training_state.json").write_text(json.dumps(state))


def test_config_that_does_not_match_weights(capsys: pytest.CaptureFixture, ckpts: Path) -> None:
    folder = broken_copy(ckpts, "reshaped")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    drop_manifest(folder)  # else the manifest reports config.json as modified
    err = assert_error(capsys, ckpts, "--model_name", "reshaped")
    assert "model.pt does not match" in err and "config.json" in err


def test_prompt_outside_a_char_vocabulary(capsys: pytest.CaptureFixture, ckpts: Path) -> None:
    err = assert_error(capsys, ckpts, "--model_name", "chars", "--prompt", "naïve ☃")
    assert "prompt" in err and "'☃'" in err


def test_sampling_values_that_could_make_nan_are_refused_naming_the_flag(capsys: pytest.CaptureFixture, ckpts: Path,
                                                                         chars: LoadedModel) -> None:
    """A repetition penalty of 1e-38 once overflowed the logits (NaN) and printed garbage."""
    err = assert_error(capsys, ckpts, "--model_name", "chars", "--repetition_penalty", "1e-38", "--top_p", "1e-50",
                       "--temperature", "1e300")
    assert "--repetition_penalty (1e-38) must be a number from 0.01 to 100" in err
    assert "--temperature (1e+300) must be" in err and "--top_p" not in err  # a tiny top_p is fine
    with pytest.raises(MyPTError, match=r"repetition_penalty \(1e-38\) must be"):
        chars.generate("ROMEO:", repetition_penalty=1e-38)
    assert chars.generate("ROMEO:", max_new_tokens=10, top_p=1e-50, seed=1) == chars.generate(
        "ROMEO:", max_new_tokens=10, temperature=0)  # only the likeliest token is left


def test_bad_lookup_values_exit_2_naming_the_flag(capsys: pytest.CaptureFixture, ckpts: Path) -> None:
    for bad in ("-1", "65"):
        err = assert_error(capsys, ckpts, "--model_name", "chars", "--lookup", bad)
        assert f"--lookup ({bad}) must be an integer from 0 to 64" in err
    err = assert_error(capsys, ckpts, "--model_name", "chars", "--lookup", "3", "--no-cache")
    assert "--lookup (3) needs the KV cache" in err


def test_bad_flags_and_prompt_file(capsys: pytest.CaptureFixture, ckpts: Path) -> None:
    err = assert_error(capsys, ckpts, "--model_name", "chars", "--temperature", "-1", "--top_p", "2")
    assert "temperature" in err and "top_p" in err
    err = assert_error(capsys, ckpts, "--model_name", "chars", "--prompt_file", str(ckpts / "missing.txt"))
    assert "--prompt_file" in err and "missing.txt" in err


def test_a_loaded_model_decodes_through_mypts_kernels(ckpts: Path, chars: LoadedModel,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """load_model readies the blocks' layers for decoding (mypt.ops.lay_out_for_decoding): where
    MyPT's kernels run (CI's x86-64 runners), DecodeLinear layers with the same row-major
    parameters, whose few-row products run in the kernel; the logits of a prompt and of each
    decoding step are the checkpoint's model's."""
    from mypt import kernels
    from mypt.build import build_model
    from mypt.checkpoint import load_checkpoint
    from mypt.kernels import DecodeLinear, available

    assert available()
    monkeypatch.setattr(kernels, "MIN_WEIGHTS", 1)  # this tiny model's matrices too
    plain = build_model(load_checkpoint(ckpts / "chars")).model.eval()
    blocks = [m for n, m in chars.model.named_modules() if n.startswith("transformer.h.") and
              isinstance(m, torch.nn.Linear)]
    assert blocks and all(type(m) is DecodeLinear and m.weight.is_contiguous() for m in blocks)
    assert not any(type(m) is DecodeLinear for m in plain.modules())
    ids = torch.tensor([chars.encode_prompt("ROMEO: But soft")])
    with torch.no_grad():
        torch.testing.assert_close(chars.model(ids)[0], plain(ids)[0], atol=1e-5, rtol=1e-5)
        for t in range(1, ids.size(1)):  # one row at a time: the kernel's path, against torch's
            mine = chars.model.next_logits(ids[:, :t])
            torch.testing.assert_close(mine, plain.next_logits(ids[:, :t]), atol=1e-5, rtol=1e-5)
