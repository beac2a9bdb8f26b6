"""Dataset row formats (alpaca, chat, text, completion): their schemas and a fast row check.

Rows are JSON objects. Extra keys (ids, sources, ...) are allowed and ignored. A required
string must be present, a string, and not empty or whitespace only. Light on purpose
(pydantic and stdlib only): the worker imports it to render rows.

    alpaca      {"instruction": str, "input"?: str | null, "output": str}
    chat        {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
                at least one assistant message; user and assistant contents not empty,
                a system content may be empty
    text        {"text": str}
    completion  {"prompt": str, "completion": str}

`check_row` is the check the sharder runs on every row (plain type and key tests, several
times faster than model validation); the pydantic models say the same thing for callers that
want typed rows, and a unit test holds the two to the same verdicts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, field_validator

FormatName = Literal["alpaca", "chat", "text", "completion"]
FORMATS: tuple[str, ...] = ("alpaca", "chat", "text", "completion")
ROLES: tuple[str, ...] = ("system", "user", "assistant")

RowCheck = Callable[[Any], "str | None"]


def _not_blank(value: str) -> str:
    if not value or value.isspace():
        raise ValueError("must not be empty")
    return value


NonBlank = Annotated[str, AfterValidator(_not_blank)]

# Extra keys are ignored (datasets carry ids); strict, so 1 or true never pass for a string.
_ROW_CONFIG = ConfigDict(extra="ignore", strict=True, frozen=True)


class AlpacaRow(BaseModel):
    model_config = _ROW_CONFIG

    instruction: NonBlank
    input: str | None = None
    output: NonBlank


class Message(BaseModel):
    model_config = _ROW_CONFIG

    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _content(cls, value: str, info: Any) -> str:
        if info.data.get("role") != "system":
            _not_blank(value)
        return value


class ChatRow(BaseModel):
    model_config = _ROW_CONFIG

    messages: list[Message]

    @field_validator("messages")
    @classmethod
    def _has_assistant(cls, value: list[Message]) -> list[Message]:
        if not any(m.role == "assistant" for m in value):
            raise ValueError("needs at least one assistant message")
        return value


class TextRow(BaseModel):
    model_config = _ROW_CONFIG

    text: NonBlank


class CompletionRow(BaseModel):
    model_config = _ROW_CONFIG

    prompt: NonBlank
    completion: NonBlank


ROW_MODELS: dict[str, type[BaseModel]] = {
    "alpaca": AlpacaRow,
    "chat": ChatRow,
    "text": TextRow,
    "completion": CompletionRow,
}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _string_reason(row: dict[str, Any], key: str) -> str | None:
    """Why row[key] is not a non-blank string, or None when it is."""
    value = row.get(key)
    if type(value) is str:
        if not value or value.isspace():
            return f"'{key}' is empty"
        return None
    if value is None and key not in row:
        return f"missing '{key}'"
    return f"'{key}' must be a string, got {_type_name(value)}"


def _not_object(row: Any) -> str:
    return f"row must be a JSON object, got {_type_name(row)}"


def _check_alpaca(row: Any) -> str | None:
    # Fast path first: the sharder calls this once per row, and almost every row is good.
    if type(row) is dict:
        instruction, output, extra = row.get("instruction"), row.get("output"), row.get("input")
        if (
            type(instruction) is str
            and type(output) is str
            and (extra is None or type(extra) is str)
            and instruction
            and output
            and not instruction.isspace()
            and not output.isspace()
        ):
            return None
    else:
        return _not_object(row)
    reason = _string_reason(row, "instruction") or _string_reason(row, "output")
    if reason:
        return reason
    return f"'input' must be a string, got {_type_name(row.get('input'))}"


def _check_chat(row: Any) -> str | None:
    if type(row) is not dict:
        return _not_object(row)
    messages = row.get("messages")
    if type(messages) is not list:
        if "messages" not in row:
            return "missing 'messages'"
        return f"'messages' must be an array, got {_type_name(messages)}"
    assistant = False
    for i, message in enumerate(messages):
        if type(message) is not dict:
            return f"messages[{i}] must be an object, got {_type_name(message)}"
        role = message.get("role")
        if role not in ROLES or type(role) is not str:
            return f"messages[{i}].role must be one of system, user, assistant, got {role!r}"
        content = message.get("content")
        if type(content) is not str:
            if "content" not in message:
                return f"messages[{i}]: missing 'content'"
            return f"messages[{i}].content must be a string, got {_type_name(content)}"
        if role == "assistant":
            assistant = True
        if role != "system" and (not content or content.isspace()):
            return f"messages[{i}].content is empty"
    if not assistant:
        return "'messages' needs at least one assistant message"
    return None


def _check_text(row: Any) -> str | None:
    if type(row) is dict:
        text = row.get("text")
        if type(text) is str and text and not text.isspace():
            return None
        return _string_reason(row, "text")
    return _not_object(row)


def _check_completion(row: Any) -> str | None:
    if type(row) is dict:
        prompt, completion = row.get("prompt"), row.get("completion")
        if (
            type(prompt) is str
            and type(completion) is str
            and prompt
            and completion
            and not prompt.isspace()
            and not completion.isspace()
        ):
            return None
        return _string_reason(row, "prompt") or _string_reason(row, "completion")
    return _not_object(row)


_CHECKS: dict[str, RowCheck] = {
    "alpaca": _check_alpaca,
    "chat": _check_chat,
    "text": _check_text,
    "completion": _check_completion,
}


def row_checker(fmt: str) -> RowCheck:
    """The check function of a format (hoist it out of a hot loop); ValueError if unknown."""
    try:
        return _CHECKS[fmt]
    except KeyError:
        raise ValueError(
            f"unknown dataset format {fmt!r}: expected one of {', '.join(FORMATS)}"
        ) from None


def check_row(fmt: str, row: Any) -> str | None:
    """Why `row` does not fit format `fmt`, or None when it fits."""
    return row_checker(fmt)(row)


def parse_row(fmt: str, row: Any) -> BaseModel:
    """`row` as the typed model of its format; pydantic.ValidationError if it does not fit."""
    row_checker(fmt)  # the same clear error for an unknown format
    return ROW_MODELS[fmt].model_validate(row)
