"""What the transformers families share when reading a config.json: a key's value with a
default, and MyPT's config built from the folder's keys, its errors naming those keys."""

from __future__ import annotations

import re
from typing import Any

from mypt.config import ModelConfig
from mypt.errors import MyPTError


def hf_value(hf: dict[str, Any], key: str, default: Any) -> Any:
    """hf[key], or default where the key is absent or null."""
    return hf[key] if hf.get(key) is not None else default


def model_config(fields: dict[str, Any], keys: dict[str, str], source: str) -> ModelConfig:
    """ModelConfig.from_dict(fields), validated as a preset is; a problem names the folder's key
    (keys: MyPT field -> config.json key) beside MyPT's field."""
    try:
        return ModelConfig.from_dict(fields, source)
    except MyPTError as e:
        message = str(e)
        for mine, theirs in keys.items():
            if mine != theirs:
                message = re.sub(rf"\b{mine}\b", f"{mine} ({theirs} in config.json)", message)
        raise MyPTError(message) from None
