from __future__ import annotations

import pytest

from rewardsvc.model.conversation import as_prompt, validate_conversation, validate_prompt, with_response
from rewardsvc.errors import InvalidConversationError

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}
S = {"role": "system", "content": "sys"}


@pytest.mark.parametrize(
    "raw, field",
    [
        ("hi", "messages"),
        ([], "messages"),
        ([U], "messages"),  # no response
        ([A], "messages"),  # no user turn before the response
        ([U, {"role": "function", "content": "x"}], "messages[1].role"),
        ([U, {"role": "assistant", "content": [{"type": "image_url", "image_url": "x"}]}], "messages[1].content[0]"),
        ([U, {"role": "user", "content": "x", "tool_calls": [{"type": "function", "function": {"name": "f"}}]}, A],
         "messages[1].tool_calls"),
        ([U, {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{"}}]}, A],
         "messages[1].tool_calls[0].function.arguments"),
        ([U, {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": ""}}]}, A],
         "messages[1].tool_calls[0].function.name"),
        ([U, {"role": "assistant", "content": 3}], "messages[1].content"),
        ([U, "hello"], "messages[1]"),
        ([U, S, A], "messages[1].role"),  # system not first
    ],
)
def test_invalid_conversations_name_the_field(raw, field):
    with pytest.raises(InvalidConversationError) as info:
        validate_conversation(raw)
    assert info.value.field == field
    assert field.split(".")[0].split("[")[0] in str(info.value)


def test_valid_conversation_is_copied_to_plain_dicts():
    raw = [S, U, {**A, "name": "ignored"}]
    assert validate_conversation(raw) == [S, U, A]


def test_prompt_helpers():
    assert as_prompt("hi") == [U]
    assert validate_prompt([S, U]) == [S, U]
    with pytest.raises(InvalidConversationError, match="last prompt message must be a user"):
        validate_prompt([U, A])
    assert with_response([U], "hello") == [U, A]
    assert with_response([U], [A]) == [U, A]
    with pytest.raises(InvalidConversationError, match="response"):
        with_response([U], [U])
    with pytest.raises(InvalidConversationError, match="response"):
        with_response([U], None)
