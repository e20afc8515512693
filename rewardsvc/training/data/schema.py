"""The two row types every adapter produces, and their JSON-lines forms.

Stage-1 row:  {"id", "source", "split", "messages", <one column per attribute: float or null>}
Pair row:     {"id", "source", "split", "prompt", "chosen", "rejected", "subset", "category"}
The pair row is exactly what `rewardsvc eval` reads (prompt: str or messages; chosen/rejected:
str or messages).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from ...errors import InvalidInputError
from ...model.conversation import validate_messages
from .grouping import group_key

_STAGE1_RESERVED = frozenset({"id", "source", "split", "messages", "group"})


def _check_messages(messages: Any, field: str) -> None:
    """A non-empty list that passes the one message validator (the rows keep their own message dicts)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidInputError(f"{field} must be a non-empty list of messages", field=field)
    validate_messages(messages, field)


@dataclass(frozen=True)
class RatedConversation:
    """A conversation whose final assistant response carries absolute ratings (stage 1)."""

    id: str
    source: str
    messages: list[dict]
    """OpenAI-style messages; the last one is the rated assistant response."""
    labels: dict[str, float | None]
    """Attribute name -> rating, None where the source does not rate that attribute."""
    group: str
    """Prompt group key (see grouping.group_key); splits never cut a group."""

    def __post_init__(self) -> None:
        _check_messages(self.messages, "messages")
        if self.messages[-1]["role"] != "assistant":
            raise InvalidInputError(f"{self.id}: the last message must be the assistant response", field="messages")
        for name, value in self.labels.items():
            if name in _STAGE1_RESERVED:
                raise InvalidInputError(f"{self.id}: attribute name {name!r} is reserved", field=name)
            if value is not None and not math.isfinite(value):
                raise InvalidInputError(f"{self.id}: label {name}={value} is not finite", field=name)

    @property
    def prompt(self) -> list[dict]:
        """The messages before the rated response."""
        return self.messages[:-1]

    @property
    def response(self) -> str:
        """The rated assistant response."""
        return self.messages[-1]["content"]

    def to_json(self, split: str | None = None) -> dict:
        """The stage-1 JSONL row: id, source, split, messages, then one column per attribute."""
        return {"id": self.id, "source": self.source, "split": split, "messages": self.messages, **self.labels}

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> "RatedConversation":
        """Parse a stage-1 row: every key other than id/source/split/messages/group is an attribute."""
        labels = {k: (None if v is None else float(v)) for k, v in row.items() if k not in _STAGE1_RESERVED}
        messages = list(row["messages"])
        return cls(str(row["id"]), str(row.get("source", "")), messages, labels, row.get("group") or group_key(messages))


def _response_text(value: Any, field: str) -> str:
    """A response given as a string or as messages whose last one is the assistant's."""
    if isinstance(value, str):
        return value
    _check_messages(value, field)
    if value[-1]["role"] != "assistant":
        raise InvalidInputError(f"{field}: the last message must be the assistant response", field=field)
    return value[-1]["content"]


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with a preferred (chosen) and a dispreferred (rejected) assistant response."""

    id: str
    source: str
    prompt: list[dict]
    """OpenAI-style messages ending with a user message."""
    chosen: str
    rejected: str
    subset: str
    """Fine-grained set name, e.g. `llmbar-adver-neighbor`, `xstest-should-refuse`, `hh-harmless`."""
    category: str
    """Eval category: chat, chat-hard, safety, honesty or helpfulness."""
    group: str
    """Prompt group key (see grouping.group_key)."""

    def __post_init__(self) -> None:
        _check_messages(self.prompt, "prompt")
        if self.prompt[-1]["role"] != "user":
            raise InvalidInputError(f"{self.id}: the prompt must end with a user message", field="prompt")
        for name in ("chosen", "rejected"):
            if not isinstance(getattr(self, name), str):
                raise InvalidInputError(f"{self.id}: {name} must be a string", field=name)

    def to_json(self, split: str | None = None) -> dict:
        """The pair JSONL row (the format `rewardsvc eval` reads)."""
        return {
            "id": self.id, "source": self.source, "split": split, "prompt": self.prompt,
            "chosen": self.chosen, "rejected": self.rejected, "subset": self.subset, "category": self.category,
        }

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> "PreferencePair":
        """Parse a pair row. `prompt` may be a string (one user turn) or messages; `chosen` and
        `rejected` may be strings or messages ending with the assistant turn. When `prompt` is
        absent, the messages before the final turn of `chosen` are the prompt."""
        prompt = row.get("prompt")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        elif prompt is None and isinstance(row.get("chosen"), list):
            prompt = list(row["chosen"][:-1])
        elif prompt is not None:
            prompt = list(prompt)
        if not prompt:
            raise InvalidInputError(f"row {row.get('id')!r}: missing prompt", field="prompt")
        return cls(
            id=str(row.get("id", "")),
            source=str(row.get("source", "")),
            prompt=prompt,
            chosen=_response_text(row["chosen"], "chosen"),
            rejected=_response_text(row["rejected"], "rejected"),
            subset=str(row.get("subset") or "uncategorized"),
            category=str(row.get("category") or "uncategorized"),
            group=row.get("group") or group_key(prompt),
        )
