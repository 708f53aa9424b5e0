"""Chat data: JSON lines and Parquet files -> conversations, every line checked.

The files come from what --input_file (or a --data mixture) names, found and read by
mypt.data.sources (folders, globs, .gz and .zst, the checks of UTF-8, JSON and NUL bytes).
Each record is a conversation in one of three shapes:

- "messages": {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]};
- "prompt_completion": {"prompt": "...", "completion": "..."} (a user message and the
  assistant's reply; either may also be a list of messages, as TRL writes them);
- "alpaca": {"instruction": "...", "input": "...", "output": "..."} (instruction, and the
  input after a blank line when there is one, as the user message; output as the reply).

The shape is detected per file from its first record (or set with --format). A record of
another shape, an unknown role, an empty conversation or one with no assistant message stops
the run with one message naming the file and the line (Parquet: the row).

Validation conversations are chosen as the data package chooses documents: by a hash of
(file name, line), below --val_split (at least one on each side), the same on every machine.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mypt.data import Source
from mypt.data.builtin import is_builtin
from mypt.data.corpus import corpus_sha256
from mypt.data.prepare import content_sha256, doc_keys
from mypt.data.sources import InputFile, json_records, list_files, parquet_records
from mypt.data.split import validates
from mypt.errors import MyPTError
from mypt.finetune.template import ROLES, Message

FORMATS = ("messages", "prompt_completion", "alpaca")
SHAPE_KEYS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"),
              "alpaca": ("instruction", "output")}
EXAMPLE = ('{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}, '
           '{"prompt": "...", "completion": "..."} or {"instruction": "...", "input": "...", "output": "..."}')


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    file: str  # the InputFile's name (its identity: stable when the data move)
    row: int  # the line (or Parquet row) index in the file
    where: str  # "input file F line N", for messages


@dataclass
class ChatSource:
    """One source's conversations, split, and the content hash of its files."""

    source: Source
    train: list[Conversation]
    val: list[Conversation]
    files: int
    sha256: str


def read_sources(sources: Sequence[Source], form: str | None, val_split: float) -> list[ChatSource]:
    """Every source's conversations, split into training and validation."""
    out = []
    for s in sources:
        builtin = [v for v in s.inputs if is_builtin(v)]
        if builtin:
            raise MyPTError(f"--input_file {builtin[0]}: the built-in corpora are plain text, not conversations; "
                            f"pass JSON lines or Parquet of {EXAMPLE}")
        files = list_files(s.inputs)
        hashes: list[str] = []
        conversations = []
        for f in files:
            hasher = hashlib.sha256()
            conversations += read_file(f, hasher, form)
            hashes.append(hasher.hexdigest())
        train, val = split(conversations, val_split, s)
        out.append(ChatSource(s, train, val, len(files), content_sha256(files, hashes, s.text_field)))
    return out


def content_hash(parts: Sequence[ChatSource]) -> str:
    """The data's content hash as the data package records it (mypt inspect compares it)."""
    return corpus_sha256(parts[0].source, [(p.source, p.sha256) for p in parts])


def read_file(f: InputFile, hasher: Any, form: str | None) -> list[Conversation]:
    """The conversations of one file (its bytes go through hasher)."""
    if f.kind == "text":
        raise MyPTError(f"input file {f.label}: chat data must be JSON lines (.jsonl, .json) or Parquet, one "
                        f"conversation per line or row, such as {EXAMPLE}")
    records = json_records(f, hasher) if f.kind == "jsonl" else parquet_records(f, hasher)
    unit = "line" if f.kind == "jsonl" else "row"
    conversations = []
    shape = form
    for row, record in records:
        where = f"input file {f.label} {unit} {row + 1}"
        if shape is None:
            shape = detect(record, where)
        conversations.append(Conversation(parse(record, shape, where, form is not None), f.name, row, where))
    if not conversations:
        raise MyPTError(f"input file {f.label} holds no conversations; pass a file with one per line")
    return conversations


