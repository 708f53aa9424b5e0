"""Configuration: the preset files, their validation, and the precedence rules.

Owns `ModelConfig` (what a preset file holds: the architecture plus its batch size) and
`TrainConfig` (the per-run training flags). Every problem in a config is collected and raised
once as a `MyPTError` naming the file and the field. Every number has a range with a finite top
(MAX_SIZES, FLOAT_RANGES, MAX_COUNTS, MAX_SEED), so NaN, infinity and a 400-digit integer are
refused by name instead of overflowing later; `seed_problem` is the one seed check.
Precedence is written here and only here:

* defaults < the preset's "training" block < CLI for training fields (new runs),
* the preset file wins over the CLI's architecture flags (each ignored flag gets a warning),
* on resume, the checkpoint's saved config.json wins over both.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mypt import fsutil
from mypt.errors import MyPTError

REQUIRED_FIELDS: dict[str, type] = {
    "batch_size": int,
    "block_size": int,
    "vocab_size": int,
    "n_embd": int,
    "n_head": int,
    "n_layer": int,
    "dropout": float,
    "bias": bool,
}
OPTIONAL_FIELDS: dict[str, type] = {"name": str, "description": str, "device": str, "training": dict,
                                    "lora": dict}
# Architecture components beyond GPT-2's (model.py's docstring says what each does). An absent
# field takes the default below, which is GPT-2's choice, so older presets and checkpoints load
# unchanged; config.json leaves out the fields at their defaults.
ARCH_FIELDS: dict[str, type] = {
    "position": str, "rope_theta": float, "norm": str, "norm_eps": float, "mlp": str,
    "intermediate_size": int, "qk_norm": bool, "n_kv_head": int, "tie_embeddings": bool, "zero_init": bool,
    "head_size": int, "rope_scaling": dict,
}
ARCH_CHOICES = {"position": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu", "relu2")}
# The CLI flags the spec calls "architecture parameters": taken from the preset when one is given.
ARCH_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "dropout", "bias")
GPT2_VOCAB_SIZE = 50304  # 50257 GPT-2 tokens padded up to a multiple of 64 for fast matmuls
MAX_SEED = 2**32 - 1  # seeds numpy, torch and the batch stream all accept, with room for offsets
# The largest value of each size field: well beyond any model trained today, small enough that
# no count, shape or loop built from a config overflows or runs for ever. Whether a model of
# such sizes fits in memory is checked apart (estimate.py, the memory check before training).
MAX_SIZES: dict[str, int] = {
    "n_layer": 1024, "n_head": 1 << 16, "n_kv_head": 1 << 16, "n_embd": 1 << 16, "head_size": 1 << 16,
    "intermediate_size": 1 << 20,
    "block_size": 1 << 21, "vocab_size": 1 << 24, "batch_size": 1 << 20,
}
# Float fields as [low, high]; outside them a rotary table or a norm would overflow to inf or NaN.
FLOAT_RANGES: dict[str, tuple[float, float]] = {"rope_theta": (1.0, 1e12), "norm_eps": (1e-12, 1.0)}

PACKAGE_PRESETS = Path(__file__).parent / "presets"  # a link to the repository's configs/


def _as_json(value: Any) -> Any:
    """A value as config.json spells it in a message (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else value


@dataclass(frozen=True)
class ModelConfig:
    """A GPT architecture and the batch size it was tested with (one preset file)."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 192
    block_size: int = 128
    vocab_size: int = GPT2_VOCAB_SIZE
    dropout: float = 0.1
    bias: bool = False
    batch_size: int = 12
    name: str = "GPT-Custom"
    description: str = ""
    device: str | None = None
    position: str = "learned"
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"
    intermediate_size: int | None = None  # the MLP's hidden width; default 4 * n_embd
    qk_norm: bool = False
    n_kv_head: int | None = None  # key/value heads; default n_head (no grouping)
    tie_embeddings: bool = True
    zero_init: bool = False
    head_size: int | None = None  # each attention head's width (transformers' head_dim); default n_embd // n_head
    rope_scaling: dict[str, Any] | None = None  # Llama 3's rotary frequency scaling (ROPE_SCALING_KEYS); None: none
    # training flags this preset was tuned with: defaults for a new run, the CLI overrides them
    training: dict[str, Any] = dataclasses.field(default_factory=dict)
    lora: dict[str, Any] | None = None  # a LoRA fine-tune's adapters (LoRAConfig's fields); None: none

    def __post_init__(self) -> None:
        problems = _field_problems(dataclasses.asdict(self))
        if problems:
            raise MyPTError(_format_problems("model config", problems))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> ModelConfig:
        """Validate a parsed preset: every missing, unknown, mistyped or out-of-range field at once."""
        problems = []
        known = {**REQUIRED_FIELDS, **OPTIONAL_FIELDS, **ARCH_FIELDS}
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (known fields: {', '.join(known)})"
                problems.append(f"unknown field '{key}'{hint}")
        for key in REQUIRED_FIELDS:
            if key not in data:
                problems.append(f"missing required field '{key}'")
        problems += _field_problems({k: v for k, v in data.items() if k in known})
        if problems:
            raise MyPTError(_format_problems(source, problems))
        values = {k: (float(v) if known.get(k) is float and v is not None else v) for k, v in data.items()}
        return cls(**values)  # the floats are in range, so float() cannot overflow

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["device"] is None:
            del d["device"]
        if not d["training"]:
            del d["training"]
        if d["lora"] is None:
            del d["lora"]
        for key, default in _ARCH_DEFAULTS.items():
            if d[key] == default:
                del d[key]
        return d

    def arch_dict(self) -> dict[str, Any]:
        """The fields that shape the network (what a checkpoint's weights depend on)."""
        keys = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", *ARCH_FIELDS, "lora")
        return {k: getattr(self, k) for k in keys}

    @property
    def lora_config(self) -> LoRAConfig | None:
        return None if self.lora is None else LoRAConfig(**self.lora)

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_size(self) -> int:
        """The MLP's hidden width (for swiglu: of each of its two input projections)."""
        return self.intermediate_size or 4 * self.n_embd

    def mismatches(self, wanted: dict[str, Any], target: str) -> list[str]:
        """'FIELD is VALUE; TARGET has FIELD WANTED' for each field (or derived property: head_dim,
        kv_heads, hidden_size, named by their fields) whose value differs from wanted: why another
        format's architecture cannot compute this model."""
        fields = {"head_dim": "head_size", "kv_heads": "n_kv_head", "hidden_size": "intermediate_size"}
        return [f"{fields.get(k, k)} is {_as_json(getattr(self, k))}; {target} has {fields.get(k, k)} "
                f"{_as_json(want)}" for k, want in wanted.items() if getattr(self, k) != want]

    def components(self) -> list[tuple[str, str]]:
        """The architecture's components as (label, value) rows, for show_configs and inspect."""
        position = f"rotary (theta {self.rope_theta:g})" if self.position == "rope" else "learned"
        if self.position == "rope" and self.rope_scaling:
            position += f", llama3 scaling x{self.rope_scaling['factor']:g}"
        mlp = {"gelu": "GELU", "swiglu": "SwiGLU (gated)", "relu2": "squared ReLU"}[self.mlp]
        groups = "" if self.kv_heads == self.n_head else f", {self.kv_heads} key/value heads (grouped-query)"
        head = "tied to the token embedding" if self.tie_embeddings else "untied"
        norm = "RMSNorm" if self.norm == "rmsnorm" else "LayerNorm"
        return [
            ("Positions", position),
            ("Norm", f"{norm} (eps {self.norm_eps:g})" + (", QK-norm" if self.qk_norm else "")),
            ("MLP", f"{mlp}, hidden {self.hidden_size}"),
            ("Attention", f"{self.n_head} heads of {self.head_dim}{groups}"),
            ("Output layer", head + (", zero-initialised projections" if self.zero_init else "")),
        ]



def _type_ok(value: Any, want: type) -> bool:
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if want is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, want)


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a JSON object"}


def _field_problems(data: dict[str, Any]) -> list[str]:
    """Type and range problems of the fields present in `data` (missing ones are not checked here)."""
    problems = []
    types = {**REQUIRED_FIELDS, **OPTIONAL_FIELDS, **ARCH_FIELDS}
    valid = {}
    for key, value in data.items():
        want = types.get(key)
        if want is None or (value is None and (key in OPTIONAL_FIELDS or key in _NULLABLE)):
            continue
        if not _type_ok(value, want):
            problems.append(f"{key} ({shown(value)}) must be {_TYPE_NAMES[want]}")
            continue
        problem = _value_problem(key, value, want)
        if problem:
            problems.append(problem)
        else:
            valid[key] = value
    if "training" in valid:
        problems += _training_problems(valid["training"])
    if "lora" in valid:
        problems += [f"lora.{p}" for p in lora_problems(valid["lora"])]
        tokens, vocab = valid["lora"].get("tokens"), valid.get("vocab_size")
        if isinstance(tokens, list) and vocab and any(type(t) is int and t >= vocab for t in tokens):
            problems.append(f"lora.tokens ({shown(tokens)}) must all be below vocab_size ({vocab})")
    return problems + _shape_problems(valid)


def shown(value: Any, as_json: bool = True, limit: int = 60) -> str:
    """A value for a message (as JSON, or as a flag prints it), cut to `limit` characters: it may
    be a user's megabyte, or a number of 400 digits."""
    text = json.dumps(value, default=repr) if as_json else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _value_problem(key: str, value: Any, want: type) -> str | None:
    """The range problem of one well-typed field, if any (NaN, inf and 10**400 fail every range)."""
    if want is int and value <= 0:
        return f"{key} ({shown(value)}) must be a positive integer"
    if key in MAX_SIZES and value > MAX_SIZES[key]:
        return f"{key} ({shown(value)}) must be at most {MAX_SIZES[key]:,}"
    if key == "dropout" and not 0 <= value < 1:
        return f"dropout ({shown(value)}) must be at least 0 and below 1"
    if key in ARCH_CHOICES and value not in ARCH_CHOICES[key]:
        return f"{key} ({shown(value)}) must be one of {', '.join(ARCH_CHOICES[key])}"
    if key in FLOAT_RANGES and not FLOAT_RANGES[key][0] <= value <= FLOAT_RANGES[key][1]:
        low, high = FLOAT_RANGES[key]
        return f"{key} ({shown(value)}) must be a number from {low:g} to {high:g}"
    if key == "rope_scaling":
        return rope_scaling_problem(value)
    return None


# Llama 3's rotary scaling (transformers' rope_type "llama3"), each key with its type
ROPE_SCALING_KEYS = {"rope_type": str, "factor": float, "low_freq_factor": float, "high_freq_factor": float,
                     "original_max_position_embeddings": int}


def rope_scaling_problem(d: dict[str, Any]) -> str | None:
    """What is wrong with a rope_scaling object (None: nothing)."""
    shape = ", ".join(f'"{k}"' for k in ROPE_SCALING_KEYS)
    if set(d) != set(ROPE_SCALING_KEYS) or d.get("rope_type") != "llama3":
        return (f"rope_scaling ({json.dumps(d)[:160]}) must have exactly the keys {shape}, with rope_type "
                '"llama3" (the only scaling MyPT has)')
    for key, want in ROPE_SCALING_KEYS.items():
        if want is not str and not (_type_ok(d[key], want) and 0 < d[key] < float("inf")):
            return f"rope_scaling.{key} ({json.dumps(d[key])}) must be {_TYPE_NAMES[want]} above 0"
    if d["high_freq_factor"] <= d["low_freq_factor"]:
        return (f"rope_scaling.high_freq_factor ({d['high_freq_factor']}) must be above low_freq_factor "
                f"({d['low_freq_factor']})")
    return None


def _shape_problems(valid: dict[str, Any]) -> list[str]:
    """Problems between fields: heads that do not divide the width, key/value heads, rotary halves."""
    n_embd, n_head, n_kv = valid.get("n_embd"), valid.get("n_head"), valid.get("n_kv_head")
    if n_embd is None or n_head is None:
        return []
    head_size = valid.get("head_size")
    if n_embd % n_head and head_size is None:
        return [f"n_embd ({n_embd}) must be divisible by n_head ({n_head}), or head_size set"]
    size = f"head_size is {head_size}" if head_size else f"n_embd / n_head is {n_embd // n_head}"
    head_size = head_size or n_embd // n_head
    problems = []
    if n_kv is not None and n_head % n_kv:
        problems.append(f"n_kv_head ({n_kv}) must divide n_head ({n_head}): each key/value head serves "
                        "the same number of query heads")
    if valid.get("position") == "rope" and head_size % 2:
        problems.append(f"position rope needs an even head size; {size}")
    if valid.get("rope_scaling") and valid.get("position") != "rope":
        problems.append("rope_scaling needs position rope")
    return problems


def _training_problems(block: dict[str, Any]) -> list[str]:
    """Problems of a preset's "training" block: known TrainConfig fields of the right type and range."""
    problems = []
    for key, value in block.items():
        want = TRAIN_FIELD_TYPES.get(key)
        if want is None:
            close = difflib.get_close_matches(key, TRAIN_FIELD_TYPES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(TRAIN_FIELD_TYPES)})"
            problems.append(f"training: unknown field '{key}'{hint}")
        elif not (_type_ok(value, want) or (value is None and key in ("min_lr", "lr_decay_iters"))):
            problems.append(f"training.{key} ({shown(value)}) must be {_TYPE_NAMES[want]}")
    if not problems:
        problems = [p.replace("--", "training.", 1) for p in train_problems(block)]
    return problems


