"""Validation of OpenAI-style conversations: system / user / assistant / tool messages.

Besides plain `{"role", "content": str}` messages it takes what trainers with tools produce (TRL's GRPO with
`tools=`, OpenAI's chat format):
- content given as a list of text blocks `[{"type": "text", "text": ...}, ...]`: the texts are joined with "\n"
  (what vLLM does for templates that take string content); any other block type (an image, ...) is an error,
  since the reward model reads text only;
- `tool_calls` on an assistant message: `[{"type": "function", "function": {"name", "arguments"}, "id"?}]`,
  arguments a JSON object or its JSON text; kept in that shape (arguments as a dict), the shape Hugging Face
  chat templates read;
- `tool` messages (the result of a call), with optional `name` and `tool_call_id`.
How they become text is model.encoding's business (the backbone's template where it renders them, otherwise
the rendering documented there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InvalidConversationError
from ..messages import as_list, message_content, tool_call

ROLES = ("system", "user", "assistant", "tool")
# role and content always; tool_calls (assistant), name and tool_call_id (tool) only when given.
Messages = list[dict[str, Any]]


def _optional_str(raw: Mapping, key: str, field: str) -> str | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidConversationError(f"{field}.{key} must be a string, got {type(value).__name__}", f"{field}.{key}")
    return value or None


def _message(raw: Any, field: str) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise InvalidConversationError(f"{field} must be an object with 'role' and 'content', got {type(raw).__name__}", field)
    role = raw.get("role")
    if role not in ROLES:
        raise InvalidConversationError(f"{field}.role must be one of {ROLES}, got {role!r}", f"{field}.role")
    if "content" not in raw and not raw.get("tool_calls"):
        raise InvalidConversationError(f"{field}.content is missing", f"{field}.content")
    message: dict[str, Any] = {"role": role, "content": message_content(raw.get("content"), f"{field}.content")}
    calls = as_list(raw.get("tool_calls"))
    if calls:
        if role != "assistant":
            raise InvalidConversationError(f"{field}.tool_calls: only an assistant message calls tools", f"{field}.tool_calls")
        if isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, Sequence):
            raise InvalidConversationError(f"{field}.tool_calls must be a list", f"{field}.tool_calls")
        message["tool_calls"] = [tool_call(c, f"{field}.tool_calls[{i}]") for i, c in enumerate(calls)]
    if role == "tool":
        for key in ("name", "tool_call_id"):
            value = _optional_str(raw, key, field)
            if value is not None:
                message[key] = value
    return message


def validate_messages(raw: Any, field: str = "messages") -> Messages:
    """The one message validator (serving's requests, the CLI's rows and training's data rows all go through
    it): a list of {"role": system | user | assistant | tool, "content": str or text blocks} (module docstring),
    a system message only first. Returns normalised copies: content as one string, tool fields only when given."""
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise InvalidConversationError(f"{field} must be a list of messages, got {type(raw).__name__}", field)
    messages = [_message(m, f"{field}[{i}]") for i, m in enumerate(raw)]
    for i, m in enumerate(messages):
        if m["role"] == "system" and i != 0:
            raise InvalidConversationError(f"{field}[{i}]: a system message may only come first", f"{field}[{i}].role")
    return messages


def validate_conversation(raw: Any, field: str = "messages") -> Messages:
    """A prompt (at least one user message) followed by the final assistant response to be scored."""
    messages = validate_messages(raw, field)
    if not messages or messages[-1]["role"] != "assistant":
        raise InvalidConversationError(f"{field}: the last message must be the assistant response to score", field)
    if not any(m["role"] == "user" for m in messages[:-1]):
        raise InvalidConversationError(f"{field}: needs at least one user message before the response", field)
    return messages


def validate_prompt(raw: Any, field: str = "prompt") -> Messages:
    """Prompt messages only: they must end with a user message."""
    messages = validate_messages(raw, field)
    if not messages or messages[-1]["role"] != "user":
        raise InvalidConversationError(f"{field}: the last prompt message must be a user message", field)
    return messages


def as_prompt(raw: Any, field: str = "prompt") -> Messages:
    """A prompt given as a plain string (one user message) or as messages."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    return validate_prompt(raw, field)


def with_response(prompt: Messages, response: Any, field: str = "response") -> Messages:
    """prompt + one assistant message; the response may be a string or a one-message list/dict."""
    if isinstance(response, dict):
        response = [response]
    if isinstance(response, list):
        if len(response) != 1:
            raise InvalidConversationError(f"{field} must be a string or exactly one assistant message", field)
        message = _message(response[0], f"{field}[0]")
        if message["role"] != "assistant":
            raise InvalidConversationError(f"{field}[0].role must be 'assistant'", f"{field}[0].role")
        return [*prompt, message]  # as given, tool calls included
    if not isinstance(response, str):
        raise InvalidConversationError(f"{field} must be a string, got {type(response).__name__}", field)
    return [*prompt, {"role": "assistant", "content": response}]