def detect(record: Any, where: str) -> str:
    """The shape of a file, from its first record."""
    if isinstance(record, dict):
        for shape, keys in SHAPE_KEYS.items():
            if all(k in record for k in keys):
                return shape
    raise MyPTError(f"{where} is not a conversation in a shape MyPT reads: expected {EXAMPLE}")


def parse(record: Any, shape: str, where: str, forced: bool) -> tuple[Message, ...]:
    """The messages of one record of `shape`; one MyPTError naming `where` if it is not one."""
    if not isinstance(record, dict) or not all(k in record for k in SHAPE_KEYS[shape]):
        how = "--format" if forced else "this file's first record"
        keys = ", ".join(repr(k) for k in SHAPE_KEYS[shape])
        got = ", ".join(repr(k) for k in list(record)[:8]) if isinstance(record, dict) else _kind(record)
        raise MyPTError(f"{where} is not a {shape} conversation (as {how} says; it needs {keys}, it has "
                        f"{got or 'none'})")
    if shape == "messages":
        messages = _messages(record["messages"], where, "messages")
    elif shape == "prompt_completion":
        messages = _side(record["prompt"], "user", where, "prompt") + \
            _side(record["completion"], "assistant", where, "completion")
    else:
        messages = _alpaca(record, where)
    if not messages:
        raise MyPTError(f"{where}: the conversation is empty; give it messages, or remove the line")
    if not any(m.role == "assistant" for m in messages):
        raise MyPTError(f"{where}: the conversation has no assistant message, so nothing in it is trained on; "
                        "add the reply, or remove the line")
    return messages


def _kind(value: Any) -> str:
    return f"a JSON {type(value).__name__}" if not isinstance(value, list) else "a JSON list"


def _text(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise MyPTError(f"{where}: {name} must be text, not {json.dumps(value)[:40]}")
    if "\0" in value:
        raise MyPTError(f"{where}: {name} contains NUL characters, so it looks binary; pass text only")
    return value


def _messages(value: Any, where: str, name: str) -> tuple[Message, ...]:
    if not isinstance(value, list):
        raise MyPTError(f"{where}: {name} must be a list of {{\"role\", \"content\"}} objects")
    out = []
    for i, m in enumerate(value):
        at = f"{name}[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise MyPTError(f"{where}: {at} must be an object with \"role\" and \"content\"")
        if m["role"] not in ROLES:
            raise MyPTError(f"{where}: {at} has the role {json.dumps(m['role'])[:40]}; the roles are "
                            f"{', '.join(ROLES)}")
        out.append(Message(m["role"], _text(m["content"], where, f"{at}.content")))
    return tuple(out)


def _side(value: Any, role: str, where: str, name: str) -> tuple[Message, ...]:
    if isinstance(value, list):
        return _messages(value, where, name)
    return (Message(role, _text(value, where, name)),)


def _alpaca(record: dict[str, Any], where: str) -> tuple[Message, ...]:
    instruction = _text(record["instruction"], where, "instruction")
    extra = record.get("input")
    extra = "" if extra is None else _text(extra, where, "input")
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return Message("user", user), Message("assistant", _text(record["output"], where, "output"))


def split(conversations: list[Conversation], val_split: float, source: Source
          ) -> tuple[list[Conversation], list[Conversation]]:
    """(train, validation): a conversation validates as a document does (data.split.validates on
    data.prepare.doc_keys of its file name and row)."""
    if len(conversations) < 2:
        raise MyPTError(f"{label(source)} holds {len(conversations)} conversation: fine-tuning needs at least "
                        "2 (some for training, some held out for validation)")
    keys = np.empty(len(conversations), dtype=np.uint32)
    for name in {c.file for c in conversations}:
        at = np.array([i for i, c in enumerate(conversations) if c.file == name])
        keys[at] = doc_keys(name, np.array([conversations[i].row for i in at]))
    is_val = validates(keys, val_split)
    return ([c for c, v in zip(conversations, is_val, strict=True) if not v],
            [c for c, v in zip(conversations, is_val, strict=True) if v])


def label(source: Source) -> str:
    """A source in messages: its inputs, or its name in a mixture."""
    return f"source '{source.name}'" if source.name != "input" else ", ".join(source.inputs)
