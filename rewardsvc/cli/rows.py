"""Input rows of the batch CLI and the eval harness: JSONL in, typed errors naming the field out."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from ..model.conversation import Messages, as_prompt, validate_conversation, with_response


@dataclass(frozen=True)
class RawRow:
    line: int | None  # 1-based line number in the file (None: a Ray Data row whose dataset carries no line column)
    data: dict[str, Any] | None  # None when the line is not a JSON object
    error: str | None = None

    @property
    def id(self) -> Any:
        return self.data.get("id") if self.data else None

    @property
    def where(self) -> str:
        """How an error message names this row: its line, or its id when the line is unknown."""
        return f"line {self.line}" if self.line is not None else f"row id {self.id!r}"


def read_jsonl(path: str | Path) -> Iterator[RawRow]:
    """Every non-blank line as a RawRow; a line that is not a JSON object becomes a row with an error
    (never skipped silently)."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                yield RawRow(number, None, f"line {number} is not valid JSON: {exc}")
                continue
            if not isinstance(data, dict):
                yield RawRow(number, None, f"line {number} must be a JSON object, got {type(data).__name__}")
                continue
            yield RawRow(number, data)


def conversation_of(row: dict[str, Any]) -> Messages:
    """`{"messages": [...]}` or `{"prompt": str | messages, "response": str}` -> validated messages."""
    if "messages" in row:
        if "response" in row or "prompt" in row:
            raise InvalidInputError("a row has either 'messages' or 'prompt' + 'response', not both", field="messages")
        return validate_conversation(row["messages"], "messages")
    if "prompt" in row and "response" in row:
        return with_response(as_prompt(row["prompt"], "prompt"), row["response"], "response")
    raise InvalidInputError("a row needs 'messages', or 'prompt' and 'response'", field="messages")
