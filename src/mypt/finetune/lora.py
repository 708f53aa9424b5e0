"""LoRA: low-rank adapters on the blocks' linear layers, applied to a GPT from outside.

A target layer keeps its weight W (frozen) and gains two trainable matrices A (rank x in) and B
(out x rank): y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T. B starts at zero, so a fresh
adapter leaves the model's function unchanged; A starts as PEFT's does (Kaiming-uniform), so an
adapter trained here and one trained by PEFT start alike. The adapted layer keeps the name and
the `weight`/`bias` parameters of the layer it replaces and adds `lora_A` and `lora_B`, so a
LoRA checkpoint's model.pt is the base's state dict plus the adapters.

LoRAConfig.tokens (a fine-tune's chat tokens) train beside the adapters: the embedding and the
output layer stay frozen, and only those tokens' rows move, as a delta (k, n_embd) added to them
(RowsEmbedding, RowsLinear; one delta for both when they are tied), as PEFT's
`trainable_token_indices` does. A base trained before fine-tuning never saw its chat tokens, so
their rows are what initialisation and pretraining left: the adapters alone would have to reach
`<|end|>` through an output row that never learned to be picked (BENCHMARKS.md, Issue 21).

model.py knows nothing of this: `apply_lora` swaps modules of a built GPT, `merge_lora` folds
the adapters back into plain layers (for export, or for sampling at full speed).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mypt.config import LoRAConfig, ModelConfig
from mypt.model import GPT
from mypt.ops import linear_cross_entropy

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


def _row_ids(ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long, device=device)


class RowsEmbedding(nn.Embedding):
    """A frozen embedding whose rows `ids` train, as rows_delta (k, n_embd) added to them."""

    def __init__(self, base: nn.Embedding, ids: Sequence[int]) -> None:
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.ids = tuple(ids)
        self.rows_delta = nn.Parameter(torch.zeros(len(self.ids), self.embedding_dim, device=self.weight.device,
                                                   dtype=self.weight.dtype))
        self._slots: torch.Tensor | None = None

    def slots(self, device: torch.device) -> torch.Tensor:
        """(vocab,): 1 + a trained row's place in ids, 0 for every other row (a cache)."""
        if self._slots is None or self._slots.device != device:
            slots = torch.zeros(self.num_embeddings, dtype=torch.long)
            slots[list(self.ids)] = torch.arange(1, len(self.ids) + 1)
            self._slots = slots.to(device)
        return self._slots

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # the delta by a second lookup (a zero row for every other token): no (vocab, n_embd) copy
        deltas = F.pad(self.rows_delta, (0, 0, 1, 0))
        return F.embedding(idx, self.weight) + F.embedding(self.slots(idx.device)[idx], deltas)

    def merged(self) -> torch.Tensor:
        """The matrix this layer computes with: weight with the delta added at its rows."""
        return self.weight.index_add(0, _row_ids(self.ids, self.weight.device), self.rows_delta.to(self.weight.dtype))


class RowsLinear(nn.Linear):
    """A frozen output layer whose rows `ids` train, as rows_delta added to them; tied to a
    RowsEmbedding (`shares`), it uses that one's delta and has none of its own."""

    def __init__(self, base: nn.Linear, ids: Sequence[int], shares: RowsEmbedding | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, None
        self.weight.requires_grad_(False)
        self.ids = tuple(ids)
        self._shares = [shares] if shares is not None else []  # in a list: not a submodule (one state entry)
        if shares is None:
            self.rows_delta = nn.Parameter(torch.zeros(len(self.ids), self.in_features, device=self.weight.device,
                                                       dtype=self.weight.dtype))

    @property
    def delta(self) -> torch.Tensor:
        return self._shares[0].rows_delta if self._shares else self.rows_delta

    def merged(self) -> torch.Tensor:
        """The matrix this layer computes with: weight with the delta added at its rows."""
        return self.weight.index_add(0, _row_ids(self.ids, self.weight.device), self.delta.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.merged())

    def cross_entropy(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """GPT.forward's loss through this head: the fused head, given the delta's rows (it makes
        their gradient from those rows' columns alone, not from a merged matrix)."""
        return linear_cross_entropy(x, self.weight, targets, _row_ids(self.ids, x.device), self.delta)


def target_names(model: nn.Module, targets: str) -> list[str]:
    """The module names --lora_targets adapts in this model, in order."""
    wanted = TARGET_LAYERS[targets]
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith("transformer.h.")
            and name.split(".", 3)[3] in wanted]


def apply_lora(model: GPT, lora: LoRAConfig) -> None:
    """Freeze every parameter of model, adapt its target layers and let lora.tokens' embedding
    and output rows train (in place)."""
    for param in model.parameters():
        param.requires_grad_(False)
    for name in target_names(model, lora.targets):
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), lora))
    if lora.tokens:
        embedding = RowsEmbedding(model.transformer.wte, lora.tokens)
        tied = model.lm_head.weight is model.transformer.wte.weight
        model.transformer.wte = embedding
        model.lm_head = RowsLinear(model.lm_head, lora.tokens, shares=embedding if tied else None)


def adapted(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


@torch.no_grad()
def merge_lora(model: GPT) -> None:
    """Fold every adapter and trained row into its layer's weight and put plain layers back (in place)."""
    for name, module in list(adapted(model)):
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        plain.weight = nn.Parameter(module.weight + module.delta().to(module.weight.dtype))
        plain.bias = module.bias
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, plain)
    embedding, head = model.transformer.wte, model.lm_head
    if isinstance(embedding, RowsEmbedding):
        model.transformer.wte = nn.Embedding(embedding.num_embeddings, embedding.embedding_dim, device="meta")
        model.transformer.wte.weight = nn.Parameter(embedding.merged())
    if isinstance(head, RowsLinear):
        model.lm_head = nn.Linear(head.in_features, head.out_features, bias=False, device="meta")
        model.lm_head.weight = nn.Parameter(head.merged()) if not head._shares else model.transformer.wte.weight
    for param in model.parameters():
        param.requires_grad_(True)


def output_matrices(model: GPT) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding and output matrices the model computes with (trained rows added)."""
    embedding, head = model.transformer.wte, model.lm_head
    return (embedding.merged() if isinstance(embedding, RowsEmbedding) else embedding.weight,
            head.merged() if isinstance(head, RowsLinear) else head.weight)


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
    if lora.tokens:
        out["transformer.wte.rows_delta"] = torch.zeros(len(lora.tokens), cfg.n_embd)
        if not cfg.tie_embeddings:
            out["lm_head.rows_delta"] = torch.zeros(len(lora.tokens), cfg.n_embd)
    return out
