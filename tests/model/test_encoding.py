"""Anchors from the chat template: ChatML (tiny + the real SmolLM2 tokenizer) and Llama-3."""

from __future__ import annotations

import pytest

from rewardsvc.model.encoding import ChatEncoder
from rewardsvc.errors import ConversationTooLongError

USER = {"role": "user", "content": "What is the capital of France?"}
ANSWER = {"role": "assistant", "content": "The capital of France is Paris."}
SYSTEM = {"role": "system", "content": "Be brief."}
MULTI = [SYSTEM, USER, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Spain?"},
         {"role": "assistant", "content": "Madrid."}]  # fmt: skip

CASES = {
    "single": [USER, ANSWER],
    "single+system": [SYSTEM, USER, ANSWER],
    "multi": MULTI[1:],
    "multi+system": MULTI,
}


def end_of_turn_positions(tokens: list[str], end_token: str) -> list[int]:
    return [i for i, t in enumerate(tokens) if t == end_token]


def check_anchors(tokenizer, messages, end_token: str, default_system_turns: int = 0):
    """Independent check: with n prompt messages, the prompt anchor is the n-th end-of-turn token (counting
    a system turn the template adds by itself) and the response anchor is the last one, which ends the text."""
    enc = ChatEncoder(tokenizer, max_tokens=4096).encode(messages)
    tokens = tokenizer.convert_ids_to_tokens(list(enc.input_ids))
    ends = end_of_turn_positions(tokens, end_token)
    prompt_turns = len(messages) - 1 + default_system_turns
    assert len(ends) == prompt_turns + 1
    assert enc.prompt_anchor == ends[prompt_turns - 1]
    assert enc.response_anchor == ends[-1] == len(tokens) - 1
    assert not enc.truncated and enc.original_tokens == enc.num_tokens
    return enc, tokens


@pytest.mark.parametrize("case", sorted(CASES))
def test_chatml_anchors(chatml_tokenizer, case):
    check_anchors(chatml_tokenizer, CASES[case], "<|im_end|>")


@pytest.mark.parametrize("case", sorted(CASES))
def test_llama3_anchor_is_the_eot_closing_the_last_user_turn(llama3_tokenizer, case):
    enc, tokens = check_anchors(llama3_tokenizer, CASES[case], "<|eot_id|>")
    # As in the reference: the <|eot_id|> right before <|start_header_id|>assistant<|end_header_id|>.
    assert tokens[enc.prompt_anchor + 1] == "<|start_header_id|>"
    header_end = tokens.index("<|end_header_id|>", enc.prompt_anchor)
    assert tokenizer_text(llama3_tokenizer, tokens[enc.prompt_anchor + 2 : header_end]) == "assistant"
    assert tokens[0] == "<|begin_of_text|>"


def tokenizer_text(tokenizer, tokens):
    return tokenizer.convert_tokens_to_string(tokens)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_smollm2_anchors(embedded_scorer, case):
    # SmolLM2's template adds a default system turn when the conversation has none.
    has_system = CASES[case][0]["role"] == "system"
    check_anchors(embedded_scorer.backbone.tokenizer, CASES[case], "<|im_end|>", 0 if has_system else 1)


def test_prompt_encoding_matches_the_conversation_prefix(chatml_tokenizer, llama3_tokenizer):
    for tokenizer in (chatml_tokenizer, llama3_tokenizer):
        encoder = ChatEncoder(tokenizer, max_tokens=4096)
        full = encoder.encode(MULTI)
        prompt = encoder.encode_prompt(MULTI[:-1])
        assert prompt.input_ids == full.input_ids[: full.prompt_anchor + 1]
        assert prompt.prompt_anchor == full.prompt_anchor


