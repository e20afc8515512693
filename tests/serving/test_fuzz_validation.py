"""Property-based fuzz of the request-validation layer: arbitrary protobuf requests, and arbitrary bytes,
sent to a real server on a tiny scorer get OK or INVALID_ARGUMENT, never INTERNAL, and an OK reply never
holds a non-finite number."""

from __future__ import annotations

import math

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewardsvc._proto.rewardsvc.v1 import reward_pb2 as pb
from rewardsvc.wire import SERVICE_NAME
from service_fixtures import start_server
from tiny_service import ATTRS, load_tiny_scorer, save_tiny_heads

ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT}
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

text = st.text(max_size=40)
roles = st.sampled_from(["system", "user", "assistant", "tool", "", "robot"])
messages = st.lists(st.builds(pb.Message, role=roles, content=text), max_size=5)
values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1.0, 1e6, 1e6 + 1, 3.5e38, 1e39, 1e308, -0.0, -1.0, 5e-324]),
)
weights = st.one_of(
    st.none(),
    st.builds(
        pb.AttributeWeights,
        mode=st.sampled_from([0, 1, 2, 7]),
        values=st.dictionaries(st.sampled_from([*ATTRS, "nope", ""]), values, max_size=3),
    ),
)


def _with_weights(message, w):
    if w is not None:
        message.weights.CopyFrom(w)
    return message


score_requests = st.builds(
    lambda convs, w, rid: _with_weights(pb.ScoreRequest(conversations=[pb.Conversation(messages=m) for m in convs], request_id=rid), w),
    st.lists(messages, max_size=3), weights, text,
)  # fmt: skip
group_requests = st.builds(
    lambda p, r, w: _with_weights(pb.ScoreGroupRequest(prompt=p, responses=r), w), messages, st.lists(text, max_size=3), weights
)
compare_requests = st.builds(
    lambda pairs, w: _with_weights(pb.CompareRequest(pairs=[pb.ComparePair(prompt=p, chosen=c, rejected=r) for p, c, r in pairs]), w),
    st.lists(st.tuples(messages, text, text), max_size=2), weights,
)  # fmt: skip
inspect_requests = st.builds(
    lambda p, w, k: _with_weights(pb.InspectWeightsRequest(prompt=p, top_k=k), w), messages, weights,
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
)  # fmt: skip
REQUESTS = {
    "Score": (score_requests, pb.ScoreResponse),
    "ScoreGroup": (group_requests, pb.ScoreGroupResponse),
    "Compare": (compare_requests, pb.CompareResponse),
    "InspectWeights": (inspect_requests, pb.InspectWeightsResponse),
}


@pytest.fixture(scope="module")
def channel(tiny_llama_dir, tmp_path_factory):
    scorer = load_tiny_scorer(save_tiny_heads(tmp_path_factory.mktemp("fuzz-heads"), tiny_llama_dir))
    running = start_server(scorer, max_message_bytes=4096)
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        yield ch
    running.stop(0)


def numbers(message):
    """Every float and double in a message, recursively (map values included)."""
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            items = list(value.values())
        elif not isinstance(value, (str, bytes, float, int)) and not hasattr(value, "ListFields"):
            items = list(value)  # a repeated field
        else:
            items = [value]
        for item in items:
            if field.type in (field.TYPE_DOUBLE, field.TYPE_FLOAT) or isinstance(item, float):
                yield item
            elif hasattr(item, "ListFields"):
                yield from numbers(item)


def check(call, payload) -> None:
    try:
        reply = call(payload, timeout=60)
    except grpc.RpcError as exc:
        assert exc.code() in ALLOWED, (exc.code(), exc.details())
        return
    bad = [x for x in numbers(reply) if not math.isfinite(x)]
    assert not bad, reply


@pytest.mark.parametrize("method", sorted(REQUESTS))
def test_any_request_is_ok_or_invalid_argument(channel, method):
    strategy, response = REQUESTS[method]
    call = channel.unary_unary(f"/{SERVICE_NAME}/{method}", request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=response.FromString)  # fmt: skip

    @FUZZ
    @given(strategy)
    def run(request):
        check(call, request)

    run()


@pytest.mark.parametrize("method", sorted(REQUESTS))
def test_any_bytes_are_ok_or_invalid_argument(channel, method):
    _strategy, response = REQUESTS[method]
    call = channel.unary_unary(f"/{SERVICE_NAME}/{method}", response_deserializer=response.FromString)

    @FUZZ
    @given(st.one_of(st.binary(max_size=200), st.binary(min_size=4097, max_size=5000)))
    def run(data):
        check(call, data)

    run()


def test_any_stream_message_gets_an_answer_never_internal(channel):
    call = channel.stream_stream(f"/{SERVICE_NAME}/ScoreStream", response_deserializer=pb.ScoreStreamResponse.FromString)

    @FUZZ
    @given(st.lists(st.one_of(score_requests.map(lambda m: m.SerializeToString()), st.binary(max_size=100)), min_size=1, max_size=4))
    def run(payloads):
        replies = list(call(iter(payloads), timeout=60))
        assert len(replies) == len(payloads)
        for reply in replies:
            if reply.HasField("error"):
                assert reply.error.code == "INVALID_ARGUMENT", reply.error
            else:
                assert all(math.isfinite(x) for x in numbers(reply.response)), reply

    run()
