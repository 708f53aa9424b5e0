"""The Python API: load a trained model once, then use it (generate, stream, evaluate).

    from mypt.api import load_model
    lm = load_model("dante")            # checkpoints/dante/
    print(lm.model.num_params())

A checkpoint folder describes itself: the model is rebuilt from its config.json, tokenizer.json
and model.pt alone, never from the current command line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mypt import dist
from mypt.checkpoint import Checkpoint, checkpoint_dir, load_checkpoint
from mypt.config import ModelConfig
from mypt.errors import MyPTError
from mypt.model import GPT
from mypt.tokenizers import Tokenizer, tokenizer_from_json


@dataclass
class LoadedModel:
    model: GPT
    config: ModelConfig
    tokenizer: Tokenizer
    checkpoint: Checkpoint
    device: torch.device
    dtype: str

    @property
    def name(self) -> str:
        return self.checkpoint.path.name


def load_model(model_name: str | None = None, checkpoints_dir: str | Path = "checkpoints", *,
               path: str | Path | None = None, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load checkpoints_dir/model_name (or the folder `path`) for inference, in eval mode."""
    if path is None:
        if model_name is None:
            raise MyPTError("load_model needs a model_name or a path")
        path = checkpoint_dir(checkpoints_dir, model_name)
    ckpt = load_checkpoint(Path(path))
    cfg = ModelConfig.from_dict(ckpt.config, f"{ckpt.path}/config.json")
    tok = tokenizer_from_json(ckpt.tokenizer, f"{ckpt.path}/tokenizer.json")
    if tok.n_vocab > cfg.vocab_size:
        raise MyPTError(f"{ckpt.path}/tokenizer.json: {tok.kind} has {tok.n_vocab} tokens but config.json's "
                        f"vocab_size is {cfg.vocab_size}; the folder mixes files of different models")
    torch_device = dist.pick_device(device, dist.DistInfo())
    with torch.device("meta"):
        model = GPT(cfg)
    load_weights(model, ckpt)
    model.to(torch_device).eval()
    return LoadedModel(model, cfg, tok, ckpt, torch_device, dist.pick_dtype(dtype, torch_device))


def load_weights(model: GPT, ckpt: Checkpoint) -> None:
    """Copy a checkpoint's weights into model; shapes that disagree with config.json are named."""
    expected = model.state_dict()
    problems = []
    for key, tensor in expected.items():
        got = ckpt.model_state.get(key)
        if got is None:
            problems.append(f"{key} is missing")
        elif tuple(got.shape) != tuple(tensor.shape):
            problems.append(f"{key} has shape {tuple(got.shape)}, config.json implies {tuple(tensor.shape)}")
    extra = sorted(set(ckpt.model_state) - set(expected))
    if extra:
        problems.append(f"unexpected weights {', '.join(extra[:5])}")
    if problems:
        raise MyPTError(f"{ckpt.path}/model.pt does not match {ckpt.path}/config.json: " + "; ".join(problems[:5]))
    model.load_state_dict(ckpt.model_state, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced the tied tensor
