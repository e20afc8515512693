"""A real server on 127.0.0.1:0 with the real embedded default model: every RPC, concurrency, deadlines,
failure isolation, health, reflection, metrics, auth and TLS."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rewardsvc._proto.rewardsvc.v1 import reward_pb2 as pb
from rewardsvc._proto.rewardsvc.v1 import reward_pb2_grpc as pb_grpc
from rewardsvc.types import AttributeWeights
from service_fixtures import (  # noqa: F401  (fixtures)
    has_metric,
    long_conversation,
    make_certs,
    metric_value,
    score_request,
    served,
    short_conversation,
    start_server,
    stub,
)

pytestmark = pytest.mark.slow
TOL = 1e-5
PROMPT = [{"role": "system", "content": ""}, {"role": "user", "content": "Name a colour."}]


def pb_messages(messages):
    return [pb.Message(role=m["role"], content=m["content"]) for m in messages]


def test_score_matches_the_offline_scorer(stub, embedded_scorer):
    conversations = [short_conversation(i) for i in range(3)]
    offline = embedded_scorer.score(conversations)
    reply = stub.Score(score_request(conversations, request_id="r1"), timeout=120)
    assert reply.request_id == "r1" and reply.weights_source == "gating"
    assert reply.model_id == embedded_scorer.model_id
    assert len(reply.results) == 3
    for got, want in zip(reply.results, offline):
        assert got.score == pytest.approx(want.score, abs=TOL)
        assert set(got.rewards) == set(embedded_scorer.attributes)
        for name in embedded_scorer.attributes:
            assert got.rewards[name] == pytest.approx(want.rewards[name], abs=TOL)
            assert got.gating[name] == pytest.approx(want.gating[name], abs=TOL)
            assert got.coefficients[name] == pytest.approx(want.coefficients[name], abs=TOL)
        assert got.num_tokens == want.num_tokens and got.truncated is False
        assert got.weights_source == "gating" and got.model_id == embedded_scorer.model_id
    assert stub.Score(pb.ScoreRequest(), timeout=30).results == []  # nothing to score is not an error
    no_deadline = stub.Score(score_request(conversations[:1]))  # gRPC reports "no deadline" as centuries ahead
    assert no_deadline.results[0].score == pytest.approx(offline[0].score, abs=TOL)


def test_score_with_steering_weights(stub, embedded_scorer):
    conversation = short_conversation(1)
    names = embedded_scorer.attributes
    override = AttributeWeights("override", {names[0]: 1.0})
    mask = AttributeWeights("mask", {names[1]: 0.0})
    for weights, mode in ((override, pb.AttributeWeights.OVERRIDE), (mask, pb.AttributeWeights.MASK)):
        want = embedded_scorer.score([conversation], weights)[0]
        request = score_request([conversation], weights=pb.AttributeWeights(mode=mode, values=weights.values))
        reply = stub.Score(request, timeout=120)
        got = reply.results[0]
        assert reply.weights_source == weights.mode and got.weights_source == weights.mode
        assert got.score == pytest.approx(want.score, abs=TOL)
        assert dict(got.gating) == pytest.approx(want.gating, abs=TOL)
    assert reply.results[0].gating[names[1]] == 0.0
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(score_request([conversation], weights=pb.AttributeWeights(mode=pb.AttributeWeights.MASK, values={"nope": 1.0})))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nope" in info.value.details()


def test_score_group_statistics(stub, embedded_scorer):
    responses = ["Red.", "Blue is a colour.", "Seven."]
    want = embedded_scorer.score_group(PROMPT, responses)
    reply = stub.ScoreGroup(pb.ScoreGroupRequest(prompt=pb_messages(PROMPT), responses=responses, request_id="g"), timeout=120)
    scores = [r.score for r in reply.results]
    assert scores == pytest.approx([r.score for r in want], abs=TOL)
    mean = sum(scores) / 3
    assert reply.mean == pytest.approx(mean, abs=1e-9)
    assert reply.std == pytest.approx(math.sqrt(sum((s - mean) ** 2 for s in scores) / 2), abs=1e-9)
    assert sorted(reply.ranks) == [1, 2, 3]
    assert scores[list(reply.ranks).index(1)] == max(scores)
    assert reply.request_id == "g" and reply.weights_source == "gating"


def test_compare_gives_the_bradley_terry_probability(stub, embedded_scorer):
    pair = pb.ComparePair(prompt=pb_messages(PROMPT), chosen="Red.", rejected="Seven.")
    reply = stub.Compare(pb.CompareRequest(pairs=[pair]), timeout=120)
    r = reply.results[0]
    chosen, rejected = embedded_scorer.score_group(PROMPT, ["Red.", "Seven."])
    assert r.score_chosen == pytest.approx(chosen.score, abs=TOL)
    assert r.score_rejected == pytest.approx(rejected.score, abs=TOL)
    assert r.p_chosen == pytest.approx(1 / (1 + math.exp(-(r.score_chosen - r.score_rejected))), abs=1e-12)
    assert r.chosen.score == r.score_chosen and r.rejected.num_tokens > 0


def test_inspect_weights_sorted_with_top_k(stub, embedded_scorer):
    want = embedded_scorer.inspect(PROMPT)
    reply = stub.InspectWeights(pb.InspectWeightsRequest(prompt=pb_messages(PROMPT), top_k=3), timeout=120)
    weights = [a.weight for a in reply.attributes]
    assert len(weights) == 3 and weights == sorted(weights, reverse=True)
    best = sorted(want.gating.items(), key=lambda kv: -kv[1])[:3]
    assert [a.attribute for a in reply.attributes] == [name for name, _ in best]
    for a in reply.attributes:
        assert a.weight == pytest.approx(want.gating[a.attribute], abs=TOL)
        assert a.coefficient == pytest.approx(want.coefficients[a.attribute], abs=TOL)
    assert reply.num_tokens == want.num_tokens and reply.weights_source == "gating"
    everything = stub.InspectWeights(pb.InspectWeightsRequest(prompt=pb_messages(PROMPT)), timeout=120)
    assert len(everything.attributes) == len(embedded_scorer.attributes)


def test_get_model_info(stub, embedded_scorer):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert list(info.attributes) == list(embedded_scorer.attributes)
    assert info.model_id == embedded_scorer.model_id and info.backbone == embedded_scorer.backbone_description()
    layer = embedded_scorer.heads.config.feature_layer  # the shipped default stops the 30-block backbone there
    assert info.backbone == "embedded:smollm2-135m-instruct" + ("" if layer is None else f"+blocks:{layer}/30")
    assert info.dtype == "float32" and info.device == "cpu"
    assert info.max_tokens == embedded_scorer.config.max_tokens == info.limits.max_tokens_per_conversation
    assert info.trained == embedded_scorer.trained and info.server_version
    assert dict(info.provenance) == embedded_scorer.provenance
    assert info.limits.max_conversations_per_request == 256


def test_score_stream_echoes_ids_and_survives_a_bad_request(stub, embedded_scorer):
    offline = {f"ok{i}": embedded_scorer.score([short_conversation(i)])[0].score for i in range(3)}
    bad = pb.ScoreRequest(conversations=[pb.Conversation(messages=[pb.Message(role="user", content="no response")])],
                          request_id="bad")  # fmt: skip
    requests = [score_request([short_conversation(i)], request_id=f"ok{i}") for i in range(3)]
    requests.insert(1, bad)
    replies = {r.request_id: r for r in stub.ScoreStream(iter(requests), timeout=120)}
    assert set(replies) == {"ok0", "ok1", "ok2", "bad"}
    assert replies["bad"].error.code == "INVALID_ARGUMENT" and "conversations[0]" in replies["bad"].error.field
    for rid, score in offline.items():
        assert replies[rid].response.results[0].score == pytest.approx(score, abs=TOL)


def test_32_concurrent_clients_get_their_own_offline_scores(served, embedded_scorer):
    # 32 clients x 50 requests, 1 short conversation (~19 tokens) each, drawn from 8 distinct conversations:
    # every batch mixes different conversations from different clients, so a result routed to the wrong
    # caller would show, while the CPU cost stays small (identical conversations in a batch compute once).
    kinds = [short_conversation(i) for i in range(8)]
    offline = [r.score for r in embedded_scorer.score(kinds)]
    errors: list[str] = []

    def client(c: int) -> int:
        done = 0
        with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
            s = pb_grpc.RewardServiceStub(channel)
            for j in range(50):
                k = (c + j) % 8
                reply = s.Score(score_request([kinds[k]], request_id=f"{c}-{j}"), timeout=300)
                got = reply.results[0].score
                if reply.request_id != f"{c}-{j}" or abs(got - offline[k]) > TOL:
                    errors.append(f"client {c} request {j}: {got} != {offline[k]}")
                done += 1
        return done

    with ThreadPoolExecutor(32) as pool:
        answered = sum(pool.map(client, range(32)))
    assert answered == 32 * 50 and not errors, errors[:5]
    assert metric_value(served.metrics_port, "rewardsvc_batch_conversations_count") > 0
    # Batching happened: far fewer scorer calls than requests.
    assert metric_value(served.metrics_port, "rewardsvc_batch_conversations_count") < 32 * 50 / 2


def test_deadline_shorter_than_the_work_then_still_healthy(stub, served):
    request = score_request([long_conversation(i) for i in range(8)])  # seconds of compute on any CPU
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(request, timeout=0.05)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert len(stub.Score(score_request([short_conversation(0)]), timeout=120).results) == 1


def test_health_reflection_and_metrics(served):
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "rewardsvc.v1.RewardService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        names = {s.name for s in answers[0].list_services_response.service}
    assert {"rewardsvc.v1.RewardService", "grpc.health.v1.Health"} <= names
    for name in ("rewardsvc_requests_total", "rewardsvc_request_latency_seconds_count", "rewardsvc_batch_tokens_count",
                 "rewardsvc_scored_tokens_total", "rewardsvc_queue_depth", "rewardsvc_tokens_in_flight",
                 "rewardsvc_tokens_per_second"):  # fmt: skip
        assert has_metric(served.metrics_port, name), name  # present on the page (its value may be 0)
    assert metric_value(served.metrics_port, "rewardsvc_requests_total", {"method": "Score", "code": "OK"}) >= 1
    assert metric_value(served.metrics_port, "rewardsvc_scored_tokens_total") > 0


class _FailOnMarked:
    """Test double around the real scorer: score_encoded raises for a batch holding a marked conversation.
    It simulates a forward pass running out of memory, which cannot be produced for real on CPU."""

    def __init__(self, scorer, marked):
        self._scorer, self._marked, self.calls = scorer, marked, 0

    def __getattr__(self, name):
        return getattr(self._scorer, name)

    def score_encoded(self, encoded, weights=None):
        self.calls += 1
        if self._marked in encoded:
            raise RuntimeError("out of memory (simulated)")
        return self._scorer.score_encoded(encoded, weights)


def test_a_failing_request_fails_alone_as_internal(embedded_scorer, caplog):
    kinds = [short_conversation(i) for i in range(5)]
    marked = [{"role": "system", "content": ""}, {"role": "user", "content": "poison"}, {"role": "assistant", "content": "x"}]
    offline = [r.score for r in embedded_scorer.score(kinds)]
    double = _FailOnMarked(embedded_scorer, embedded_scorer.encode(marked))
    running = start_server(double, max_wait_ms=300)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            s = pb_grpc.RewardServiceStub(channel)
            futures = [s.Score.future(score_request([c]), timeout=300) for c in kinds]
            bad = s.Score.future(score_request([marked]), timeout=300)
            for future, want in zip(futures, offline):
                assert future.result().results[0].score == pytest.approx(want, abs=TOL)
            with pytest.raises(grpc.RpcError) as info:
                bad.result()
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "logged by the server" in info.value.details() and "Traceback" not in info.value.details()
        assert "event=rpc.internal_error" in caplog.text
    finally:
        running.stop(0)


# ---- security ----------------------------------------------------------------------------------------


def test_bearer_token_auth(embedded_scorer):
    running = start_server(embedded_scorer, auth_token="s3cret")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            s = pb_grpc.RewardServiceStub(channel)
            for metadata in (None, (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)):
                with pytest.raises(grpc.RpcError) as info:
                    s.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as info:
                list(s.ScoreStream(iter([score_request([short_conversation(0)])]), timeout=10))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # open without a token
            ok = s.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=(("authorization", "Bearer s3cret"),))
            assert ok.model_id == embedded_scorer.model_id
    finally:
        running.stop(0)


def test_tls_and_mutual_tls(embedded_scorer, tmp_path):
    certs = make_certs(tmp_path)
    ca = certs["ca"].read_bytes()
    running = start_server(
        embedded_scorer,
        tls_cert=str(certs["server_cert"]),
        tls_key=str(certs["server_key"]),
        tls_client_ca=str(certs["ca"]),
    )
    try:
        good = grpc.ssl_channel_credentials(ca, certs["client_key"].read_bytes(), certs["client_cert"].read_bytes())
        with grpc.secure_channel(f"localhost:{running.port}", good) as channel:
            s = pb_grpc.RewardServiceStub(channel)
            reply = s.Score(score_request([short_conversation(2)]), timeout=120)
            assert reply.results[0].score == pytest.approx(embedded_scorer.score([short_conversation(2)])[0].score, abs=TOL)
        no_client_cert = grpc.ssl_channel_credentials(ca)
        with grpc.secure_channel(f"localhost:{running.port}", no_client_cert) as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.RewardServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:  # plaintext to a TLS port
            with pytest.raises(grpc.RpcError):
                pb_grpc.RewardServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    finally:
        running.stop(0)