LORA_TARGETS = ("attn", "mlp", "all")
MAX_LORA_RANK = 1 << 16


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters (finetune/lora.py): their rank, alpha (the update is scaled by alpha / rank),
    dropout on their input, and which of the blocks' linear layers get one."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: str = "all"
    tokens: tuple[int, ...] = ()  # token ids whose embedding and output rows train too (the chat tokens)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(self.tokens) if isinstance(self.tokens, list) else self.tokens)
        problems = lora_problems(dataclasses.asdict(self))
        if problems:
            raise MyPTError(_format_problems("lora", problems))


def lora_problems(d: dict[str, Any]) -> list[str]:
    """Problems of a LoRA block (config.json's "lora", or the --lora_* flags), field by field."""
    known = {f.name for f in dataclasses.fields(LoRAConfig)}
    problems = [f"unknown field '{k}' (known: {', '.join(sorted(known))})" for k in d if k not in known]
    rank, alpha = d.get("rank"), d.get("alpha")
    if not (type(rank) is int and 1 <= rank <= MAX_LORA_RANK):
        problems.append(f"rank ({json.dumps(rank)}) must be an integer from 1 to {MAX_LORA_RANK}")
    if not (_type_ok(alpha, float) and 0 < alpha < float("inf")):
        problems.append(f"alpha ({json.dumps(alpha)}) must be a number above 0")
    dropout = d.get("dropout", 0.0)
    if not (_type_ok(dropout, float) and 0 <= dropout < 1):
        problems.append(f"dropout ({json.dumps(dropout)}) must be at least 0 and below 1")
    tokens = d.get("tokens", [])
    if not (isinstance(tokens, (list, tuple)) and all(type(t) is int and t >= 0 for t in tokens)
            and len(set(tokens)) == len(tokens)):
        problems.append(f"tokens ({shown(tokens)}) must be a list of distinct token ids (integers from 0)")
    if d.get("targets", "all") not in LORA_TARGETS:
        problems.append(f"targets ({json.dumps(d.get('targets'))}) must be one of {', '.join(LORA_TARGETS)}")
    return problems


