"""Prompt groups: the unit a split never cuts.

Two rows belong to the same group when the normalized text of their FIRST user message is
equal. Keying on the first user turn (not the whole prompt) is deliberately conservative:
a multi-turn conversation that opens like an eval prompt is kept out of training too, and the
same question appearing in two datasets (MT-Bench in Prometheus and LLMBar, red-team prompts in
HH and just-eval, ...) lands in one group whatever the source.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Sequence

_NON_ALNUM = re.compile(r"[\W_]+", re.UNICODE)


def normalize_text(text: str) -> str:
    """NFKC, case-folded, every run of non-alphanumerics collapsed to one space, stripped.

    So that formatting differences between datasets (quotes, punctuation, whitespace, case)
    do not hide the same prompt.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    return _NON_ALNUM.sub(" ", text).strip()


def first_user_text(messages: Sequence[dict]) -> str:
    """Content of the first user message (or of the first message when there is no user turn)."""
    for message in messages:
        if message.get("role") == "user":
            return message.get("content", "")
    return messages[0].get("content", "") if messages else ""


def group_key(messages: Sequence[dict]) -> str:
    """Stable group id of a prompt: `g` + 16 hex of sha1(normalized first user message)."""
    digest = hashlib.sha1(normalize_text(first_user_text(messages)).encode("utf-8")).hexdigest()
    return "g" + digest[:16]
