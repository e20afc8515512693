"""TRL's GRPO with tools, against a real server on loopback (tiny random scorer).

The completions are in the shape TRL 1.16.0 builds them (trl/trainer/grpo_trainer.py, `_tool_call_loop`): the
assistant turn that calls tools carries `tool_calls` = [{"type": "function", "function": {"name", "arguments":
dict}}], each result is appended as {"role": "tool", "name": name, "content": str(result) or a list of blocks},
then the assistant turn after it. Content may be a list of text blocks. A sample the server rejects gets None
(TRL turns it into NaN) with a logged reason, and the rest of the batch is scored.

The last test makes the assistant turns with TRL's own code (trl.chat_template_utils.add_response_schema and
parse_response, which GRPOTrainer applies to generated tokens) over TRL's shipped Qwen3 template, and serves a
reward model whose template is that same one, so the template's own tool rendering is the one scored.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from pathlib import Path

from rewardsvc.integrations import trl as rtrl
from rewardsvc.model.encoding import fallback_tool_rendering
from service_fixtures import start_server
from tiny_models import save_tiny_llama
from tiny_service import load_tiny_scorer, save_tiny_heads

TOL = 1e-5
PROMPT = [{"role": "user", "content": "What is 6 times 7?"}]
CALL = {"type": "function", "function": {"name": "multiply", "arguments": {"a": 6, "b": 7}}}
WITH_TOOL = [  # TRL's completion after one tool round
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "name": "multiply", "content": "42"},
    {"role": "assistant", "content": "It is 42."},
]
BLOCKS = [{"role": "assistant", "content": [{"type": "text", "text": "It is"}, {"type": "text", "text": "42."}]}]
PLAIN = [{"role": "assistant", "content": "It is 42."}]
TOO_LONG = [{"role": "assistant", "content": "forty two " * 200}]  # over the tiny server's max_tokens=256


def test_tool_completions_are_scored_as_the_template_or_the_documented_rendering_gives_them(server, tiny):
    [func] = rtrl.reward_funcs(f"127.0.0.1:{server.port}")
    got = func(prompts=[PROMPT] * 3, completions=[WITH_TOOL, BLOCKS, PLAIN], completion_ids=[[1]] * 3)
    # The tiny ChatML template ignores tool_calls, so the fallback rendering applies (model/encoding.py).
    rendered = fallback_tool_rendering(PROMPT + WITH_TOOL)
    assert rendered[1]["content"] == '<tool_call>\n{"name": "multiply", "arguments": {"a": 6, "b": 7}}\n</tool_call>'
    assert rendered[2] == {"role": "user", "content": "<tool_response>\n42\n</tool_response>"}
    want = tiny.score([PROMPT + WITH_TOOL, PROMPT + [{"role": "assistant", "content": "It is\n42."}], PROMPT + PLAIN])
    assert got == pytest.approx([r.score for r in want], abs=TOL)
    assert tiny.score([rendered])[0].score == pytest.approx(got[0], abs=TOL)
    assert got[0] != pytest.approx(got[2], abs=TOL)  # the tool turn is part of what is scored


def test_a_rejected_sample_gets_none_and_a_logged_reason(server, tiny, caplog):
    funcs = rtrl.reward_funcs(f"127.0.0.1:{server.port}")
    image = [{"role": "assistant", "content": [{"type": "image", "image": "x.png"}]}]  # not even sent
    with caplog.at_level(logging.WARNING, logger="rewardsvc.integrations.trl"):
        got = funcs[0](prompts=[PROMPT] * 4, completions=[PLAIN, TOO_LONG, image, WITH_TOOL])
    assert got[1] is None and got[2] is None
    want = tiny.score([PROMPT + PLAIN, PROMPT + WITH_TOOL])
    assert [got[0], got[3]] == pytest.approx([r.score for r in want], abs=TOL)
    reasons = [r.getMessage() for r in caplog.records]
    assert any("sample 1" in m and "max_tokens=256" in m for m in reasons), reasons
    assert any("sample 2" in m and "'image'" in m for m in reasons), reasons


def test_async_functions_give_none_too(server, tiny):
    [func] = rtrl.async_reward_funcs(f"127.0.0.1:{server.port}")
    got = asyncio.run(func(prompts=[PROMPT] * 3, completions=[TOO_LONG, WITH_TOOL, TOO_LONG]))
    assert got[0] is None and got[2] is None
    assert got[1] == pytest.approx(tiny.score([PROMPT + WITH_TOOL])[0].score, abs=TOL)


def qwen3_template() -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja").read_text()


def test_trls_own_parsed_tool_calls_through_a_template_that_renders_them(tmp_path):
    from transformers import AutoTokenizer
    from trl.chat_template_utils import add_response_schema, parse_response

    backbone = save_tiny_llama(tmp_path / "qwen3-templated", "chatml")
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    tokenizer.chat_template = qwen3_template()
    tokenizer.save_pretrained(backbone)  # the reward model's template is TRL's Qwen3 one too
    policy = add_response_schema(AutoTokenizer.from_pretrained(backbone))
    prefix = policy.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)

    def generated(text: str) -> dict:  # what GRPOTrainer makes of the policy's generated tokens
        return parse_response(policy, policy(text + "<|im_end|>", add_special_tokens=False)["input_ids"], prefix=prefix)

    call = generated('<tool_call>\n{"name": "multiply", "arguments": {"a": 6, "b": 7}}\n</tool_call>')
    assert call["tool_calls"] == [CALL]  # TRL's own parse
    completion = [call, {"role": "tool", "name": "multiply", "content": str(42)}, generated("It is 42.")]

    scorer = load_tiny_scorer(save_tiny_heads(tmp_path / "heads", backbone))
    conversation = PROMPT + completion
    rendered = scorer.encoder.render(scorer.encoder.with_tools_rendered(conversation, "m"), "m")
    assert '<tool_call>\n{"name": "multiply", "arguments": {"a": 6, "b": 7}}\n</tool_call>' in rendered
    assert "<tool_response>\n42\n</tool_response>" in rendered  # the Qwen3 template's own tool turn
    server = start_server(scorer)
    try:
        [func] = rtrl.reward_funcs(f"127.0.0.1:{server.port}")
        got = func(prompts=[PROMPT, PROMPT], completions=[completion, [generated("It is 42.")]])
    finally:
        server.stop(0)
    want = scorer.score([conversation, PROMPT + [generated("It is 42.")]])
    assert got == pytest.approx([r.score for r in want], abs=TOL)
