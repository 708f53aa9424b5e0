"""MyPT's pickle-free weights file: model.safetensors, which a checkpoint folder may hold in place
of model.pt (checkpoint.py loads it; `mypt export --format safetensors` writes it).

safetensors refuses two names sharing one storage (the tied output layer and the token
embedding), so each storage is stored once and the other names are recorded as aliases in the
file's metadata. Nothing here is a pickle, so loading it can never run code.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from mypt.errors import MyPTError

WEIGHTS_FILE = "model.safetensors"
_ALIASES_KEY = "mypt_aliases"


def _dedup_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store (each storage once) and the names that alias one of them."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape, tensor.stride(),
               tensor.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor.detach().to("cpu").contiguous()
    return unique, aliases


def state_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """A state dict as safetensors bytes, shared tensors stored once."""
    unique, aliases = _dedup_shared(state)
    return safetensors_save(unique, metadata={"format": "pt", _ALIASES_KEY: json.dumps(aliases)})


def _metadata(data: bytes) -> dict[str, Any]:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    return header.get("__metadata__") or {}


def state_from_bytes(data: bytes, path: Path, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """The state dict in safetensors bytes read from path, aliased names restored."""
    try:
        state = safetensors_load(data)
        aliases = json.loads(_metadata(data).get(_ALIASES_KEY, "{}"))
    except Exception as exc:  # noqa: BLE001 - safetensors reports damaged files as many types
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise MyPTError(f"{path} is truncated or corrupt and could not be loaded ({first}); restore it from a "
                        "backup or export the model again") from None
    if map_location not in (None, "cpu"):
        state = {k: v.to(map_location) for k, v in state.items()}
    for name, source in aliases.items() if isinstance(aliases, dict) else ():
        if source not in state:
            raise MyPTError(f"{path}: {name} refers to {source}, which is missing; export it again")
        state[name] = state[source]
    return state
