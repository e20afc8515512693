"""Reliability of the server on a tiny scorer: a call is in flight until its reply is written, grace expiry
answers UNAVAILABLE and joins the batcher, bad bytes and huge steering weights are INVALID_ARGUMENT, a
non-finite result is INTERNAL with an id, and the metrics carry the codes the clients saw."""

from __future__ import annotations

import math
import threading
from collections import Counter

import grpc
import pytest

from rewardsvc._proto.rewardsvc.v1 import reward_pb2 as pb
from rewardsvc._proto.rewardsvc.v1 import reward_pb2_grpc as pb_grpc
from rewardsvc.serving.metrics import ServiceMetrics
from rewardsvc.serving.interceptors import ActiveCalls, ObservingInterceptor
from rewardsvc.wire import SERVICE_NAME
from service_fixtures import metric_value, score_request, short_conversation, start_server, wait_until
from tiny_service import SlowScorer

PROMPT = [pb.Message(role="user", content="Name a colour.")]


@pytest.fixture()
def server(tiny):
    running = start_server(tiny, metrics_port=0)
    yield running
    running.stop(0)


def rpc_code(call, *args, **kwargs) -> str:
    try:
        call(*args, **kwargs)
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


# ---- drain: in flight until the reply is written ---------------------------------------------------


class _FakeContext:
    def __init__(self):
        self.callbacks = []

    def add_callback(self, callback):
        self.callbacks.append(callback)
        return True

    def is_active(self):
        return True

    def code(self):
        return None

    def time_remaining(self):
        return 100.0

    def peer(self):
        return "test"

    def invocation_metadata(self):  # read by the interceptor's tracing (traceparent)
        return ()


class _Details:
    method = f"/{SERVICE_NAME}/Score"
    invocation_metadata = ()


def test_a_call_counts_as_in_flight_until_grpc_has_written_its_reply():
    metrics, active = ServiceMetrics(), ActiveCalls()
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: pb.ScoreResponse(),
                                                  pb.ScoreRequest.FromString, pb.ScoreResponse.SerializeToString)  # fmt: skip
    wrapped = ObservingInterceptor(metrics, active).intercept_service(lambda _d: handler, _Details())
    context = _FakeContext()
    # Unary methods are served as stream-request ones that take their request inside the observed call
    # (interceptors.ObservingInterceptor: so an oversize message is counted too).
    wrapped.stream_unary(iter([pb.ScoreRequest()]), context)
    # The handler returned, gRPC has not sent the reply yet: a drain must still wait for this call.
    assert active.count == 1 and len(context.callbacks) == 1
    for callback in context.callbacks:  # gRPC finished the call
        callback()
    assert active.count == 0
    assert metrics.requests.labels("Score", "OK")._value.get() == 1


def server_codes(running) -> Counter:
    """requests_total by (method, code), read from the server's registry (works after stop)."""
    got: Counter = Counter()
    for family in running.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "rewardsvc_requests_total" and sample.value:
                got[sample.labels["method"], sample.labels["code"]] += int(sample.value)
    return got


def test_drain_answers_every_accepted_request(tiny):
    slow = SlowScorer(tiny, 0.02)
    running = start_server(slow, grace_s=60, max_wait_ms=1)
    codes: list[str] = []
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.RewardServiceStub(channel)

        def client(i: int) -> None:
            for j in range(10):
                codes.append(rpc_code(stub.Score, score_request([short_conversation(i * 10 + j)]), timeout=60))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        assert wait_until(lambda: len(codes) >= 5, 30)
        running.stop()
        for t in threads:
            t.join(60)
    server = server_codes(running)
    # Every call that reached a handler (accepted) was answered OK; the others were refused (UNAVAILABLE
    # by the drain, or by gRPC itself once the port closed) and never counted as work.
    assert set(server) <= {("Score", "OK"), ("Score", "UNAVAILABLE")}, server
    assert codes.count("OK") == server["Score", "OK"] >= 5, (codes, server)
    assert len(codes) == 40


# ---- grace expiry -------------------------------------------------------------------------------------


def test_grace_expiry_answers_unavailable_and_joins_the_batcher(tiny):
    slow = SlowScorer(tiny, 1.5)
    running = start_server(slow, grace_s=0.2, max_wait_ms=1)
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.RewardServiceStub(channel)
        futures = [stub.Score.future(score_request([short_conversation(i)]), timeout=60) for i in range(4)]
        assert wait_until(lambda: running.calls_in_progress == 4 and slow.calls >= 2, 30)
        running.stop()
        codes = Counter(rpc_code(f.result) for f in futures)
    assert codes == {"UNAVAILABLE": 4}
    assert not running.batcher.thread_alive  # joined: no thread inside the model when the process exits


# ---- validation -----------------------------------------------------------------------------------------


def _bad_utf8(message_type, field: str) -> bytes:
    number = message_type.DESCRIPTOR.fields_by_name[field].number
    return bytes([(number << 3) | 2, 2, 0xFF, 0xFE])


