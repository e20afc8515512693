"""A request over gRPC's own receive limit (2 x max_message_bytes) is refused by gRPC core before any handler
or deserializer runs; the interceptor takes unary requests inside the observed call, so such a refusal is
still counted in rewardsvc_requests_total{code="RESOURCE_EXHAUSTED"} and logged. Real server on loopback."""

from __future__ import annotations

import logging

import grpc
import pytest

from rewardsvc._proto.rewardsvc.v1 import reward_pb2 as pb
from rewardsvc.wire import SERVICE_NAME
from service_fixtures import score_request, settled_requests, short_conversation, start_server, wait_until
from tiny_service import load_tiny_scorer, save_tiny_heads

LIMIT = 4096  # max_message_bytes; gRPC's own receive limit is twice that


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    scorer = load_tiny_scorer(save_tiny_heads(tmp_path_factory.mktemp("oversize-heads"), tiny_llama_dir))
    running = start_server(scorer, max_message_bytes=LIMIT, metrics_port=0)
    yield running
    running.stop(0)


def codes(server, method: str) -> dict[str, float]:
    return {code: settled_requests(server.metrics_port, {"method": method, "code": code})
            for code in ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "CANCELLED", "UNIMPLEMENTED")}  # fmt: skip


def huge_score_request(size: int) -> pb.ScoreRequest:
    request = score_request([[{"role": "user", "content": "x" * size}, {"role": "assistant", "content": "y"}]])
    assert request.ByteSize() > size
    return request


def test_a_message_over_the_transports_limit_is_counted_and_logged(server, caplog):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.max_send_message_length", -1)]) as channel:
        score = channel.unary_unary(f"/{SERVICE_NAME}/Score", request_serializer=pb.ScoreRequest.SerializeToString,
                                    response_deserializer=pb.ScoreResponse.FromString)  # fmt: skip
        before = codes(server, "Score")
        with caplog.at_level(logging.INFO, logger="rewardsvc.server"):
            with pytest.raises(grpc.RpcError) as refused:
                score(huge_score_request(3 * LIMIT), timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
            # gRPC core answers the client before the server's handler thread has taken up the call: wait for
            # the count (it lands once that thread sees the refused receive), then check nothing else moved.
            assert wait_until(lambda: codes(server, "Score")["RESOURCE_EXHAUSTED"] > before["RESOURCE_EXHAUSTED"], 30)
            after = codes(server, "Score")
        # Between max_message_bytes and the transport's limit: our own refusal, INVALID_ARGUMENT (unchanged).
        with pytest.raises(grpc.RpcError) as invalid:
            score(huge_score_request(LIMIT + 100), timeout=30)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(score(score_request([short_conversation(0)]), timeout=60).results) == 1  # the server still serves
        last = codes(server, "Score")
    assert after["RESOURCE_EXHAUSTED"] - before["RESOURCE_EXHAUSTED"] == 1
    assert {k: after[k] - before[k] for k in after if k != "RESOURCE_EXHAUSTED"} == {"OK": 0, "INVALID_ARGUMENT": 0, "CANCELLED": 0, "UNIMPLEMENTED": 0}
    assert (last["INVALID_ARGUMENT"] - after["INVALID_ARGUMENT"], last["OK"] - after["OK"]) == (1, 1)
    lines = [r.getMessage() for r in caplog.records if "code=RESOURCE_EXHAUSTED" in r.getMessage()]
    assert len(lines) == 1 and "method=Score" in lines[0] and "receive limit" in lines[0], lines


def test_a_unary_call_without_its_message_is_still_unimplemented(server):
    # A client that half-closes a unary method without a message: grpc's own answer, kept; and counted.
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        as_stream = channel.stream_unary(f"/{SERVICE_NAME}/Score", request_serializer=pb.ScoreRequest.SerializeToString,
                                         response_deserializer=pb.ScoreResponse.FromString)  # fmt: skip
        before = codes(server, "Score")["UNIMPLEMENTED"]
        with pytest.raises(grpc.RpcError) as err:
            as_stream(iter([]), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "exactly one request" in err.value.details()
        assert codes(server, "Score")["UNIMPLEMENTED"] - before == 1
