"""A live model from a checkpoint folder: its config, its tokenizer, the GPT with its weights.

The one place a model is rebuilt from a checkpoint (generate, eval, export, resume, inspect, the
Python API): a folder describes itself, so nothing here comes from a command line. The weights'
names and shapes are checked against config.json before they are loaded, and the output layer
is re-tied after loading (GPT.tie_weights). A new model is built here too (`new_model`); a model
whose weights cannot fit the device, or fail to allocate there, is one MyPTError naming its sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from mypt.checkpoint import Checkpoint
from mypt.config import ModelConfig
from mypt.errors import MyPTError
from mypt.finetune.lora import adapted, apply_lora, merge_lora
from mypt.model import GPT
from mypt.tokenizers import Tokenizer, tokenizer_from_json


@dataclass
class Built:
    model: GPT
    config: ModelConfig
    tokenizer: Tokenizer


def checkpoint_config(ckpt: Checkpoint) -> ModelConfig:
    return ModelConfig.from_dict(ckpt.config, f"{ckpt.path}/config.json")


def checkpoint_tokenizer(ckpt: Checkpoint, cfg: ModelConfig) -> Tokenizer:
    tok = tokenizer_from_json(ckpt.tokenizer, f"{ckpt.path}/tokenizer.json")
    if tok.n_vocab > cfg.vocab_size:
        raise MyPTError(f"{ckpt.path}/tokenizer.json: {tok.kind} has {tok.n_vocab} tokens but config.json's "
                        f"vocab_size is {cfg.vocab_size}; the folder mixes files of different models")
    return tok


def build_model(ckpt: Checkpoint, device: str | torch.device = "cpu", merge_adapters: bool = False) -> Built:
    """The checkpoint's model on device, its weights loaded (a checkpoint loaded without weights:
    on "meta", a shell for counting; elsewhere, freshly initialised).

    A LoRA fine-tune's model has its adapters (config.json's "lora"): trainable, or with
    merge_adapters folded into plain layers, for sampling and export at the base model's speed
    (the returned config then has no "lora")."""
    cfg = checkpoint_config(ckpt)
    tok = checkpoint_tokenizer(ckpt, cfg)
    with torch.device("meta"):
        model = GPT(cfg)
        if cfg.lora is not None:
            apply_lora(model, cfg.lora_config)
    if ckpt.model_state:
        _load_weights(model, ckpt)
        with allocating(cfg, device):
            model.to(device)
    elif torch.device(device).type != "meta":
        with allocating(cfg, device):
            model.to_empty(device=device)
        model.tie_weights()
        model.init_weights()
        for _, layer in adapted(model):
            layer.reset_adapter()
    if merge_adapters and cfg.lora is not None:
        merge_lora(model)
        cfg = replace(cfg, lora=None)
    return Built(model, cfg, tok)


def new_model(cfg: ModelConfig, device: torch.device) -> GPT:
    """A new GPT of cfg on device, initialised from torch's current seed (as GPT(cfg) is)."""
    with allocating(cfg, device):
        return GPT(cfg).to(device)


def check_weights_fit(cfg: ModelConfig, device: str | torch.device) -> None:
    """Refuse a model whose fp32 weights alone exceed the device's memory: it could never run, so
    --skip_memory_check does not skip this."""
    from mypt.estimate import count_params, detect_memory, human_bytes

    n = count_params(cfg)
    total, where = detect_memory(torch.device(device))
    if 4 * n > total:
        raise MyPTError(f"the model ({_sizes(cfg, n)}) needs {human_bytes(4 * n)} for its fp32 weights alone, more "
                        f"than {where} ({human_bytes(total)}); {_SMALLER}")


_SMALLER = "use a smaller config (fewer or narrower layers, a smaller vocab_size or block_size)"


def _sizes(cfg: ModelConfig, n: int) -> str:
    return (f"{n:,} parameters: n_layer {cfg.n_layer}, n_embd {cfg.n_embd}, vocab_size {cfg.vocab_size}, "
            f"block_size {cfg.block_size}")


@contextmanager
def allocating(cfg: ModelConfig, device: str | torch.device) -> Iterator[None]:
    """Allocate cfg's weights on device inside: check_weights_fit first, and an allocation that
    fails all the same becomes one MyPTError naming the config's sizes, not a traceback."""
    check_weights_fit(cfg, device)
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        if not isinstance(exc, (torch.OutOfMemoryError, MemoryError)) and "allocat" not in str(exc):
            raise
        from mypt.estimate import count_params

        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise MyPTError(f"the model ({_sizes(cfg, count_params(cfg))}) could not be allocated on "
                        f"{torch.device(device)} ({reason}); {_SMALLER}") from None


def tensor_problems(got: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]],
                    ignored: Callable[[str], bool] = lambda name: False) -> list[str]:
    """What keeps the tensors `got` from being the ones named in `shapes` (empty: nothing):
    missing and unexpected names (but those `ignored`), and shapes config.json does not imply."""
    problems = []
    missing = [name for name in shapes if name not in got]
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:5])}")
    extra = sorted(name for name in got if name not in shapes and not ignored(name))
    if extra:
        problems.append(f"tensors config.json does not describe: {', '.join(extra[:5])}")
    for name, shape in shapes.items():
        if name in got and tuple(got[name].shape) != tuple(shape):
            problems.append(f"{name} has shape {tuple(got[name].shape)}, config.json implies {tuple(shape)}")
    return problems


def _load_weights(model: GPT, ckpt: Checkpoint) -> None:
    """Copy the checkpoint's weights into model; names and shapes that disagree with config.json are named."""
    problems = tensor_problems(ckpt.model_state, {k: tuple(t.shape) for k, t in model.state_dict().items()})
    if problems:
        raise MyPTError(f"{ckpt.path}/{ckpt.weights_file} does not match {ckpt.path}/config.json: "
                        + "; ".join(problems[:5]))
    model.load_state_dict(ckpt.model_state, assign=True)
    model.tie_weights()  # assign=True replaced the tied parameters one by one
