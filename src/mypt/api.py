"""The Python API: load a trained model once, then use it (generate, stream, evaluate).

    from mypt.api import load_model
    lm = load_model("dante")                      # checkpoints/dante/, loaded once
    print(lm.generate("To be", max_new_tokens=50, seed=1))
    for piece in lm.stream("To be", temperature=0):   # text as it is generated
        print(piece, end="", flush=True)
    lm.evaluate(open("held_out.txt").read()).bits_per_char
    lm.evaluate_task("builtin")[0].acc           # task accuracy (mypt.evaluation)
    chat = load_model("dante-chat")               # a model fine-tuned by mypt finetune
    print(chat.chat([{"role": "user", "content": "Who speaks next?"}]).text())

generate/stream take the fields of mypt.sampling.SamplingConfig as keywords (max_new_tokens,
temperature, top_k, top_p, repetition_penalty, seed, stop, use_cache, ignore_eot, lookup). The text
ends at the model's end-of-text token unless ignore_eot=True. lookup=N turns on prompt-lookup
decoding (mypt.lookup): the same text, several tokens per forward pass where it repeats the prompt. A checkpoint folder
describes itself: the model is rebuilt from its config.json, tokenizer.json and model.pt alone,
never from the current command line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mypt import dist
from mypt.build import build_model
from mypt.checkpoint import BEST_DIR, Checkpoint, best_dir, checkpoint_dir, load_checkpoint
from mypt.config import ModelConfig
from mypt.errors import MyPTError
from mypt.finetune.template import ROLES, Message, check_template, prompt_ids, stop_ids
from mypt.model import GPT
from mypt.ops import lay_out_for_decoding
from mypt.quant import check_kind
from mypt.quant import quantize as quantize_model
from mypt.sampling import SamplingConfig, TextStream, fresh_seed, generate_ids
from mypt.tokenizers import Tokenizer

if TYPE_CHECKING:
    from mypt.evaluation.report import TaskResult
    from mypt.evaluation.tasks import Task


@dataclass(frozen=True)
class EvalResult:
    """How well a model predicts a text: every token predicted once, in block_size windows."""

    loss: float  # mean nats per token (tokenizer-dependent)
    n_tokens: int
    n_chars: int
    total_nats: float
    n_bytes: int = 0  # UTF-8 bytes of the text

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_char(self) -> float:
        """Comparable across tokenizers: total information over the number of characters."""
        return self.total_nats / (math.log(2) * self.n_chars)

    @property
    def bits_per_byte(self) -> float:
        """Comparable across tokenizers and scripts: total information over the text's UTF-8 bytes."""
        return self.total_nats / (math.log(2) * self.n_bytes)


