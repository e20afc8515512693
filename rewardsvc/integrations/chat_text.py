"""Chat text rendered in a policy's chat template -> messages again (what OpenRLHF sends: `query` = the
templated prompt + the response, as one string).

The reward model re-templates messages with its own backbone's template, so a templated string must first be
split back into turns. The split is learnt from the policy tokenizer's own template, never hard-coded: a
probe conversation with sentinel contents is rendered, and the text between sentinels gives the separators

    head_user   before the first user turn (BOS, a default system prompt); a text without it may open its
                first user turn as later ones open (a suffix of assistant_user)
    head_system before a system turn, system_user between it and the first user turn
    user_assistant  after a user turn up to the assistant's content (the generation prompt included)
    assistant_user  after an assistant turn up to the next user's content
    tail        after the last assistant turn (end-of-turn, EOS)

A text that does not start like the template (OpenRLHF cuts long prompts' tokens from the left) is read as a
left-cut conversation: the text up to the first turn boundary is what is left of a turn, and it becomes the
first user turn; the turns after it are read as usual (`ParsedQuery.cut` says so).

Limits: a message whose content contains a separator (e.g. a literal "<|im_end|>") is mis-split, and a template
that renders turns differently by position (e.g. strips reasoning of earlier turns) is matched as rendered by
the probe. Only stdlib here: the tokenizer comes from the caller (anything with `apply_chat_template`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import InvalidInputError

_S, _U1, _A1, _U2, _A2 = "\x00SYS\x00", "\x00USER1\x00", "\x00ASSISTANT1\x00", "\x00USER2\x00", "\x00ASSISTANT2\x00"


def _between(text: str, start: str | None, end: str | None) -> str:
    i = 0 if start is None else text.index(start) + len(start)
    j = len(text) if end is None else text.index(end, i)
    return text[i:j]


@dataclass(frozen=True)
class ChatTemplateSplitter:
    """Separators of one chat template (see the module docstring); `from_tokenizer` derives them."""

    head_user: str
    user_assistant: str
    assistant_user: str
    tail: str
    head_system: str | None = None  # None: the template has no system role
    system_user: str | None = None
    name: str = "template"

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, name: str = "policy") -> "ChatTemplateSplitter":
        def render(messages):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

        turns = [
            {"role": "user", "content": _U1},
            {"role": "assistant", "content": _A1},
            {"role": "user", "content": _U2},
            {"role": "assistant", "content": _A2},
        ]
        text = render(turns)
        try:
            with_system = render([{"role": "system", "content": _S}, *turns])
            head_system, system_user = _between(with_system, None, _S), _between(with_system, _S, _U1)
        except Exception:  # a template without a system role raises on one
            head_system = system_user = None
        return cls(
            head_user=_between(text, None, _U1),
            user_assistant=_between(text, _U1, _A1),
            assistant_user=_between(text, _A1, _U2),
            tail=_between(text, _A2, None),
            head_system=head_system,
            system_user=system_user,
            name=name,
        )

    # ---- splitting --------------------------------------------------------------------------------

    def _turns(self, text: str, field: str) -> tuple[list[dict[str, str]], str, str]:
        """(messages up to the last user turn, the rest after its user_assistant separator, how the text
        opened: "head" (as the template starts), "opener" (a user turn opening as later ones do, without what
        the template puts first) or "partial"). A text that does not start like the template (a prompt cut
        from the left) opens with a partial turn, which becomes the first user turn."""
        messages: list[dict[str, str]] = []
        opened = "head"
        if self.head_system and self.system_user and text.startswith(self.head_system) and self.system_user in text[len(self.head_system):]:
            rest = text[len(self.head_system):]
            content, rest = rest.split(self.system_user, 1)
            messages.append({"role": "system", "content": content})
        elif self.head_user and text.startswith(self.head_user):
            rest = text[len(self.head_user):]
        elif not self.head_user:
            rest = text
        elif opener := self._user_opener(text):
            rest, opened = text[len(opener):], "opener"
        else:
            return self._cut_turns(text, field)
        if self.user_assistant not in rest:
            raise InvalidInputError(
                f"{field}: no assistant turn in the {self.name} chat template (expected {self.user_assistant!r})",
                field=field,
            )
        messages, rest = self._alternate(messages, rest)
        return messages, rest, opened

    def _alternate(self, messages: list[dict[str, str]], rest: str) -> tuple[list[dict[str, str]], str]:
        """`rest` opens with a user turn's content: user, assistant, user, ..., last user | response."""
        while True:
            user, rest = rest.split(self.user_assistant, 1)
            messages.append({"role": "user", "content": user})
            if self.assistant_user and self.assistant_user in rest:
                answer, after = rest.split(self.assistant_user, 1)
                if self.user_assistant in after:
                    messages.append({"role": "assistant", "content": answer})
                    rest = after
                    continue
            return messages, rest

    def _cut_turns(self, text: str, field: str) -> tuple[list[dict[str, str]], str, str]:
        """A conversation cut from the left (OpenRLHF keeps the last max_prompt_length prompt tokens): the text
        up to the first turn boundary is what is left of the first turn, and it becomes the first user turn.
        If that boundary opens a user turn (the cut fell in a system or an earlier assistant turn), two user
        turns follow each other; every later turn parses as usual."""
        if self.user_assistant not in text:
            raise InvalidInputError(
                f"{field}: does not start like the {self.name} chat template ({self.head_user[:40]!r}...) and holds "
                f"no assistant turn ({self.user_assistant!r}); serve with --http-policy-template matching the policy",
                field=field,
            )
        boundary = text.index(self.user_assistant)
        openers = [s for s in {self.assistant_user, self.system_user} if s]
        user_starts = [(text.find(s), s) for s in openers if 0 <= text.find(s) < boundary]
        if user_starts:  # the partial turn ends where a user turn opens
            start, opener = min(user_starts)
            partial, rest = text[:start], text[start + len(opener):]
            messages = [{"role": "user", "content": partial}] if partial else []
            messages, rest = self._alternate(messages, rest)
        else:  # the partial turn is the (first) user turn itself
            messages, rest = self._alternate([], text)
        return messages, rest, "partial"

    @staticmethod
    def _kept_prompt_end(query: str, prompt: str) -> int:
        """Length of the longest end of `prompt` that `query` starts with (0: none)."""
        for k in range(min(len(prompt), len(query)), 0, -1):
            if query.startswith(prompt[-k:]):
                return k
        return 0

    def _user_opener(self, text: str) -> str:
        """A conversation rendered without what the template puts first (BOS, a default system prompt) still
        opens its user turn the way a later user turn opens: with a suffix of assistant_user. The longest
        suffix the text starts with (at least 3 characters) is taken as the opener, unless an assistant turn
        opens the same way (then the text may be a cut inside an assistant turn, read as a partial turn)."""
        for i in range(len(self.assistant_user) - 3 + 1):
            opener = self.assistant_user[i:]
            if self.user_assistant.endswith(opener):
                return ""  # shorter suffixes are shared too
            if text.startswith(opener):
                return opener
        return ""

    def _strip_tail(self, response: str, extra_stops: tuple[str, ...]) -> str:
        """Drop the end-of-turn text (and EOS / pad tokens a policy appends) from the end of a response."""
        stops = [s for s in (self.tail, self.tail.strip(), *extra_stops) if s]
        changed = True
        while changed:
            changed = False
            for stop in stops:
                if response.endswith(stop):
                    response, changed = response[: -len(stop)], True
        return response

    def split(self, query: str, prompt: str | None = None, field: str = "query",
              extra_stops: tuple[str, ...] = ()) -> list[dict[str, str]]:  # fmt: skip
        """A templated prompt+response -> messages ending with the assistant response (see `parse`)."""
        return self.parse(query, prompt, field, extra_stops).messages

    def parse(self, query: str, prompt: str | None = None, field: str = "query",
              extra_stops: tuple[str, ...] = ()) -> "ParsedQuery":  # fmt: skip
        """A templated prompt+response -> messages ending with the assistant response.

        With `prompt` (the templated prompt alone) and a query that starts with it, the response is what
        follows it and only the prompt is parsed. A query that does not start with its prompt (OpenRLHF cut the
        prompt's tokens from the left, or its decode differs from the prompt string) is parsed on its own, as is
        a query without a prompt; if it does not start like the template, it is read as a left-cut conversation.
        `cut`: the query has a prompt it does not start with and lacks the template's head, or (with or without
        a prompt) opens with a partial turn."""
        if prompt is not None and query.startswith(prompt):
            response = query[len(prompt):]
            messages, rest, _ = self._turns(prompt, field)
            if rest:  # text after the generation prompt in the prompt itself belongs to the response
                response = rest + response
            cut = False
        elif prompt is not None and self.user_assistant not in query and (kept := self._kept_prompt_end(query, prompt)):
            # The cut fell inside the prompt's last separator: no turn of the prompt is left to read in the
            # query, so the prompt's own turns are scored, with what follows its kept end as the response.
            messages, rest, _ = self._turns(prompt, field)
            response, cut = rest + query[kept:], True
        else:
            messages, response, opened = self._turns(query, field)
            # Without its prompt's head (BOS, a default system prompt), a query that has a prompt was cut too.
            cut = opened == "partial" or (opened == "opener" and prompt is not None)
        return ParsedQuery([*messages, {"role": "assistant", "content": self._strip_tail(response, extra_stops)}], cut)


@dataclass(frozen=True)
class ParsedQuery:
    """Messages read back from a templated query, and whether its prompt had been cut from the left (the first
    user turn is then only the end of what the policy saw first)."""

    messages: list[dict[str, str]]
    cut: bool = False