def test_pad_equal_to_eos_inside_the_text_does_not_move_anchors(chatml_tokenizer):
    # pad == eos == <|im_end|>: the reference's "first pad token - 1" would point at the first turn.
    assert chatml_tokenizer.pad_token == chatml_tokenizer.eos_token
    enc = ChatEncoder(chatml_tokenizer, 4096).encode(MULTI)
    first_pad = list(enc.input_ids).index(chatml_tokenizer.pad_token_id)
    assert enc.response_anchor != first_pad - 1
    assert enc.response_anchor == enc.num_tokens - 1


def test_too_long_raises_with_length_and_limit(chatml_tokenizer):
    full = ChatEncoder(chatml_tokenizer, 4096).encode(MULTI)
    with pytest.raises(ConversationTooLongError) as info:
        ChatEncoder(chatml_tokenizer, full.num_tokens - 1).encode(MULTI, field="conversations[3]")
    err = info.value
    assert (err.num_tokens, err.limit) == (full.num_tokens, full.num_tokens - 1)
    assert "conversations[3]" in str(err) and str(full.num_tokens) in str(err) and f"max_tokens={full.num_tokens - 1}" in str(err)


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_left_truncation_keeps_system_anchor_and_response(template, chatml_tokenizer, llama3_tokenizer):
    tokenizer = chatml_tokenizer if template == "chatml" else llama3_tokenizer
    full = ChatEncoder(tokenizer, 4096).encode(MULTI)
    limit = full.num_tokens - 5
    cut = ChatEncoder(tokenizer, limit, truncation="left").encode(MULTI)
    assert cut.truncated and cut.num_tokens == limit and cut.original_tokens == full.num_tokens
    tail = full.num_tokens - full.prompt_anchor  # prompt anchor .. end
    assert cut.input_ids[-tail:] == full.input_ids[-tail:]
    assert cut.input_ids[cut.prompt_anchor] == full.input_ids[full.prompt_anchor]
    assert cut.num_tokens - cut.prompt_anchor == tail
    # The head (BOS + system turn + first header) survives: the system text is still decodable.
    assert "Be brief." in tokenizer.decode(list(cut.input_ids))


def test_left_truncation_cannot_cut_the_response(chatml_tokenizer):
    long_answer = [USER, {"role": "assistant", "content": "Paris is the capital. " * 20}]
    with pytest.raises(ConversationTooLongError, match="even truncated"):
        ChatEncoder(chatml_tokenizer, 20, truncation="left").encode(long_answer)


TOOL_CONVERSATION = [
    {"role": "user", "content": "What is 6 times 7?"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "multiply", "arguments": {"a": 6, "b": 7}}}]},
    {"role": "tool", "name": "multiply", "content": "42"},
    {"role": "assistant", "content": "It is 42."},
]
# ChatML plus the tool-call block of Qwen2.5's template: a template that renders tool calls itself.
TOOL_AWARE_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% for call in message.tool_calls or [] %}{{ '<tool_call>\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' }}"
    "{{ call.function.arguments | tojson }}{{ '}\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
)


def test_tool_calls_use_the_template_when_it_renders_them(chatml_tokenizer):
    from rewardsvc.model.conversation import validate_conversation

    messages = validate_conversation(TOOL_CONVERSATION)
    ignoring = ChatEncoder(chatml_tokenizer, max_tokens=512)
    # The plain ChatML template drops tool_calls: the documented fallback rendering is used instead.
    assert ignoring.with_tools_rendered(messages, "m")[1]["content"].startswith("<tool_call>\n")
    aware = ChatEncoder(chatml_tokenizer, max_tokens=512)
    original = chatml_tokenizer.chat_template
    chatml_tokenizer.chat_template = TOOL_AWARE_CHATML
    try:
        assert aware.with_tools_rendered(messages, "m") is messages  # the template's own rendering
        text = aware.render(messages, "m")
        assert '<tool_call>\n{"name": "multiply", "arguments": {"a": 6, "b": 7}}\n</tool_call>' in text
        assert "<|im_start|>tool\n42<|im_end|>" in text
        encoded = aware.encode(messages)
        assert encoded.prompt_anchor < encoded.response_anchor
    finally:
        chatml_tokenizer.chat_template = original