def test_undecodable_bytes_are_invalid_argument_and_counted(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        raw = channel.unary_unary(f"/{SERVICE_NAME}/Score")
        with pytest.raises(grpc.RpcError) as info:
            raw(_bad_utf8(pb.ScoreRequest, "request_id"), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in info.value.details()
        stream = channel.stream_stream(f"/{SERVICE_NAME}/ScoreStream", response_deserializer=pb.ScoreStreamResponse.FromString)
        good = score_request([short_conversation(0)], request_id="good").SerializeToString()
        replies = list(stream(iter([_bad_utf8(pb.ScoreRequest, "request_id"), good]), timeout=30))
    assert [r.error.code for r in replies if r.HasField("error")] == ["INVALID_ARGUMENT"]
    assert [r.request_id for r in replies if r.HasField("response")] == ["good"]
    assert wait_until(lambda: metric_value(server.metrics_port, "rewardsvc_requests_total",
                                           {"method": "Score", "code": "INVALID_ARGUMENT"}) == 1, 10)  # fmt: skip


@pytest.mark.parametrize("value", [1e308, 3.5e38, 1e39, 1e6 * (1 + 1e-9), -1.0])
@pytest.mark.parametrize("mode", [pb.AttributeWeights.OVERRIDE, pb.AttributeWeights.MASK])
def test_steering_weights_out_of_range_are_invalid_argument(server, mode, value):
    weights = pb.AttributeWeights(mode=mode, values={"helpful": value})
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.RewardServiceStub(channel)
        for call, request in (
            (stub.Score, score_request([short_conversation(0)], weights=weights)),
            (stub.InspectWeights, pb.InspectWeightsRequest(prompt=PROMPT, weights=weights)),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "weights.values" in info.value.details()
        top = pb.AttributeWeights(mode=mode, values={"helpful": 1e6})  # the bound itself: finite results
        reply = stub.Score(score_request([short_conversation(0)], weights=top), timeout=30)
        assert all(math.isfinite(x) for x in [reply.results[0].score, *reply.results[0].coefficients.values()])


class _NaNScorer:
    def __init__(self, scorer):
        self._scorer, self.enabled = scorer, False  # off for the server's warm-up

    def __getattr__(self, name):
        return getattr(self._scorer, name)

    def score_encoded(self, encoded, weights=None):
        from dataclasses import replace

        results = self._scorer.score_encoded(encoded, weights)
        return [replace(r, score=math.nan) for r in results] if self.enabled else results


def test_a_non_finite_result_is_internal_with_an_error_id(tiny):
    nan = _NaNScorer(tiny)
    running = start_server(nan)
    nan.enabled = True
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.RewardServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Score(score_request([short_conversation(0)]), timeout=30)
            assert info.value.code() == grpc.StatusCode.INTERNAL and "id " in info.value.details()
            [reply] = stub.ScoreStream(iter([score_request([short_conversation(1)], request_id="s")]), timeout=30)
            assert reply.error.code == "INTERNAL" and "id " in reply.error.message
    finally:
        running.stop(0)


def test_empty_group_and_empty_compare_are_both_invalid_argument(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.RewardServiceStub(channel)
        for call, request, field in ((stub.ScoreGroup, pb.ScoreGroupRequest(prompt=PROMPT), "responses"),
                                     (stub.Compare, pb.CompareRequest(), "pairs")):  # fmt: skip
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details().startswith(field) and dict(info.value.trailing_metadata())["rewardsvc-field"] == field


# ---- metrics match the clients ---------------------------------------------------------------------------


def test_metrics_codes_match_what_the_clients_saw(tiny):
    slow = SlowScorer(tiny, 1.5)
    running = start_server(slow, metrics_port=0, max_wait_ms=1)
    seen: Counter = Counter()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.RewardServiceStub(channel)
            seen["Score", rpc_code(stub.Score, score_request([short_conversation(0)]), timeout=30)] += 1
            seen["Score", rpc_code(stub.Score, score_request([[{"role": "user", "content": "x"}]]), timeout=30)] += 1
            # A deadline that passes while the request waits behind another: dropped before compute.
            calls_before = slow.calls  # the warm-up and the OK call above
            blocker = stub.Score.future(score_request([short_conversation(1)]), timeout=30)
            assert wait_until(lambda: slow.calls > calls_before, 10)  # the blocker is computing
            seen["Score", rpc_code(stub.Score, score_request([short_conversation(2)]), timeout=0.8)] += 1
            seen["Score", rpc_code(blocker.result)] += 1
            # Client-cancelled streams, whether the handler is waiting on work or on the next request.
            for _ in range(3):
                release = threading.Event()

                def requests():
                    yield score_request([short_conversation(3)], request_id="a")
                    release.wait(30)

                call = stub.ScoreStream(requests(), timeout=30)
                next(call)
                call.cancel()
                release.set()
                seen["ScoreStream", rpc_code(lambda: list(call))] += 1
        assert seen["Score", "DEADLINE_EXCEEDED"] == 1 and seen["ScoreStream", "CANCELLED"] == 3, seen

        def counted() -> Counter:
            got: Counter = Counter()
            for (method, code) in set(seen):
                got[method, code] = metric_value(running.metrics_port, "rewardsvc_requests_total", {"method": method, "code": code})
            return got

        assert wait_until(lambda: counted() == seen and running.calls_in_progress == 0, 20), (counted(), seen)
        total = metric_value(running.metrics_port, "rewardsvc_requests_total")
        assert total == sum(seen.values())
        dropped = lambda r: metric_value(running.metrics_port, "rewardsvc_dropped_total", {"reason": r})  # noqa: E731
        assert wait_until(lambda: dropped("deadline") == 1, 10), (dropped("deadline"), dropped("cancelled"))
    finally:
        running.stop(0)
