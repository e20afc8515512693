"""OpenRLHF 0.11.2 against a real server on loopback, its request reproduced exactly.

OpenRLHF does not install on this CPU (deepspeed, flash-attn, vLLM pins), so `rollout_and_reward` below does
what its source does, step by step, for one sample: openrlhf-0.11.2, `openrlhf/utils/agent.py`,
`SingleTurnAgentExecutor.execute` (prompt ids = tokenizer(prompt, add_special_tokens=False), cut from the left
to max_prompt_length = max_length - max_tokens; query = tokenizer.decode(prompt_ids + action_ids,
skip_special_tokens=False)) and `_fetch_rewards_via_http` (one POST per sample with aiohttp, ClientTimeout(total=
180), `{"query": [q], "prompts": [p], "labels": [l]}`, raise_for_status, reward = reply["rewards"], scores =
reply["scores"] or the rewards, extra_logs = reply["extra_logs"]; any error -> the reward stays None).
`openrlhf/datasets/prompts_dataset.py` renders the prompt: apply_chat_template(chat, tokenize=False,
add_generation_prompt=True).

The policy here is Llama-3-templated, the reward model's backbone ChatML: the server reads the policy's turns
back (--http-policy-template). Expected values: gRPC Score on the original messages."""

from __future__ import annotations

import asyncio
import math

import aiohttp
import pytest

from rewardsvc.client import RewardClient
from rewardsvc.errors import InvalidInputError
from rewardsvc.integrations.chat_text import ChatTemplateSplitter
from rewardsvc.integrations.openrlhf import ScoresMapping, reply
from rewardsvc.types import AttributeWeights
from service_fixtures import start_server
from tiny_models import build_tokenizer
from tiny_service import ATTRS

# Prompts of several lengths and shapes (a system turn, several turns), so that a max_prompt_length cut falls in
# a user turn, a system turn and an earlier assistant turn.
CONVERSATIONS = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}],
    [{"role": "system", "content": "Be brief and kind to the user at all times."},
     {"role": "user", "content": "Name a number between one and ten, and say why you chose it."},
     {"role": "assistant", "content": "Seven, since it is prime."}],
    [{"role": "user", "content": "Hi there, how are you doing today?"}, {"role": "assistant", "content": "Well, thanks!"},
     {"role": "user", "content": "Tell me a long story about a cat who lived by the sea and loved fish."},
     {"role": "assistant", "content": "Once, a cat lived by the sea."}],
    [{"role": "user", "content": "A very long question: " + " ".join(["why is the sky blue and the grass green?"] * 6)},
     {"role": "assistant", "content": "Light scatters."}],
]  # fmt: skip
TOL = 1e-3  # the "Done when" tolerance; the uncut samples agree to ~1e-6
# (Contents carry no edge whitespace: the Llama-3 template trims it, so the policy never saw it either.)


@pytest.fixture(scope="module")
def llama3_policy(tmp_path_factory):
    tokenizer = build_tokenizer("llama3")
    directory = tmp_path_factory.mktemp("policy")
    tokenizer.save_pretrained(directory)
    return tokenizer, directory


@pytest.fixture(scope="module")
def server(tiny, llama3_policy):
    running = start_server(tiny, http_port=0, http_policy_template=str(llama3_policy[1]))
    yield running
    running.stop(0)


