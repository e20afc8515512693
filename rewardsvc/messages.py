"""The parts of a chat message that both ends read the same way (stdlib only: the client side and the model
share it): content given as text blocks, and tool calls. model.conversation validates whole messages with
these; rewardsvc.wire puts them on the wire.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import InvalidConversationError


def as_list(raw: Any) -> Any:
    """numpy object arrays (how parquet-backed trainers such as verl hand lists back) as lists; anything else
    unchanged."""
    return raw.tolist() if hasattr(raw, "tolist") and not isinstance(raw, (str, bytes)) else raw


def message_content(raw: Any, field: str) -> str:
    """A string; a list of text blocks joined with "\\n" (what vLLM does for string-content templates); None
    (an assistant turn that only calls tools) as "". Any other block type is an error naming it."""
    if isinstance(raw, str):
        return raw
    raw = as_list(raw)
    if raw is None:
        return ""  # OpenAI sends null content for a turn that only calls tools
    if isinstance(raw, Sequence) and not isinstance(raw, (str, bytes)):
        texts = []
        for i, block in enumerate(raw):
            where = f"{field}[{i}]"
            if not isinstance(block, Mapping) or block.get("type") != "text":
                kind = block.get("type") if isinstance(block, Mapping) else type(block).__name__
                raise InvalidConversationError(
                    f"{where}: only text blocks {{'type': 'text', 'text': ...}} can be scored, got {kind!r}", where
                )
            if not isinstance(block.get("text"), str):
                raise InvalidConversationError(f"{where}.text must be a string", f"{where}.text")
            texts.append(block["text"])
        return "\n".join(texts)
    raise InvalidConversationError(
        f"{field} must be a string or a list of text blocks, got {type(raw).__name__}", field
    )


def tool_call(raw: Any, field: str) -> dict[str, Any]:
    """OpenAI's {"type": "function", "function": {"name", "arguments"}, "id"?} with arguments as a dict (the
    shape Hugging Face chat templates read); arguments given as JSON text are parsed."""
    function = raw.get("function") if isinstance(raw, Mapping) else None
    if not isinstance(function, Mapping) or raw.get("type", "function") != "function":
        raise InvalidConversationError(
            f"{field} must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}", field
        )
    name, arguments = function.get("name"), function.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise InvalidConversationError(f"{field}.function.name must be a non-empty string", f"{field}.function.name")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            raise InvalidConversationError(
                f"{field}.function.arguments: not valid JSON ({exc})", f"{field}.function.arguments"
            ) from exc
    if not isinstance(arguments, Mapping):
        raise InvalidConversationError(
            f"{field}.function.arguments must be a JSON object, got {type(arguments).__name__}",
            f"{field}.function.arguments",
        )
    call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": dict(arguments)}}
    if raw.get("id") is not None:
        if not isinstance(raw["id"], str):
            raise InvalidConversationError(f"{field}.id must be a string", f"{field}.id")
        call["id"] = raw["id"]
    return call
