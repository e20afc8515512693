"""Parse Anthropic-style transcripts ("\n\nHuman: ...\n\nAssistant: ...") into messages."""

from __future__ import annotations

import re

from ...errors import InvalidInputError

_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}


def parse_transcript(text: str) -> list[dict]:
    """Split a transcript into OpenAI-style messages (contents stripped).

    Only markers preceded by a blank line start a turn: a "Human:" inside a response (which
    happens in HH-RLHF) stays part of that response. Text before the first marker is an error.
    """
    parts = _TURN.split(text)
    if parts[0].strip():
        raise InvalidInputError(f"transcript does not start with a Human/Assistant turn: {text[:80]!r}")
    return [{"role": _ROLE[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def split_pair_transcripts(chosen: str, rejected: str) -> tuple[list[dict], str, str] | None:
    """(prompt messages, chosen response, rejected response) of two transcripts that share all
    turns but the final assistant one; None when they do not (different turn structure, a
    final turn that is not the assistant's, or a prompt that does not end with the user)."""
    c, r = parse_transcript(chosen), parse_transcript(rejected)
    if len(c) < 2 or len(c) != len(r) or c[:-1] != r[:-1]:
        return None
    if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant" or c[-2]["role"] != "user":
        return None
    return c[:-1], c[-1]["content"], r[-1]["content"]