async def rollout_and_reward(session_url: str, tokenizer, conversation, max_prompt_length: int) -> dict:
    """One sample through OpenRLHF 0.11.2's SingleTurnAgentExecutor (see the module docstring); the response
    stands in for what vLLM generated (its token ids end with EOS, as a finished generation's do)."""
    prompt = tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
    prompt_token_ids = tokenizer(text=prompt, add_special_tokens=False)["input_ids"]
    if len(prompt_token_ids) > max_prompt_length:
        prompt_token_ids = prompt_token_ids[-max_prompt_length:]
    action_token_ids = tokenizer(text=conversation[-1]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    output = {"prompt": prompt, "reward": None, "scores": None, "extra_logs": {}, "cut": len(prompt_token_ids) < len(tokenizer(text=prompt, add_special_tokens=False)["input_ids"])}
    try:
        query = tokenizer.decode(prompt_token_ids + action_token_ids, skip_special_tokens=False)
        payload = {"query": [query], "prompts": [prompt], "labels": [""]}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
            async with session.post(session_url, json=payload) as response:
                response.raise_for_status()
                rewards_info = await response.json()
        score_value = rewards_info.get("scores")
        if score_value is None:
            score_value = rewards_info.get("rewards")
        output.update(reward=rewards_info.get("rewards"), scores=score_value, extra_logs=rewards_info.get("extra_logs") or {})
    except Exception as exc:  # OpenRLHF logs at INFO and leaves the reward None; the test reports it
        output["error"] = repr(exc)
    return output


def test_every_sample_gets_a_finite_reward_and_uncut_ones_equal_grpc(server, tiny, llama3_policy):
    tokenizer, _ = llama3_policy
    url = f"http://127.0.0.1:{server.http_port}/get_reward"
    samples = [(c, cut) for c in CONVERSATIONS for cut in (10_000, 24, 12, 6)]  # no cut, then shorter and shorter

    async def all_at_once():
        return await asyncio.gather(*(rollout_and_reward(url, tokenizer, c, m) for c, m in samples))

    outputs = asyncio.run(all_at_once())
    with RewardClient(f"127.0.0.1:{server.port}") as client:
        expected = client.score([c for c, _ in samples])
    cut_count = 0
    for (conversation, max_len), out, want in zip(samples, outputs, expected):
        assert "error" not in out, (max_len, out)
        [reward], [score] = out["reward"], out["scores"]
        assert math.isfinite(reward) and 0.0 <= score <= 1.0
        assert out["extra_logs"]["prompt_cut"] == [1.0 if out["cut"] else 0.0], (conversation, max_len)
        assert set(out["extra_logs"]) >= {f"reward/{a}" for a in ATTRS}
        cut_count += out["cut"]
        if not out["cut"]:
            assert reward == pytest.approx(want.score, abs=TOL)
        assert score == pytest.approx(1 / (1 + math.exp(-reward)), abs=1e-12)  # the default mapping: sigmoid
    assert cut_count >= 8  # the cuts did happen, in several places


def test_a_cut_inside_a_system_or_earlier_turn_keeps_every_later_turn():
    llama3 = build_tokenizer("llama3")
    splitter = ChatTemplateSplitter.from_tokenizer(llama3)
    for conversation in CONVERSATIONS[1:3]:
        prompt = llama3.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
        for keep in range(len(prompt) - 1, 20, -7):  # every cut position, in characters
            query = prompt[-keep:] + conversation[-1]["content"] + llama3.eos_token
            parsed = splitter.parse(query, prompt, extra_stops=(llama3.eos_token,))
            assert parsed.messages[-1] == conversation[-1]
            assert parsed.cut  # every one lost the start of its prompt
            later = [m for m in conversation[:-1] if m["content"] in query and m["role"] != "system"]
            for message in later[1:]:  # every turn after the partial one comes back whole
                assert message in parsed.messages


def test_valid_templated_text_never_gets_a_400_and_text_without_a_turn_names_the_field():
    llama3 = build_tokenizer("llama3")
    splitter = ChatTemplateSplitter.from_tokenizer(llama3)
    query = llama3.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    assert splitter.parse(query, "a prompt string the decode does not give back").messages == CONVERSATIONS[0]
    assert not splitter.parse(query, "another prompt").cut
    with pytest.raises(InvalidInputError, match="no assistant turn") as err:
        splitter.parse("no template at all", "x", field="query[0]")
    assert err.value.field == "query[0]"


def test_scores_mapping():
    assert ScoresMapping.parse("sigmoid")(0.0) == 0.5
    assert ScoresMapping.parse("threshold=0.1")(0.1) == 1.0 and ScoresMapping.parse("threshold=0.1")(0.09) == 0.0
    assert ScoresMapping.parse("raw")(-3.5) == -3.5 and str(ScoresMapping.parse("threshold=0.25")) == "threshold=0.25"
    for bad in ("tanh", "threshold=x", "raw=1", "threshold=nan"):
        with pytest.raises(InvalidInputError, match="openrlhf_scores"):
            ScoresMapping.parse(bad)
    assert reply([]) == {"rewards": [], "scores": [], "extra_logs": {}}


def test_deployment_default_weights_and_scores_flag(tiny, llama3_policy):
    tokenizer, directory = llama3_policy
    weights = AttributeWeights("mask", {ATTRS[0]: 0.0})
    running = start_server(tiny, http_port=0, http_policy_template=str(directory), http_default_weights=weights,
                           openrlhf_scores=ScoresMapping.parse("threshold=0"))  # fmt: skip
    try:
        url = f"http://127.0.0.1:{running.http_port}/get_reward"
        out = asyncio.run(rollout_and_reward(url, tokenizer, CONVERSATIONS[0], 10_000))
        [want] = tiny.score(CONVERSATIONS[:1], weights)
        assert out["reward"] == pytest.approx([want.score], abs=1e-5)
        assert out["extra_logs"][f"gating/{ATTRS[0]}"] == [0.0]
        assert out["scores"] == [1.0 if want.score >= 0 else 0.0]
    finally:
        running.stop(0)


def test_default_weights_naming_an_unknown_attribute_fail_the_start(tiny):
    with pytest.raises(InvalidInputError, match="no_such_attribute"):
        start_server(tiny, http_port=0, http_default_weights=AttributeWeights("mask", {"no_such_attribute": 0.0}))


@pytest.mark.slow
def test_on_the_default_model_a_llama3_policy_gets_a_reward_for_every_sample(embedded_scorer, llama3_policy):
    """The same OpenRLHF caller against the packaged default (SmolLM2's ChatML template, with its default system
    prompt): the Llama-3 policy's samples, cut and uncut, all get finite rewards; uncut ones equal gRPC Score."""
    tokenizer, directory = llama3_policy
    running = start_server(embedded_scorer, http_port=0, http_policy_template=str(directory))
    try:
        url = f"http://127.0.0.1:{running.http_port}/get_reward"
        samples = [(c, cut) for c in CONVERSATIONS for cut in (10_000, 12)]

        async def all_at_once():
            return await asyncio.gather(*(rollout_and_reward(url, tokenizer, c, m) for c, m in samples))

        outputs = asyncio.run(all_at_once())
        with RewardClient(f"127.0.0.1:{running.port}") as client:
            expected = client.score([c for c, _ in samples])
        for (conversation, max_len), out, want in zip(samples, outputs, expected):
            assert "error" not in out, (max_len, out)
            assert math.isfinite(out["reward"][0]) and out["extra_logs"]["prompt_cut"] == [float(out["cut"])]
            if not out["cut"]:
                assert out["reward"][0] == pytest.approx(want.score, abs=TOL)
        assert sum(out["cut"] for out in outputs) >= 3
    finally:
        running.stop(0)
