"""Every limit gives INVALID_ARGUMENT naming the field and the limit; admission control gives
RESOURCE_EXHAUSTED with a retry hint."""

from __future__ import annotations

import grpc
import pytest

from rewardsvc._proto.rewardsvc.v1 import reward_pb2 as pb
from rewardsvc._proto.rewardsvc.v1 import reward_pb2_grpc as pb_grpc
from rewardsvc.errors import InvalidInputError
from rewardsvc.serving.config import ServerConfig
from service_fixtures import score_request, short_conversation, start_server, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def limited(embedded_scorer):
    running = start_server(
        embedded_scorer,
        max_message_bytes=4096,
        max_conversations_per_request=4,
        max_tokens_per_conversation=64,
        max_group_size=3,
    )
    yield running
    running.stop(0)


@pytest.fixture()
def limited_stub(limited):
    with grpc.insecure_channel(f"127.0.0.1:{limited.port}") as channel:
        yield pb_grpc.RewardServiceStub(channel)


def invalid(call, *args, **kwargs) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=60, **kwargs)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return info.value.details()


def messages(conversation):
    return [pb.Message(role=m["role"], content=m["content"]) for m in conversation]


def test_max_conversations_per_request(limited_stub):
    details = invalid(limited_stub.Score, score_request([short_conversation(i) for i in range(5)]))
    assert details == "conversations: 5 conversations, over max_conversations_per_request=4"


def test_compare_pairs_count_as_two_conversations(limited_stub):
    prompt = messages(short_conversation(0)[:2])
    pairs = [pb.ComparePair(prompt=prompt, chosen="a", rejected="b") for _ in range(3)]
    details = invalid(limited_stub.Compare, pb.CompareRequest(pairs=pairs))
    assert details == "pairs: 3 pairs (6 conversations), over max_conversations_per_request=4"


def test_max_group_size(limited_stub):
    request = pb.ScoreGroupRequest(prompt=messages(short_conversation(0)[:2]), responses=["a", "b", "c", "d"])
    assert invalid(limited_stub.ScoreGroup, request) == "responses: 4 responses, over max_group_size=3"


def test_max_tokens_per_conversation_names_the_conversation(limited_stub):
    long = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]
    details = invalid(limited_stub.Score, score_request([short_conversation(0), long]))
    assert details.startswith("conversations[1] has") and "max_tokens=64" in details
    group = pb.ScoreGroupRequest(prompt=messages(short_conversation(0)[:2]), responses=["fine", "word " * 100])
    assert invalid(limited_stub.ScoreGroup, group).startswith("responses[1] has")


def test_max_message_bytes(limited_stub):
    huge = [{"role": "user", "content": "x" * 5000}, {"role": "assistant", "content": "ok"}]
    details = invalid(limited_stub.Score, score_request([huge]))
    assert details.startswith("request: ") and "over max_message_bytes=4096" in details


def test_malformed_input_names_the_field(limited_stub):
    no_response = [{"role": "user", "content": "hi"}]
    assert invalid(limited_stub.Score, score_request([short_conversation(0), no_response])).startswith("conversations[1]")
    bad_role = [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]
    assert "conversations[0][0].role" in invalid(limited_stub.Score, score_request([bad_role]))
    request = score_request([short_conversation(0)], weights=pb.AttributeWeights(values={"safety": 0.0}))
    assert "weights.mode" in invalid(limited_stub.Score, request)
    request = pb.InspectWeightsRequest(prompt=messages(short_conversation(0)[:2]), top_k=-1)
    assert "top_k" in invalid(limited_stub.InspectWeights, request)
    request = pb.InspectWeightsRequest(prompt=messages(short_conversation(0)))  # ends with the assistant
    assert invalid(limited_stub.InspectWeights, request).startswith("prompt")
    with pytest.raises(grpc.RpcError) as info:
        limited_stub.Score(score_request([no_response]), timeout=60)
    assert dict(info.value.trailing_metadata())["rewardsvc-field"] == "conversations[0]"


def test_admission_control_gives_resource_exhausted_with_a_retry_hint(embedded_scorer):
    # Room for one ~19-token conversation x 4, not for a second request while the first computes.
    running = start_server(embedded_scorer, max_tokens_in_flight=100, max_tokens_per_conversation=64)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            s = pb_grpc.RewardServiceStub(channel)
            first = s.Score.future(score_request([short_conversation(i) for i in range(4)]), timeout=300)
            assert wait_until(lambda: running.batcher.tokens_in_flight > 0 or first.done(), timeout=60)
            with pytest.raises(grpc.RpcError) as info:
                s.Score(score_request([short_conversation(9), short_conversation(8)]), timeout=60)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_tokens_in_flight=100" in info.value.details()
            retry_after_ms = int(dict(info.value.trailing_metadata())["retry-after-ms"])
            assert retry_after_ms >= 1
            assert len(first.result().results) == 4
            # One request that could never fit is INVALID_ARGUMENT: retrying would not help.
            details = invalid(s.Score, score_request([short_conversation(i) for i in range(6)]))
            assert "over max_tokens_in_flight=100" in details
    finally:
        running.stop(0)


def test_server_config_validation():
    with pytest.raises(InvalidInputError, match="server.port"):
        ServerConfig(port=70000)
    with pytest.raises(InvalidInputError, match="tls_key"):
        ServerConfig(tls_cert="cert.pem")
    with pytest.raises(InvalidInputError, match="tls_client_ca"):
        ServerConfig(tls_client_ca="ca.pem")
    with pytest.raises(InvalidInputError, match="max_conversations_per_request"):
        ServerConfig(max_conversations_per_request=0)
    assert "s3cret" not in repr(ServerConfig(auth_token="s3cret"))
