"""Scorer behaviour: batch-neighbour invariance, input order, steering, inspection, groups, errors."""

from __future__ import annotations

import math

import pytest

from rewardsvc.config import ScorerConfig
from rewardsvc.errors import ConversationTooLongError, InvalidConversationError, InvalidInputError
from rewardsvc.types import AttributeWeights
from tiny_models import TINY_ATTRIBUTES

ATTRS = TINY_ATTRIBUTES


def conversation(i: int) -> list[dict]:
    words = " ".join(["word"] * (1 + 7 * (i % 9)))
    messages = [{"role": "user", "content": f"Question {i}: say something {'long' if i % 3 else 'short'}."},
                {"role": "assistant", "content": f"Answer {i}: {words}."}]  # fmt: skip
    if i % 4 == 0:
        messages = [{"role": "system", "content": "Be brief."}] + messages
    if i % 5 == 0:
        messages = messages[:-1] + [{"role": "assistant", "content": "Earlier."}, {"role": "user", "content": "More?"},
                                    messages[-1]]  # fmt: skip
    return messages


def test_batch_neighbours_do_not_change_scores(tiny_scorer):
    conversations = [conversation(i) for i in range(17)]
    together = tiny_scorer.score(conversations)
    assert len(together) == 17
    for c, r in zip(conversations, together):
        alone = tiny_scorer.score([c])[0]
        assert abs(alone.score - r.score) <= 1e-5
        for name in ATTRS:
            assert abs(alone.rewards[name] - r.rewards[name]) <= 1e-5
    # input order is preserved although batches are length-sorted
    assert [r.num_tokens for r in together] == [tiny_scorer.encode(c).num_tokens for c in conversations]


@pytest.mark.slow
def test_embedded_default_batch_neighbours(embedded_scorer):
    conversations = [conversation(i) for i in range(8)]
    together = embedded_scorer.score(conversations)
    for c, r in zip(conversations, together):
        assert abs(embedded_scorer.score([c])[0].score - r.score) <= 1e-5


def test_result_fields_are_consistent(tiny_scorer):
    r = tiny_scorer.score([conversation(3)])[0]
    assert set(r.rewards) == set(r.gating) == set(r.coefficients) == set(ATTRS)
    assert r.weights_source == "gating" and r.model_id == "tiny" and not r.truncated
    assert math.isclose(sum(r.coefficients[a] * r.rewards[a] for a in ATTRS), r.score, abs_tol=1e-5)
    # c = g T^T with T's verbosity row: c_verbose = -0.3 g_helpful - 0.1 g_safe
    assert math.isclose(r.coefficients["verbose"], -0.3 * r.gating["helpful"] - 0.1 * r.gating["safe"], abs_tol=1e-6)


def test_inspect_equals_the_gating_used_when_scoring(tiny_scorer):
    c = conversation(5)
    scored = tiny_scorer.score([c])[0]
    inspected = tiny_scorer.inspect(c[:-1])
    for name in ATTRS:
        assert abs(inspected.gating[name] - scored.gating[name]) <= 1e-5
        assert abs(inspected.coefficients[name] - scored.coefficients[name]) <= 1e-5


def test_steering_override_and_mask(tiny_scorer):
    c = conversation(2)
    base = tiny_scorer.score([c])[0]
    override = tiny_scorer.score([c], AttributeWeights("override", {"safe": 2.0}))[0]
    assert override.weights_source == "override"
    assert override.gating == {"helpful": 0.0, "safe": 2.0, "verbose": 0.0}
    # r'_safe = r_safe - 0.1 r_verbose
    assert math.isclose(override.score, 2.0 * (base.rewards["safe"] - 0.1 * base.rewards["verbose"]), abs_tol=1e-5)
    masked = tiny_scorer.score([c], AttributeWeights("mask", {"helpful": 0.0}))[0]
    assert masked.weights_source == "mask"
    assert masked.gating["helpful"] == 0.0 and math.isclose(masked.gating["safe"], base.gating["safe"], abs_tol=1e-7)
    with pytest.raises(InvalidInputError, match="unknown attributes"):
        tiny_scorer.score([c], AttributeWeights("override", {"nope": 1.0}))
    with pytest.raises(InvalidInputError, match="finite"):
        AttributeWeights("mask", {"safe": float("nan")})
    with pytest.raises(InvalidInputError, match="weights.mode"):
        AttributeWeights("boost", {})


def test_group_equals_individual_scores(tiny_scorer):
    prompt = [{"role": "user", "content": "Say something."}]
    responses = ["Something.", "Something longer than that, with words.", ""]
    group = tiny_scorer.score_group(prompt, responses)
    single = tiny_scorer.score([prompt + [{"role": "assistant", "content": r}] for r in responses])
    assert [g.score for g in group] == pytest.approx([s.score for s in single], abs=1e-5)


def test_group_and_pair_encoding_equal_whole_conversations(tiny_scorer):
    # The one encoding path of groups and pairs (the service and the CLI both use it) against encode().
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]
    whole = [tiny_scorer.encode(prompt + [{"role": "assistant", "content": r}]) for r in ("Yes.", "No, never.")]
    assert tiny_scorer.encode_group(prompt, ["Yes.", {"role": "assistant", "content": "No, never."}]) == whole
    assert tiny_scorer.encode_pairs([(prompt, "Yes.", "No, never."), (prompt, "No, never.", "Yes.")]) == whole + whole[::-1]
    assert tiny_scorer.encode_pairs([("Say something.", "Yes.", "No.")])[0] == tiny_scorer.encode(
        [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": "Yes."}])
    with pytest.raises(InvalidInputError, match=r"responses\[1\]"):
        tiny_scorer.encode_group(prompt, ["Yes.", {"role": "user", "content": "not a response"}])
    with pytest.raises(InvalidInputError, match=r"pairs\[1\]\.rejected"):
        tiny_scorer.encode_pairs([(prompt, "a", "b"), (prompt, "c", 7)])
    with pytest.raises(InvalidInputError, match=r"^prompt"):
        tiny_scorer.encode_group([{"role": "assistant", "content": "no user turn"}], ["Yes."])


def test_errors_name_the_conversation(tiny_scorer):
    with pytest.raises(InvalidConversationError, match=r"conversations\[1\]"):
        tiny_scorer.score([conversation(0), [{"role": "user", "content": "no response"}]])
    short = tiny_scorer.with_config(ScorerConfig(max_tokens=10))
    with pytest.raises(ConversationTooLongError, match=r"conversations\[0\] has \d+ tokens, over the limit max_tokens=10"):
        short.score([conversation(8)])
    left = tiny_scorer.with_config(ScorerConfig(max_tokens=40, truncation="left"))
    long_prompt = [{"role": "user", "content": "Question " * 40 + "?"}, {"role": "assistant", "content": "Yes."}]
    r = left.score([long_prompt])[0]
    assert r.truncated and r.num_tokens == 40
    assert tiny_scorer.score([]) == []
