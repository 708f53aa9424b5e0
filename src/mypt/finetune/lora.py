"""LoRA: low-rank adapters on the blocks' linear layers, applied to a GPT from outside.

A target layer keeps its weight W (frozen) and gains two trainable matrices A (rank x in) and B
(out x rank): y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T. B starts at zero, so a fresh
adapter leaves the model's function unchanged; A starts as PEFT's does (Kaiming-uniform), so an
adapter trained here and one trained by PEFT start alike. The adapted layer keeps the name and
the `weight`/`bias` parameters of the layer it replaces and adds `lora_A` and `lora_B`, so a
LoRA checkpoint's model.pt is the base's state dict plus the adapters.

model.py knows nothing of this: `apply_lora` swaps modules of a built GPT, `merge_lora` folds
the adapters back into plain layers (for export, or for sampling at full speed).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mypt.config import LoRAConfig, ModelConfig
from mypt.model import GPT

# The blocks' linear layers each --lora_targets value adapts (names below transformer.h.N).
TARGET_LAYERS = {"attn": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")}
TARGET_LAYERS["all"] = TARGET_LAYERS["attn"] + TARGET_LAYERS["mlp"]


class LoRALinear(nn.Linear):
    """A frozen linear layer plus a trainable low-rank update (see the module doc)."""

    def __init__(self, base: nn.Linear, lora: LoRAConfig) -> None:
        nn.Module.__init__(self)  # no weight of its own: it takes the base layer's
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(lora.rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, lora.rank, **like))
        self.scaling = lora.alpha / lora.rank
        self.lora_dropout = nn.Dropout(lora.dropout)
        if base.weight.device.type != "meta":
            self.reset_adapter()

    def reset_adapter(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.scaling

    def delta(self) -> torch.Tensor:
        """The update as a full matrix: scaling * B A, (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.shape[0]}, scaling={self.scaling:g}"


def target_names(model: nn.Module, targets: str) -> list[str]:
    """The module names --lora_targets adapts in this model, in order."""
    wanted = TARGET_LAYERS[targets]
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith("transformer.h.")
            and name.split(".", 3)[3] in wanted]


def apply_lora(model: nn.Module, lora: LoRAConfig, trainable: tuple[str, ...] = ()) -> None:
    """Freeze every parameter of model and adapt its target layers in place. Parameters whose
    names start with one of `trainable` (a grown embedding, say) stay trainable as a whole."""
    for param in model.parameters():
        param.requires_grad_(False)
    for name in target_names(model, lora.targets):
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), lora))
    for name, param in model.named_parameters():
        if name.startswith(trainable) and trainable:
            param.requires_grad_(True)


def adapted(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its layer's weight and put plain linear layers back (in place)."""
    for name, module in list(adapted(model)):
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        plain.weight = nn.Parameter(module.weight + module.delta().to(module.weight.dtype))
        plain.bias = module.bias
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, plain)
    for param in model.parameters():
        param.requires_grad_(True)


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fresh_adapters(cfg: ModelConfig, lora: LoRAConfig, seed: int) -> dict[str, torch.Tensor]:
    """New adapters for a model of cfg (without "lora"), as state-dict entries: A drawn as
    LoRALinear draws it (Kaiming-uniform: bound 1 / sqrt(in)) from `seed`, B zero."""
    with torch.device("meta"):
        shell = GPT(cfg)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in target_names(shell, lora.targets):
        layer = shell.get_submodule(name)
        bound = 1 / math.sqrt(layer.in_features)
        out[f"{name}.lora_A"] = torch.empty(lora.rank, layer.in_features).uniform_(-bound, bound, generator=g)
        out[f"{name}.lora_B"] = torch.zeros(layer.out_features, lora.rank)
    return out
