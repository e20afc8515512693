"""Chat templating and anchor positions.

A conversation is rendered with the tokenizer's own chat template. Two positions matter:
- response anchor: the last token of the conversation (the end-of-turn token closing the response);
- prompt anchor: the last token of the templated prompt part (all messages before the final assistant
  turn), e.g. `<|im_end|>` closing the last user turn in ChatML, `<|eot_id|>` in Llama-3.

Both come from the template itself: the prompt part is rendered separately and its common prefix with
the full rendering (trailing whitespace stripped) marks where the prompt ends; token offsets map that
character position to a token. No token id is hard-coded, and positions are indices into the unpadded
token list, so padding (whatever the pad token is) cannot move them.

Tool use (assistant `tool_calls`, `tool` messages): the backbone's own template renders them when it can.
It is taken as able when it renders the conversation without an error and the tool calls change its text
(many templates silently drop `tool_calls`). Otherwise the documented fallback rendering is used, the
Hermes / Qwen2.5 convention in plain text that any template can carry:
- each tool call is appended to its assistant message's content as
  `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` (one block per call, joined by "\n");
- a tool message becomes a user message `<tool_response>\n{content}\n</tool_response>` (consecutive tool
  messages share one user message, one block each).
The choice is made once per conversation, so the prompt part and the whole conversation render alike.

A model kind may read its score elsewhere (`ResponseAnchor`): a standard Hugging Face sequence-classification
model scores the template's text as rendered (trailing newline included) at its last token that is not the
model's pad token, the token transformers' own forward pools.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..errors import ConversationTooLongError, InvalidConversationError
from .conversation import Messages


@dataclass(frozen=True)
class ResponseAnchor:
    """Where a model kind reads the response: ArmoRM heads read the last token of the text with trailing
    whitespace stripped (the end-of-turn token); a sequence-classification model reads the text exactly as the
    template renders it, at the last token whose id is not `skip_token_id` (its config's pad token)."""

    strip_trailing_whitespace: bool = True
    skip_token_id: int | None = None

    def position(self, ids: list[int]) -> int:
        """Index of the response anchor in `ids` (-1 when every token is skipped)."""
        if self.skip_token_id is None:
            return len(ids) - 1
        for i in range(len(ids) - 1, -1, -1):
            if ids[i] != self.skip_token_id:
                return i
        return -1


@dataclass(frozen=True)
class EncodedConversation:
    """Token ids of one templated conversation (the window that is scored) and its anchors."""

    input_ids: tuple[int, ...]
    prompt_anchor: int  # index into input_ids
    original_tokens: int  # tokens before any truncation
    truncated: bool
    response_position: int = -1  # index into input_ids of the response anchor; -1 = the last token

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def response_anchor(self) -> int:
        return len(self.input_ids) - 1 if self.response_position < 0 else self.response_position


class ChatEncoder:
    """Renders, tokenizes and (optionally) truncates conversations for one tokenizer."""

    def __init__(self, tokenizer, max_tokens: int, truncation: str = "error", anchor: ResponseAnchor = ResponseAnchor()):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.truncation = truncation
        self.anchor = anchor

    def with_tools_rendered(self, messages: Messages, field: str) -> Messages:
        """`messages` unchanged when they hold no tool use or the template renders it; otherwise the
        fallback rendering of the module docstring."""
        calls = any(m.get("tool_calls") for m in messages)
        if not calls and not any(m["role"] == "tool" for m in messages):
            return messages
        try:
            text = self.render(messages, field)
            plain = self.render([_without_tool_calls(m) for m in messages], field) if calls else None
        except InvalidConversationError:
            return fallback_tool_rendering(messages)
        return messages if text != plain else fallback_tool_rendering(messages)

    def render(self, messages: Messages, field: str) -> str:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        except Exception as exc:  # jinja raises TemplateError (and others) for conversations it rejects
            raise InvalidConversationError(f"{field}: the chat template rejected this conversation: {exc}", field) from exc
        if not isinstance(text, str):
            raise InvalidConversationError(f"{field}: the chat template did not render to text", field)
        return text

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # The template already holds BOS and other specials: do not add them twice.
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    @staticmethod
    def _last_token_ending_by(offsets: list[tuple[int, int]], char_end: int) -> int:
        index = -1
        for i, (start, end) in enumerate(offsets):
            if end <= char_end and end > start:
                index = i
            elif start >= char_end:
                break
        return index

    def _head_tokens(self, full: str, messages: Messages, offsets: list[tuple[int, int]]) -> int:
        """Tokens kept at the start when truncating: everything before the content of the first non-system
        message (BOS, the system turn, the first turn's header)."""
        position = 0
        for message in messages:
            found = full.find(message["content"], position) if message["content"] else -1
            if found < 0:
                return 0  # cannot place the message: keep no head rather than guess
            if message["role"] != "system":
                return sum(1 for start, end in offsets if end <= found)
            position = found + len(message["content"])
        return 0

    def _fit(self, ids: list[int], head: int, keep_from: int, field: str) -> tuple[list[int], int]:
        """Drop tokens from `head` on (oldest prompt tokens first) so that the window fits; everything from
        `keep_from` (the prompt anchor) to the end is kept. Returns the window and how many were cut."""
        n, limit = len(ids), self.max_tokens
        if n <= limit:
            return ids, 0
        if self.truncation == "error":
            raise ConversationTooLongError(
                f"{field} has {n} tokens, over the limit max_tokens={limit} (truncation is off)", n, limit, field
            )
        cut_end = n - (limit - head)
        if cut_end > keep_from or head >= limit:
            minimum = head + n - keep_from
            raise ConversationTooLongError(
                f"{field} has {n} tokens; even truncated (keeping the system turn, the prompt anchor and the whole "
                f"response) it needs {minimum}, over the limit max_tokens={limit}",
                n,
                limit,
                field,
            )
        return ids[:head] + ids[cut_end:], cut_end - head

    def encode(self, messages: Messages, field: str = "messages") -> EncodedConversation:
        """Encode a validated conversation whose last message is the assistant response."""
        messages = self.with_tools_rendered(messages, field)
        full = self.render(messages, field)
        prompt_text = self.render(messages[:-1], field)
        prompt_end = len(os.path.commonprefix([full, prompt_text]).rstrip())
        # For ArmoRM heads trailing newlines after the end-of-turn token carry nothing; a sequence-classification
        # model was trained on the text as rendered, so it keeps them.
        text = full.rstrip() if self.anchor.strip_trailing_whitespace else full
        ids, offsets = self._tokenize(text)
        prompt_anchor = self._last_token_ending_by(offsets, prompt_end)
        if prompt_anchor < 0 or prompt_anchor >= len(ids) - 1:
            raise InvalidConversationError(f"{field}: cannot locate the end of the prompt in the templated text", field)
        response_anchor = self.anchor.position(ids)
        if response_anchor <= prompt_anchor:
            raise InvalidConversationError(
                f"{field}: the response renders to no token the model reads (all are its pad token "
                f"{self.anchor.skip_token_id})",
                field,
            )
        head = min(self._head_tokens(full, messages, offsets), prompt_anchor)
        window, cut = self._fit(ids, head, prompt_anchor, field)
        return EncodedConversation(
            input_ids=tuple(window),
            prompt_anchor=prompt_anchor - cut,
            original_tokens=len(ids),
            truncated=cut > 0,
            response_position=-1 if response_anchor == len(ids) - 1 else response_anchor - cut,
        )

    def encode_prompt(self, messages: Messages, field: str = "prompt") -> EncodedConversation:
        """Encode prompt messages alone (for gating inspection); the prompt anchor is the last token, the
        same token the full conversation uses as its prompt anchor."""
        messages = self.with_tools_rendered(messages, field)
        text = self.render(messages, field).rstrip()
        ids, offsets = self._tokenize(text)
        if not ids:
            raise InvalidConversationError(f"{field}: renders to no tokens", field)
        head = min(self._head_tokens(text, messages, offsets), len(ids) - 1)
        window, cut = self._fit(ids, head, len(ids) - 1, field)
        return EncodedConversation(
            input_ids=tuple(window), prompt_anchor=len(window) - 1, original_tokens=len(ids), truncated=cut > 0
        )


def _without_tool_calls(message: dict) -> dict:
    return {k: v for k, v in message.items() if k != "tool_calls"}


def fallback_tool_rendering(messages: Messages) -> Messages:
    """Tool calls and tool results as plain text in assistant and user turns (module docstring)."""
    out: Messages = []
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("_tool_turn"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_turn": True})
            continue
        message = {"role": m["role"], "content": m["content"]}
        calls = [
            "<tool_call>\n" + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                         ensure_ascii=False) + "\n</tool_call>"
            for c in m.get("tool_calls") or ()
        ]
        if calls:
            message["content"] = "\n".join([message["content"], *calls] if message["content"] else calls)
        out.append(message)
    return [{k: v for k, v in m.items() if k != "_tool_turn"} for m in out]
