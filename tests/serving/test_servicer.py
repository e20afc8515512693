"""Round trips through a real server (127.0.0.1, port 0) over the tiny scorer: every RPC, through the client
and through the raw stub; typed errors with their field and status; the stream's per-request errors. The
same checks on the real embedded model are in tests/client/test_client.py (slow)."""

from __future__ import annotations

from dataclasses import asdict, replace

import grpc
import pytest

from rewardsvc import __version__
from rewardsvc._proto.rewardsvc.v1 import reward_pb2 as pb
from rewardsvc._proto.rewardsvc.v1 import reward_pb2_grpc as pb_grpc
from rewardsvc.client import RewardClient
from rewardsvc.config import Limits
from rewardsvc.errors import InvalidInputError
from rewardsvc.types import AttributeWeights, CompareResult, GroupResult, InspectResult, ScoreResult
from rewardsvc.wire import FIELD_KEY
from service_fixtures import metric_value, score_request, settled_requests, start_server
from tiny_models import TINY_ATTRIBUTES

PROMPT = [{"role": "user", "content": "Name a colour."}]


def conversation(response: str) -> list[dict[str, str]]:
    return [*PROMPT, {"role": "assistant", "content": response}]


@pytest.fixture(scope="module")
def tiny_served(tiny_scorer):
    running = start_server(tiny_scorer, metrics_port=0, max_group_size=8)
    yield running
    running.stop(0)


@pytest.fixture()
def client(tiny_served):
    with RewardClient(f"127.0.0.1:{tiny_served.port}", timeout=60) as c:
        yield c


def test_score_round_trip_equals_offline(client, tiny_scorer):
    conversations = [conversation(r) for r in ("Red.", "Seven.", "Blue.")]
    served = client.score(conversations, request_id="r1")
    offline = tiny_scorer.score(conversations)
    assert all(isinstance(r, ScoreResult) for r in served)
    for got, want in zip(served, offline):
        assert got.score == pytest.approx(want.score, abs=1e-5)
        assert got.rewards == pytest.approx(want.rewards, abs=1e-5) and got.gating == pytest.approx(want.gating, abs=1e-5)
        assert (got.num_tokens, got.truncated, got.model_id, got.weights_source) == (
            want.num_tokens, want.truncated, want.model_id, want.weights_source)  # fmt: skip


def test_steered_score_round_trip(client, tiny_scorer):
    weights = AttributeWeights("mask", {"helpful": 0.0})
    [served] = client.score([conversation("Red.")], weights)
    [offline] = tiny_scorer.score([conversation("Red.")], weights)
    assert served.weights_source == "mask" and served.gating["helpful"] == 0.0
    assert served.score == pytest.approx(offline.score, abs=1e-5)
    [as_dict] = client.score([conversation("Red.")], {"mode": "mask", "values": {"helpful": 0.0}})
    assert as_dict == served


def test_group_compare_inspect_round_trips(client, tiny_scorer):
    group = client.score_group(PROMPT, ["Red.", {"role": "assistant", "content": "Seven."}])
    assert isinstance(group, GroupResult) and sorted(group.ranks) == [1, 2]
    assert group.scores == pytest.approx([r.score for r in tiny_scorer.score([conversation("Red."), conversation("Seven.")])], abs=1e-5)

    [pair] = client.compare([("Name a colour.", "Red.", "Seven.")])
    assert isinstance(pair, CompareResult) and pair.chosen.score == pair.score_chosen
    assert 0 < pair.p_chosen < 1

    inspected = client.inspect(PROMPT, top_k=2)
    assert isinstance(inspected, InspectResult) and len(inspected.gating) == 2
    assert list(inspected.gating) == list(inspected.coefficients)
    full = tiny_scorer.inspect(PROMPT)
    for name, weight in inspected.gating.items():
        assert weight == pytest.approx(full.gating[name], abs=1e-6)


def test_model_info_reports_the_limits(client, tiny_served, tiny_scorer):
    info = client.model_info()
    assert info["model_id"] == "tiny" and info["attributes"] == list(TINY_ATTRIBUTES) and info["trained"]
    assert info["server_version"] == __version__
    want = replace(tiny_served.config.limits(), max_tokens_per_conversation=tiny_scorer.config.max_tokens)
    assert info["limits"] == asdict(want) and info["limits"]["max_group_size"] == 8
    assert set(info["limits"]) == {f for f in asdict(Limits())}
    assert client.health() == "SERVING"


def test_invalid_input_is_invalid_argument_with_the_field(client, tiny_served):
    with pytest.raises(InvalidInputError) as info:
        client.score([conversation("Red."), [{"role": "user", "content": "no answer"}]])
    assert info.value.code == "INVALID_ARGUMENT" and info.value.field == "conversations[1]"
    with grpc.insecure_channel(f"127.0.0.1:{tiny_served.port}") as channel:
        stub = pb_grpc.RewardServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raw:
            stub.Score(pb.ScoreRequest(weights=pb.AttributeWeights(values={"safe": 1.0})), timeout=30)
    assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(raw.value.trailing_metadata())[FIELD_KEY] == "weights.mode"


def test_stream_answers_each_request_and_survives_a_bad_one(client, tiny_scorer):
    requests = [("a", [conversation("Red.")]), ("b", [[{"role": "user", "content": "no answer"}]]), ("c", [])]
    results = {r.request_id: r for r in client.score_stream(iter(requests))}
    assert set(results) == {"a", "b", "c"}
    assert results["a"].results[0].score == pytest.approx(tiny_scorer.score([conversation("Red.")])[0].score, abs=1e-5)
    assert isinstance(results["b"].error, InvalidInputError) and results["b"].error.field == "conversations[0]"
    assert results["c"].results == [] and results["c"].error is None


def test_metrics_count_the_calls(tiny_served):
    before = settled_requests(tiny_served.metrics_port, {"method": "Score", "code": "OK"})
    with grpc.insecure_channel(f"127.0.0.1:{tiny_served.port}") as channel:
        pb_grpc.RewardServiceStub(channel).Score(score_request([conversation("Red.")]), timeout=30)
    assert settled_requests(tiny_served.metrics_port, {"method": "Score", "code": "OK"}) == before + 1
    assert metric_value(tiny_served.metrics_port, "rewardsvc_scored_conversations_total") >= 1