@dataclass
class LoadedModel:
    """A checkpoint loaded for inference: generate, stream or evaluate with it as often as needed.

    dtype is the autocast precision of its forward passes (fp32, bf16 or fp16).
    """

    model: GPT
    config: ModelConfig
    tokenizer: Tokenizer
    checkpoint: Checkpoint
    device: torch.device
    dtype: str

    @property
    def folder(self) -> Path:
        """The model's folder in checkpoints/ (also when these are its best/ weights)."""
        path = self.checkpoint.path
        return path.parent if path.name == BEST_DIR else path

    @property
    def num_params(self) -> int:
        """The architecture's parameters (a tied head counted once), however they are stored."""
        from mypt.estimate import count_params

        return count_params(self.config)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def iterations(self) -> int | None:
        """Training iterations recorded in training_state.json (None if it does not say)."""
        value = self.checkpoint.training_state.get("iteration")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def encode_prompt(self, prompt: str, what: str = "prompt") -> list[int]:
        """Token ids of prompt; an empty prompt is the tokenizer's start token. Not cropped. An imported
        tokenizer that begins every text with a token (Llama 3's <|begin_of_text|>) begins a prompt with it."""
        if not prompt:
            return self.tokenizer.start_ids()
        return getattr(self.tokenizer, "prompt_prefix", []) + self.tokenizer.encode(prompt, what)

    def stream(self, prompt: str = "", **options: Any) -> TextStream:
        """An iterator over the text pieces of prompt's continuation (the prompt not included).

        A prompt longer than block_size keeps its last block_size tokens; the context then
        slides in steps of block_size // 2. Without `seed` a fresh one is drawn (stream.seed).
        """
        return self._stream(self.encode_prompt(prompt), options)

    def _stream(self, prompt_ids: list[int], options: dict[str, Any]) -> TextStream:
        cfg = SamplingConfig.from_options(options)
        seed = fresh_seed() if cfg.seed is None else cfg.seed
        ids = generate_ids(self.model, prompt_ids, cfg, vocab_size=self.tokenizer.sampled_vocab,
                           seed=seed, amp=lambda: dist.autocast(self.device, self.dtype),
                           dtype=dist.TORCH_DTYPES[self.dtype], eot_id=self.tokenizer.eot_id)
        return TextStream(ids, self.tokenizer, cfg.stop, seed)

    def chat(self, messages: list[dict[str, str]], **options: Any) -> TextStream:
        """A fine-tuned chat model's reply to messages ({"role": "system" | "user" | "assistant",
        "content": ...}), rendered with its chat template, as stream() gives text; it ends at the
        model's end-of-turn. A conversation longer than block_size keeps its end."""
        check_template(self.tokenizer, f"'{self.name}'")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise MyPTError(f"messages[{i}] must be {{\"role\": one of {', '.join(ROLES)}, \"content\": text}}")
        ids = prompt_ids(self.tokenizer, [Message(m["role"], m["content"]) for m in messages], "messages")
        return self._stream(ids, {**options, "stop_ids": stop_ids(self.tokenizer)})

    def generate(self, prompt: str = "", **options: Any) -> str:
        """prompt's continuation as one string (the prompt not included); options as stream()."""
        return self.stream(prompt, **options).text()

    def evaluate(self, text: str, *, what: str = "text", batch_size: int = 8) -> EvalResult:
        """Loss, perplexity, bits per character and per byte of this model on text (`what` names it in errors)."""
        from mypt.evaluation.scoring import text_nats

        n_tokens, total = text_nats(self.model, self.tokenizer, text, self.device, self.dtype, what, batch_size)
        return EvalResult(total / n_tokens, n_tokens, len(text), total, len(text.encode("utf-8")))

    def evaluate_task(self, task: str | Task, *, num_fewshot: int = 0, limit: int | None = None,
                      seed: int = 1234) -> list[TaskResult]:
        """Scores on a task file, `builtin` (the built-in set) or a Task (see mypt.evaluation): one
        TaskResult per task, whose .items hold each item's log-likelihoods."""
        from mypt.evaluation import tasks as taskfiles
        from mypt.evaluation.report import evaluate_task

        loaded = taskfiles.load_tasks(task) if isinstance(task, str) else [task]
        return [evaluate_task(self.model, self.tokenizer, taskfiles.prepare(t, num_fewshot, limit, seed),
                              self.device, self.dtype, self.name) for t in loaded]


def inference_dtype(requested: str, device: torch.device) -> str:
    """The autocast dtype for generation and evaluation.

    'auto' is fp32 on a CPU: there, bf16 autocast makes one-token decoding slower (measured by
    bench/bench_generate.py), since every step re-casts the weights. Elsewhere as dist.pick_dtype.
    """
    if requested not in dist.TORCH_DTYPES and requested != "auto":
        raise MyPTError(f"dtype {requested!r} is not one of auto, fp32, bf16, fp16")
    if requested == "auto" and device.type == "cpu":
        return "fp32"
    return dist.pick_dtype(requested, device)


def load_model(model_name: str | None = None, checkpoints_dir: str | Path = "checkpoints", *,
               path: str | Path | None = None, best: bool = False, device: str = "auto",
               dtype: str = "auto", quantize: str | None = None) -> LoadedModel:
    """Load checkpoints_dir/model_name (or the folder `path`) for inference, in eval mode.

    best: the weights with the best validation loss (the folder's best/) instead of the latest.
    device: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps. dtype: the autocast dtype
    of the forward pass (auto, fp32, bf16, fp16); the weights stay fp32 unless quantize is "int8":
    then the matrices of the blocks and the output layer are int8 (mypt.quant; CPU only).
    """
    if path is None:
        if model_name is None:
            raise MyPTError("load_model needs a model_name or a path")
        path = checkpoint_dir(checkpoints_dir, model_name)
    folder = best_dir(Path(path)) if best else Path(path)
    torch_device = dist.pick_device(device, dist.DistInfo())
    run_dtype = inference_dtype(dtype, torch_device)
    check_kind(quantize, torch_device)
    ckpt = load_checkpoint(folder)
    built = build_model(ckpt, torch_device, merge_adapters=True)
    built.model.eval()
    if quantize is not None:
        quantize_model(built.model, quantize)
    lay_out_for_decoding(built.model)
    return LoadedModel(built.model, built.config, built.tokenizer, ckpt, torch_device, run_dtype)
