"""The client's decisions that need no server: retries, typed errors, request building."""

from __future__ import annotations

import grpc
import pytest

from rewardsvc.client import RemoteError, RetryPolicy, retry_delay, typed_error
from rewardsvc.integrations.trl import trl_conversation
from rewardsvc.wire import compare_request, group_request
from rewardsvc.errors import InvalidInputError, NotReadyError, OverloadedError
from rewardsvc.wire import FIELD_KEY, RETRY_AFTER_KEY


class Err(grpc.RpcError):
    def __init__(self, code, metadata=(), details=""):
        self._code, self._metadata, self._details = code, metadata, details

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._metadata


def test_retry_policy_decisions():
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.1)
    assert retry_delay(Err(grpc.StatusCode.INVALID_ARGUMENT), 0, policy) is None
    assert 0.05 <= retry_delay(Err(grpc.StatusCode.UNAVAILABLE), 0, policy) <= 0.1
    assert retry_delay(Err(grpc.StatusCode.UNAVAILABLE), 2, policy) is None  # attempts used up
    assert retry_delay(Err(grpc.StatusCode.RESOURCE_EXHAUSTED), 0, policy) is None  # gRPC's own, no hint
    hinted = Err(grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after-ms", "700"),))
    assert retry_delay(hinted, 0, policy) >= 0.7


def test_typed_errors_from_status_and_trailers():
    invalid = typed_error(Err(grpc.StatusCode.INVALID_ARGUMENT, ((FIELD_KEY, "conversations[2]"),), "bad"))
    assert isinstance(invalid, InvalidInputError) and invalid.field == "conversations[2]" and invalid.code == "INVALID_ARGUMENT"
    overloaded = typed_error(Err(grpc.StatusCode.RESOURCE_EXHAUSTED, ((RETRY_AFTER_KEY, "250"),)))
    assert isinstance(overloaded, OverloadedError) and overloaded.retry_after_s == 0.25
    assert isinstance(typed_error(Err(grpc.StatusCode.UNAVAILABLE)), NotReadyError)
    other = typed_error(Err(grpc.StatusCode.INTERNAL, details="internal error (id 1)"))
    assert isinstance(other, RemoteError) and other.code == "INTERNAL" and str(other) == "internal error (id 1)"


def test_requests_take_strings_messages_and_dicts():
    group = group_request("Name a colour.", ["Red.", {"role": "assistant", "content": "Seven."}])
    assert [m.role for m in group.prompt] == ["user"] and list(group.responses) == ["Red.", "Seven."]
    with pytest.raises(InvalidInputError, match=r"responses\[0\] must be an assistant message"):
        group_request("Q", [{"role": "user", "content": "x"}])
    pairs = compare_request([{"prompt": "Q", "chosen": "a", "rejected": "b"}, ("Q", "c", "d")], {"mode": "mask", "values": {}})
    assert [(p.chosen, p.rejected) for p in pairs.pairs] == [("a", "b"), ("c", "d")] and pairs.HasField("weights")
    assert trl_conversation("Q", "A") == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