_NULLABLE = ("intermediate_size", "n_kv_head", "head_size", "rope_scaling")
_ARCH_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in ARCH_FIELDS}


def _format_problems(source: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{source}: {problems[0]}"
    return f"{source}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)


def preset_dirs() -> list[Path]:
    """Where presets are looked up by name: ./configs first, then the ones shipped with MyPT."""
    dirs = [Path("configs"), PACKAGE_PRESETS]
    return [d for d in dirs if d.is_dir()]


def list_presets(configs_dir: Path | None = None) -> list[Path]:
    folders = [configs_dir] if configs_dir else preset_dirs()[:1]
    return sorted(p for d in folders for p in d.glob("*.json"))


def resolve_config_path(name: str) -> Path:
    """A path as given, or a preset name such as `tiny` or `tiny.json` from the preset folders."""
    path = Path(name)
    if path.exists():
        return path
    stem = path.name[:-5] if path.name.endswith(".json") else path.name
    if path.parent in (Path("."), Path("configs")):
        for folder in preset_dirs():
            candidate = folder / f"{stem}.json"
            if candidate.is_file():
                return candidate
    known = sorted({p.stem for d in preset_dirs() for p in d.glob("*.json")})
    raise MyPTError(
        f"--config_file {name}: no such file. Presets: {', '.join(known) or 'none found'}"
        " (give a path such as configs/tiny.json, or a preset name such as tiny)"
    )


def load_model_config(name: str | Path) -> ModelConfig:
    """Load and validate a preset file (a path or a preset name)."""
    path = resolve_config_path(str(name))
    data = fsutil.read_json(path, "config")
    if not isinstance(data, dict):
        raise MyPTError(f"{path}: expected a JSON object of config fields, got {type(data).__name__}")
    return ModelConfig.from_dict(data, str(path))


def apply_arch_flags(
    base: ModelConfig | None, flags: dict[str, Any], source: str | None
) -> tuple[ModelConfig, list[str]]:
    """Combine a preset (or None) with the CLI's architecture flags (None = not given).

    With a preset (or a saved checkpoint config) the preset wins and each differing flag is
    reported in a warning naming the value used instead. Without one, the flags override the
    defaults (the tiny preset's architecture).
    """
    given = {k: v for k, v in flags.items() if v is not None}
    if base is None:
        values = {**ModelConfig().to_dict(), **given}
        return ModelConfig.from_dict(values, "command line"), []
    warnings = [
        f"--{k} {_flag_str(v)} ignored: {source} sets {k} = {_flag_str(getattr(base, k))}"
        for k, v in given.items()
        if getattr(base, k) != v
    ]
    return base, warnings


def new_run_train_config(preset: ModelConfig, flags: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """A new run's training settings: defaults < the preset's "training" block < CLI flags.

    Also returns the preset's settings that were used (not overridden by a flag)."""
    used = {k: v for k, v in preset.training.items() if k not in flags}
    values = {**preset.training, **flags}
    tc = TrainConfig(**values)
    if tc.lr_decay_iters is None:  # the schedule's end is fixed now, so a resume cannot stretch it
        tc = TrainConfig(**{**values, "lr_decay_iters": max(tc.max_iters, tc.warmup_iters)})
    return tc, used


def saved_train_config(training_state: dict[str, Any], source: str) -> dict[str, Any]:
    """The training flags a checkpoint saved, validated like a preset's "training" block."""
    saved = training_state.get("train_config", {})
    if not isinstance(saved, dict):
        raise MyPTError(f"{source}: train_config must be a JSON object of training flags; restore the file")
    problems = [p.replace("training.", "train_config.", 1).replace("training:", "train_config:", 1)
                for p in _training_problems(saved)]
    if problems:
        raise MyPTError(_format_problems(source, problems) + "\n(fix or restore the file)")
    return saved


def resume_train_config(saved: dict[str, Any], flags: dict[str, Any]) -> TrainConfig:
    """A resumed run's training settings: the saved ones < CLI flags.

    The learning-rate schedule keeps its saved end unless --lr_decay_iters is given: a larger
    --max_iters then trains on at the final learning rate instead of re-stretching the cosine.
    """
    values = {**saved, **flags}
    if values.get("lr_decay_iters") is None:  # saved by a MyPT that left it open: the end it planned
        planned = saved.get("max_iters", values.get("max_iters", TrainConfig.max_iters))
        values["lr_decay_iters"] = max(planned, values.get("warmup_iters", TrainConfig.warmup_iters))
    return TrainConfig(**values)


def _flag_str(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass
class TrainConfig:
    """Per-run training settings: defaults < the preset's "training" block < CLI flags."""

    max_iters: int = 2000
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    learning_rate: float = 1e-3
    min_lr: float | None = None  # default: learning_rate / 10
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # default: max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    optimizer: str = "adamw"  # muon: Muon on the hidden matrices, AdamW (learning_rate) on the rest
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    grad_accum_steps: int = 1
    seed: int = 1337
    val_split: float = 0.1
    dtype: str = "auto"
    compile: bool = False
    gradient_checkpointing: bool = False
    tensorboard: bool = False
    keep_best: bool = True  # keep the best-validation weights in best/
    keep_every: int = 0  # also keep the checkpoint every N iterations in iter_N/ (0: off)

    def __post_init__(self) -> None:
        problems = train_problems(dataclasses.asdict(self))
        if problems:
            raise MyPTError(_format_problems("training flags", problems))

    @property
    def final_lr(self) -> float:
        return self.learning_rate / 10 if self.min_lr is None else self.min_lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_train_flags(flags: dict[str, Any]) -> None:
    """The training flags given on a command line, checked on their own (before any file is read)."""
    problems = train_problems(flags)
    if problems:
        raise MyPTError(_format_problems("training flags", problems))


# Upper bounds of the counting flags: far beyond any run, small enough that no loop or buffer
# sized by them (eval_iters losses, accumulation steps) is impossible.
MAX_ITERS = 10**12
MAX_COUNTS = {"max_iters": MAX_ITERS, "eval_interval": MAX_ITERS, "log_interval": MAX_ITERS,
              "eval_iters": 10**6, "grad_accum_steps": 10**6}
MAX_RATE = 1e3  # learning rates and decay: far above any that trains


def seed_problem(seed: Any, name: str = "--seed") -> str | None:
    """Why seed is not a seed MyPT takes (None: it is): the one seed check of every command."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        return f"{name} ({shown(seed, False)}) must be an integer from 0 to {MAX_SEED}"
    return None


def _in(values: dict[str, Any], key: str, low: float, high: float, default: Any = None) -> bool:
    """True if values[key] (or default; None passes) is within [low, high]: NaN, inf and 10**400 are not."""
    value = values.get(key, default)
    return value is None or low <= value <= high


def train_problems(values: dict[str, Any]) -> list[str]:
    """Range problems of training settings (those present in `values`), named as their CLI flags."""
    v = lambda key: shown(values[key], as_json=False)  # noqa: E731
    problems = _count_problems(values, v)
    seed = seed_problem(values.get("seed", 0))
    problems += [seed] if seed else []
    lr, min_lr = values.get("learning_rate"), values.get("min_lr")
    if None not in (lr, min_lr) and min_lr > lr:
        problems.append(f"--min_lr ({v('min_lr')}) must not exceed --learning_rate ({v('learning_rate')}): the "
                        "rate would climb during the decay")
    for key in ("min_lr", "weight_decay", "grad_clip"):
        if not _in(values, key, 0, MAX_RATE):
            problems.append(f"--{key} ({v(key)}) must be a non-negative number (at most {MAX_RATE:g})")
    for key in ("learning_rate", "muon_lr"):
        if not _in(values, key, 0, MAX_RATE) or values.get(key) == 0:
            problems.append(f"--{key} ({v(key)}) must be a number above 0 (at most {MAX_RATE:g})")
    for key in ("beta1", "beta2", "muon_momentum"):
        if not _in(values, key, 0, 1) or values.get(key) == 1:
            problems.append(f"--{key} ({v(key)}) must be at least 0 and below 1")
    if not 0 < values.get("val_split", 0.1) <= 0.5:
        problems.append(f"--val_split ({v('val_split')}) must be above 0 and at most 0.5")
    if values.get("dtype", "auto") not in ("auto", "fp32", "bf16", "fp16"):
        problems.append(f"--dtype ({v('dtype')}) must be one of auto, fp32, bf16, fp16")
    if values.get("optimizer", "adamw") not in OPTIMIZERS:
        problems.append(f"--optimizer ({v('optimizer')}) must be one of {', '.join(OPTIMIZERS)}")
    return problems


def _count_problems(values: dict[str, Any], v: Callable[[str], str]) -> list[str]:
    """Range problems of the iteration counts."""
    problems = []
    for key, most in MAX_COUNTS.items():
        value = values.get(key, 1)
        if not isinstance(value, int) or not 0 < value <= most:
            too_big = f" of at most {most:,}" if isinstance(value, int) and value > most else ""
            problems.append(f"--{key} ({shown(value, as_json=False)}) must be a positive integer{too_big}")
    if not _in(values, "keep_every", 0, MAX_ITERS):
        problems.append(f"--keep_every ({v('keep_every')}) must be 0 (off) or a positive number of iterations "
                        f"(at most {MAX_ITERS:,})")
    if not _in(values, "warmup_iters", 0, MAX_ITERS):
        problems.append(f"--warmup_iters ({v('warmup_iters')}) must be 0 or more (at most {MAX_ITERS:,})")
    # checks across two fields apply once both are known (a resume's flags alone leave some out)
    decay, warmup = values.get("lr_decay_iters"), values.get("warmup_iters")
    if decay is not None and (not 0 < decay <= MAX_ITERS or (warmup is not None and decay < warmup)):
        problems.append(f"--lr_decay_iters ({v('lr_decay_iters')}) must be a positive number of iterations, at "
                        f"least --warmup_iters ({warmup or 0})")
    return problems


OPTIMIZERS = ("adamw", "muon")


# The type of each TrainConfig field (None is also allowed for min_lr and lr_decay_iters).
TRAIN_FIELD_TYPES: dict[str, type] = {
    f.name: {"int": int, "float": float, "str": str, "bool": bool}[str(f.type).split(" |")[0]]
    for f in dataclasses.fields(TrainConfig)
}
