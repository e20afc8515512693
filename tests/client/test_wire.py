"""rewardsvc.wire: every conversion is the inverse of its twin, so both ends read the wire the same way."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict

import pytest

from rewardsvc._proto.rewardsvc.v1 import reward_pb2 as pb
from rewardsvc.config import Limits
from rewardsvc.errors import InvalidInputError
from rewardsvc.normalization import Normalization
from rewardsvc.types import AttributeWeights, CompareResult, InspectResult, NormalizedScores, ScoreResult
from rewardsvc.wire import (
    SERVICE_NAME,
    compare_from_pb,
    compare_to_pb,
    inspect_attributes_to_pb,
    inspect_from_pb,
    limits_from_pb,
    limits_to_pb,
    messages_from_pb,
    messages_to_pb,
    model_info_from_pb,
    model_info_to_pb,
    normalization_to_pb,
    request_normalization_from_pb,
    result_from_pb,
    result_to_pb,
    weights_from_pb,
    weights_to_pb,
)

RESULT = ScoreResult(score=0.25, rewards={"a": 1.0, "b": -0.5}, gating={"a": 0.75, "b": 0.25},
                     coefficients={"a": 0.75, "b": 0.25}, num_tokens=12, truncated=True, weights_source="mask",
                     model_id="m")  # fmt: skip


def test_service_name():
    assert SERVICE_NAME == "rewardsvc.v1.RewardService"


def test_messages_and_weights_round_trip():
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}]
    assert messages_from_pb(messages_to_pb(messages)) == messages
    assert messages_from_pb(messages_to_pb("Hi")) == [{"role": "user", "content": "Hi"}]
    for weights in (AttributeWeights("override", {"a": 2.0}), AttributeWeights("mask", {"b": 0.0})):
        request = pb.ScoreRequest(weights=weights_to_pb(weights))
        assert weights_from_pb(request) == weights
    assert weights_to_pb(None) is None and weights_from_pb(pb.ScoreRequest()) is None
    assert weights_from_pb(pb.ScoreRequest(weights=pb.AttributeWeights())) is None  # unspecified, no values
    with pytest.raises(InvalidInputError) as info:
        weights_from_pb(pb.ScoreRequest(weights=pb.AttributeWeights(values={"a": 1.0})))
    assert info.value.field == "weights.mode"


def test_results_round_trip():
    assert result_from_pb(result_to_pb(RESULT)) == RESULT
    pair = CompareResult(p_chosen=0.6, score_chosen=0.25, score_rejected=-0.15, chosen=RESULT, rejected=RESULT)
    assert compare_from_pb(compare_to_pb(pair)) == pair
    inspected = InspectResult(gating={"b": 0.75, "a": 0.25}, coefficients={"b": 0.5, "a": 0.25}, num_tokens=3,
                              truncated=False, weights_source="gating", model_id="m")  # fmt: skip
    response = pb.InspectWeightsResponse(attributes=inspect_attributes_to_pb(inspected), num_tokens=3,
                                         weights_source="gating", model_id="m")  # fmt: skip
    back = inspect_from_pb(response)
    assert back == inspected and list(back.gating) == ["b", "a"]  # the order survives


def test_limits_are_the_proto_server_limits():
    limits = Limits(max_message_bytes=1, max_conversations_per_request=2, max_tokens_per_conversation=3,
                    max_group_size=4, max_tokens_in_flight=5)  # fmt: skip
    assert limits_from_pb(limits_to_pb(limits)) == limits


def test_model_info_round_trip():
    info = {
        "model_id": "m", "attributes": ["a", "b"], "backbone": "bb", "dtype": "float32", "device": "cpu",
        "max_tokens": 4096, "truncation": "error", "trained": True, "provenance": {"data": {"n": 3}},
        "metrics": {"acc": 0.5}, "label_scales": {"a": {"mean": 1.0, "std": 2.0}}, "server_version": "9",
        "limits": Limits(max_group_size=7), "name": "m",
        "models": [
            {"name": "m", "model_id": "m", "backbone": "bb", "attributes": ["a", "b"], "trained": True, "is_default": True},
            {"name": "ab", "model_id": "m2", "backbone": "bb", "attributes": ["a"], "trained": False, "is_default": False},
        ],
        "calibration": {"available": True, "calibration_id": "cal-1"}, "default_normalization": Normalization(clip=2.5),
        "scoring_plan": {"source": "measured", "batch_plan": "padded", "dtype": "float32"},
    }  # fmt: skip
    back = model_info_from_pb(model_info_to_pb(info))
    assert back == {**info, "limits": asdict(Limits(max_group_size=7))}


def test_normalization_and_normalized_results_round_trip():
    for n in (None, Normalization(), Normalization(clip=1.5), Normalization(mode="none")):
        request = pb.ScoreRequest()
        if normalization_to_pb(n) is not None:
            request.normalization.CopyFrom(normalization_to_pb(n))
        assert request_normalization_from_pb(request) == n
    normalized = NormalizedScores(score=-0.5, rewards={"a": 1.25, "b": -3.0}, calibration_id="cal-x", clip=3.0)
    result = ScoreResult(score=0.1, rewards={"a": 0.2, "b": 0.3}, gating={"a": 1.0, "b": 0.0}, coefficients={"a": 1.0, "b": 0.0},
                         num_tokens=4, truncated=False, weights_source="gating", model_id="m", normalized=normalized)  # fmt: skip
    assert result_from_pb(result_to_pb(result)) == result
    plain = dataclasses.replace(result, normalized=None)
    assert not result_to_pb(plain).HasField("normalized") and result_from_pb(result_to_pb(plain)) == plain
