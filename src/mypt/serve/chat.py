"""Chat messages -> one prompt, and what ends the model's turn.

A model fine-tuned for chat (`mypt finetune`; its tokenizer names its chat template) gets the
messages in the template it was trained on, as token ids (mypt.finetune.template), and its
reply stops at its end-of-turn token: `ModelTemplate`.

Any other MyPT model continues text; it was not trained on conversations. `/v1/chat/completions`
renders the messages as a plain transcript that such a model can continue, and stops the
reply where the model starts the next user turn. The default template:

    {system content}            (a system message, then a blank line)
    User: {user content}
    Assistant: {assistant content}
    User: {user content}
    Assistant:                  (the model's reply is generated from here; stop: "\\nUser:")

A model folder may carry its own template as `chat_template.json` beside its config.json
(checkpoints/NAME/chat_template.json, also used with --best). Every field is optional and
replaces the default's: "system", "user", "assistant" (text with `{content}` where the
message goes), "generation_prompt" (what the reply follows) and "stop" (a list of strings).
Training never touches the file: saves carry it over. A fine-tuned model's own template wins
over the file.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from mypt.errors import MyPTError
from mypt.finetune import template as chat_template
from mypt.fsutil import read_json
from mypt.sampling import setting_problems
from mypt.tokenizers import Tokenizer

TEMPLATE_FILE = "chat_template.json"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    system: str = "{content}\n\n"
    user: str = "User: {content}\n"
    assistant: str = "Assistant: {content}\n"
    generation_prompt: str = "Assistant:"
    stop: tuple[str, ...] = ("\nUser:",)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return ()  # a transcript's reply ends at a stop string

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt for messages (each {"role", "content"}, already checked)."""
        parts = [getattr(self, m["role"]).replace("{content}", m["content"]) for m in messages]
        return "".join(parts) + self.generation_prompt


@dataclass(frozen=True)
class ModelTemplate:
    """The template a model was fine-tuned with: the prompt as ids; its end-of-turn ends the reply."""

    tokenizer: Tokenizer
    stop: tuple[str, ...] = ()

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return chat_template.stop_ids(self.tokenizer)

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt's ids; MyPTError naming "messages" if the tokenizer cannot encode them."""
        chat = [chat_template.Message(m["role"], m["content"]) for m in messages]
        return chat_template.prompt_ids(self.tokenizer, chat, "messages")


def load_template(model_dir: Path, tokenizer: Tokenizer | None = None) -> ChatTemplate | ModelTemplate:
    """A fine-tuned model's own template; else model_dir's chat_template.json over the default
    template; the default when there is none."""
    if tokenizer is not None and tokenizer.chat_format is not None:
        chat_template.check_template(tokenizer, f"{model_dir}/tokenizer.json")
        return ModelTemplate(tokenizer)
    path = model_dir / TEMPLATE_FILE
    if not path.exists():
        return ChatTemplate()
    data = read_json(path)
    if not isinstance(data, dict):
        raise MyPTError(f"{path}: must hold a JSON object with some of the fields {_field_list()}")
    return replace(ChatTemplate(), **{key: _field(path, key, value) for key, value in data.items()})


def _field_list() -> str:
    return ", ".join(f.name for f in fields(ChatTemplate))


def _field(path: Path, key: str, value: Any) -> Any:
    if key not in {f.name for f in fields(ChatTemplate)}:
        raise MyPTError(f"{path}: unknown field {key!r}; the fields are {_field_list()}")
    if key == "stop":
        problems = setting_problems({"stop": tuple(value) if isinstance(value, list) else value})
        if problems:  # the stop strings' rule is generate.py's
            raise MyPTError(f'{path}: "stop" {problems[0][1]}, e.g. ["\\nUser:"]')
        return tuple(value)
    if not isinstance(value, str):
        raise MyPTError(f"{path}: {key!r} must be a string")
    if key in ROLES and "{content}" not in value:
        raise MyPTError(f"{path}: {key!r} must contain {{content}} where the message goes, "
                        'e.g. "User: {content}\\n"')
    return value
