"""Validation of OpenAI-style conversations (system / user / assistant message lists)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import InvalidConversationError

ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]


def _message(raw: Any, field: str) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise InvalidConversationError(f"{field} must be an object with 'role' and 'content', got {type(raw).__name__}", field)
    role, content = raw.get("role"), raw.get("content")
    if role not in ROLES:
        raise InvalidConversationError(f"{field}.role must be one of {ROLES}, got {role!r}", f"{field}.role")
    if not isinstance(content, str):
        raise InvalidConversationError(
            f"{field}.content must be a string, got {type(content).__name__}", f"{field}.content"
        )
    return {"role": role, "content": content}


def validate_messages(raw: Any, field: str = "messages") -> Messages:
    """The one message validator (serving's requests, the CLI's rows and training's data rows all go through
    it): a list of {"role": system | user | assistant, "content": str}, a system message only first. Returns
    copies holding just role and content."""
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
        response = message["content"]
    if not isinstance(response, str):
        raise InvalidConversationError(f"{field} must be a string, got {type(response).__name__}", field)
    return [*prompt, {"role": "assistant", "content": response}]
