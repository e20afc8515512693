"""Python client of the reward service: sync (`RewardClient`) and asyncio (`AsyncRewardClient`).

    with RewardClient("localhost:50051", token="...") as client:
        client.score([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]])
        reward_func = client.trl_reward_func()  # for TRL (more: rewardsvc.integrations)

- Typed results (ScoreResult, InspectResult, GroupResult, CompareResult from rewardsvc.types) and typed
  errors (InvalidInputError, OverloadedError, NotReadyError, DeadlineExceededError, UnauthenticatedError,
  else RemoteError), each with `.code` set to the gRPC status name.
- Retries with exponential backoff and jitter on UNAVAILABLE, and on RESOURCE_EXHAUSTED when the server
  sent a `retry-after-ms` hint (admission control; the hint is a lower bound of the wait). Scoring is
  idempotent, so retrying is safe. `timeout` is the deadline of the whole call, retries included.
- `dns:///host:port` targets resolve to every address and spread calls with round-robin load balancing.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ._proto.rewardsvc.v1 import reward_pb2 as pb
from ._proto.rewardsvc.v1 import reward_pb2_grpc as pb_grpc
from .errors import (
    DeadlineExceededError,
    InvalidInputError,
    NotReadyError,
    OverloadedError,
    RewardError,
    UnauthenticatedError,
)
from .normalization import Normalization
from .types import AttributeWeights, CompareResult, GroupResult, InspectResult, ScoreResult
from .wire import (
    FIELD_KEY,
    RETRY_AFTER_KEY,
    SERVICE_NAME,
    compare_from_pb,
    compare_request,
    group_from_pb,
    group_request,
    inspect_from_pb,
    inspect_request,
    model_info_from_pb,
    result_from_pb,
    score_request,
)

__all__ = [
    "AsyncRewardClient",
    "ClientTLS",
    "CompareResult",
    "GroupResult",
    "InspectResult",
    "Normalization",
    "RemoteError",
    "RetryPolicy",
    "RewardClient",
    "ScoreResult",
    "StreamResult",
]


class RemoteError(RewardError):
    """A gRPC error without a more specific type (INTERNAL, CANCELLED, FAILED_PRECONDITION, ...)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    """Attempts in all (1 = no retry)."""
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def backoff(self, attempt: int) -> float:
        """Delay before retry number `attempt` (0-based): exponential, with jitter in [50 %, 100 %]."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**attempt)
        return base * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class ClientTLS:
    """TLS settings; PEM bytes or paths. Without root_certificates the system roots are used."""

    root_certificates: bytes | str | None = None
    certificate_chain: bytes | str | None = None  # client certificate, for mutual TLS
    private_key: bytes | str | None = None
    server_name: str | None = None  # override the name checked against the server certificate

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.root_certificates),
            private_key=_pem(self.private_key),
            certificate_chain=_pem(self.certificate_chain),
        )


@dataclass(frozen=True)
class StreamResult:
    """One answer of score_stream: results, or the error of that request."""

    request_id: str
    results: list[ScoreResult] | None
    error: RewardError | None


def _pem(value: bytes | str | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


# ---- errors and retries ------------------------------------------------------------------------------


def _metadata_value(err: grpc.RpcError, key: str) -> str | None:
    try:
        metadata = err.trailing_metadata() or ()
    except Exception:  # some RpcErrors (e.g. channel closed) carry none
        return None
    for k, v in metadata:
        if k == key:
            return v.decode() if isinstance(v, bytes) else v
    return None


def _retry_after_s(err: grpc.RpcError) -> float | None:
    value = _metadata_value(err, RETRY_AFTER_KEY)
    try:
        return None if value is None else int(value) / 1000.0
    except ValueError:
        return None


def typed_error(err: grpc.RpcError) -> RewardError:
    code = err.code()
    name = code.name if code is not None else "UNKNOWN"
    details = err.details() or name
    if name == "INVALID_ARGUMENT":
        exc: RewardError = InvalidInputError(details, field=_metadata_value(err, FIELD_KEY))
    elif name == "RESOURCE_EXHAUSTED":
        exc = OverloadedError(details, retry_after_s=_retry_after_s(err) or 0.0)
    elif name == "UNAVAILABLE":
        exc = NotReadyError(details)
    elif name == "DEADLINE_EXCEEDED":
        exc = DeadlineExceededError(details)
    elif name == "UNAUTHENTICATED":
        exc = UnauthenticatedError(details)
    else:
        exc = RemoteError(details, name)
    exc.code = name
    return exc


def retry_delay(err: grpc.RpcError, attempt: int, policy: RetryPolicy) -> float | None:
    """Seconds to wait before retrying after `err`, or None if it is not worth retrying."""
    if attempt + 1 >= policy.max_attempts:
        return None
    code = err.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return policy.backoff(attempt)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        hint = _retry_after_s(err)
        # Without our hint it is gRPC's own refusal (e.g. message too large): a retry would fail the same way.
        return None if hint is None else max(hint * random.uniform(1.0, 1.2), policy.backoff(attempt))
    return None


def channel_options(extra: Sequence[tuple[str, Any]] = (), server_name: str | None = None) -> list[tuple[str, Any]]:
    options = [
        ("grpc.lb_policy_name", "round_robin"),  # spread calls over every address a dns:/// target resolves to
        ("grpc.max_receive_message_length", -1),  # the server enforces the limits and says which one
        ("grpc.max_send_message_length", -1),
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options + list(extra)


class _Base:
    def __init__(self, target: str, *, token: str | None, tls: bool | ClientTLS, timeout: float,
                 retry: RetryPolicy, options: Sequence[tuple[str, Any]], model: str = ""):  # fmt: skip
        self.target = target
        # Which served model every request asks for (`serve --model NAME=PATH`); "" = the server's default.
        self.model = model
        self.timeout = timeout
        self.retry = retry
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._tls = ClientTLS() if tls is True else (tls or None)
        self._options = channel_options(options, self._tls.server_name if self._tls else None)

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    def _for_model(self, request):
        """The request with this client's `model` set (every request message has the field)."""
        if self.model and not request.model:
            request.model = self.model
        return request


# ---- sync client ---------------------------------------------------------------------------------------


class RewardClient(_Base):
    """Blocking client. Thread-safe (one channel, many calls)."""

    def __init__(self, target: str, *, token: str | None = None, tls: bool | ClientTLS = False, timeout: float = 60.0,
                 retry: RetryPolicy = RetryPolicy(), options: Sequence[tuple[str, Any]] = (), model: str = ""):  # fmt: skip
        super().__init__(target, token=token, tls=tls, timeout=timeout, retry=retry, options=options, model=model)
        if self._tls:
            self.channel = grpc.secure_channel(target, self._tls.credentials(), options=self._options)
        else:
            self.channel = grpc.insecure_channel(target, options=self._options)
        self.stub = pb_grpc.RewardServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, rpc, request, timeout: float | None):
        request = self._for_model(request)
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            try:
                return rpc(request, timeout=max(0.0, deadline - time.monotonic()), metadata=self._metadata)
            except grpc.RpcError as err:
                delay = retry_delay(err, attempt, self.retry)
                if delay is None or time.monotonic() + delay >= deadline:
                    raise typed_error(err) from err
                time.sleep(delay)
                attempt += 1

    def score(self, conversations: Sequence[Any], weights: AttributeWeights | dict | None = None, *,
              timeout: float | None = None, request_id: str = "",
              normalization: Normalization | bool | None = None) -> list[ScoreResult]:  # fmt: skip
        """Conversations (message lists ending with the assistant response) -> one result each, in order.
        normalization: True / a Normalization (z-scores in each result's `normalized`, raw values kept), False
        (raw only), None (the server's default)."""
        response = self._call(self.stub.Score, score_request(conversations, weights, request_id, normalization), timeout)
        return [result_from_pb(r) for r in response.results]

    def score_group(self, prompt: Any, responses: Sequence[Any], weights: AttributeWeights | dict | None = None, *,
                    timeout: float | None = None, normalization: Normalization | bool | None = None) -> GroupResult:  # fmt: skip
        """One prompt (messages or a string) and N responses -> scores, mean, std, ranks."""
        return group_from_pb(self._call(self.stub.ScoreGroup, group_request(prompt, responses, weights, normalization=normalization), timeout))

    def compare(self, pairs: Iterable[Any], weights: AttributeWeights | dict | None = None, *,
                timeout: float | None = None, normalization: Normalization | bool | None = None) -> list[CompareResult]:  # fmt: skip
        """(prompt, chosen, rejected) tuples or dicts -> P(chosen preferred) and both scores."""
        response = self._call(self.stub.Compare, compare_request(pairs, weights, normalization=normalization), timeout)
        return [compare_from_pb(r) for r in response.results]

    def inspect(self, prompt: Any, weights: AttributeWeights | dict | None = None, top_k: int = 0, *,
                timeout: float | None = None) -> InspectResult:  # fmt: skip
        """Gating weights for a prompt; the dicts are ordered by weight, descending."""
        return inspect_from_pb(self._call(self.stub.InspectWeights, inspect_request(prompt, weights, top_k), timeout))

    def model_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        return model_info_from_pb(self._call(self.stub.GetModelInfo, pb.GetModelInfoRequest(), timeout))

    def health(self, service: str = SERVICE_NAME, *, timeout: float = 5.0) -> str:
        """SERVING, NOT_SERVING, ... (no retry: a health probe must answer now)."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            raise typed_error(err) from err
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def score_stream(self, requests: Iterable[tuple], *, timeout: float | None = None) -> Iterator[StreamResult]:
        """requests: (request_id, conversations) or (request_id, conversations, weights) tuples. Yields a
        StreamResult per request, in completion order. `timeout` bounds the whole stream (default: the
        client's timeout; pass a larger one for a long-lived stream). Not retried: a broken stream raises."""

        def messages():
            for item in requests:
                request_id, conversations, *rest = item
                yield self._for_model(score_request(conversations, rest[0] if rest else None, str(request_id)))

        try:
            for reply in self.stub.ScoreStream(messages(), timeout=timeout or self.timeout, metadata=self._metadata):
                yield _stream_result(reply)
        except grpc.RpcError as err:
            raise typed_error(err) from err

    # ---- TRL (rewardsvc.integrations.trl) ----------------------------------------------------------

    def trl_reward_funcs(self, attributes: Sequence[str | None], weights: AttributeWeights | dict | None = None, *,
                         max_conversations_per_call: int = 256, log_gating: bool = False) -> list[Callable[..., list[float]]]:  # fmt: skip
        """One TRL reward function per attribute (None = the overall score), sharing one RPC per batch; see
        rewardsvc.integrations.trl.reward_funcs. (trl_functions imports no client: no import cycle.)"""
        from .integrations.trl_functions import shared_reward_funcs

        return shared_reward_funcs(self, attributes, weights, log_gating=log_gating, max_conversations_per_call=max_conversations_per_call)

    def trl_reward_func(self, attribute: str | None = None, weights: AttributeWeights | dict | None = None, *,
                        max_conversations_per_call: int = 256) -> Callable[..., list[float]]:  # fmt: skip
        """`reward_func(prompts, completions, **kwargs) -> list[float]` for TRL's GRPOTrainer / RLOOTrainer."""
        return self.trl_reward_funcs([attribute], weights, max_conversations_per_call=max_conversations_per_call)[0]


def _stream_result(reply) -> StreamResult:
    if reply.HasField("error"):
        e = reply.error
        fake = _ErrorView(e.code, e.message, e.field, e.retry_after_ms)
        return StreamResult(reply.request_id, None, typed_error(fake))
    return StreamResult(reply.request_id, [result_from_pb(r) for r in reply.response.results], None)


class _ErrorView(grpc.RpcError):
    """A stream's per-request Error read through the same path as a call's status."""

    def __init__(self, code: str, message: str, field: str, retry_after_ms: int):
        self._code = grpc.StatusCode[code] if code in grpc.StatusCode.__members__ else grpc.StatusCode.UNKNOWN
        self._message = message
        self._metadata = tuple(
            (k, v) for k, v in ((FIELD_KEY, field), (RETRY_AFTER_KEY, str(retry_after_ms) if retry_after_ms else "")) if v
        )

    def code(self):
        return self._code

    def details(self):
        return self._message

    def trailing_metadata(self):
        return self._metadata


# ---- asyncio client ------------------------------------------------------------------------------------


class AsyncRewardClient(_Base):
    """grpc.aio client with the same methods as RewardClient, as coroutines. Create it inside a running loop."""

    def __init__(self, target: str, *, token: str | None = None, tls: bool | ClientTLS = False, timeout: float = 60.0,
                 retry: RetryPolicy = RetryPolicy(), options: Sequence[tuple[str, Any]] = (), model: str = ""):  # fmt: skip
        super().__init__(target, token=token, tls=tls, timeout=timeout, retry=retry, options=options, model=model)
        if self._tls:
            self.channel = grpc.aio.secure_channel(target, self._tls.credentials(), options=self._options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=self._options)
        self.stub = pb_grpc.RewardServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self) -> "AsyncRewardClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, rpc, request, timeout: float | None):
        request = self._for_model(request)
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            try:
                return await rpc(request, timeout=max(0.0, deadline - time.monotonic()), metadata=self._metadata)
            except grpc.aio.AioRpcError as err:
                delay = retry_delay(err, attempt, self.retry)
                if delay is None or time.monotonic() + delay >= deadline:
                    raise typed_error(err) from err
                await asyncio.sleep(delay)
                attempt += 1

    async def score(self, conversations: Sequence[Any], weights: AttributeWeights | dict | None = None, *,
                    timeout: float | None = None, request_id: str = "",
                    normalization: Normalization | bool | None = None) -> list[ScoreResult]:  # fmt: skip
        response = await self._call(self.stub.Score, score_request(conversations, weights, request_id, normalization), timeout)
        return [result_from_pb(r) for r in response.results]

    async def score_group(self, prompt: Any, responses: Sequence[Any], weights: AttributeWeights | dict | None = None,
                          *, timeout: float | None = None, normalization: Normalization | bool | None = None) -> GroupResult:  # fmt: skip
        return group_from_pb(await self._call(self.stub.ScoreGroup, group_request(prompt, responses, weights, normalization=normalization), timeout))

    async def compare(self, pairs: Iterable[Any], weights: AttributeWeights | dict | None = None, *,
                      timeout: float | None = None, normalization: Normalization | bool | None = None) -> list[CompareResult]:  # fmt: skip
        response = await self._call(self.stub.Compare, compare_request(pairs, weights, normalization=normalization), timeout)
        return [compare_from_pb(r) for r in response.results]

    async def inspect(self, prompt: Any, weights: AttributeWeights | dict | None = None, top_k: int = 0, *,
                      timeout: float | None = None) -> InspectResult:  # fmt: skip
        return inspect_from_pb(await self._call(self.stub.InspectWeights, inspect_request(prompt, weights, top_k), timeout))

    async def model_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        return model_info_from_pb(await self._call(self.stub.GetModelInfo, pb.GetModelInfoRequest(), timeout))

    async def health(self, service: str = SERVICE_NAME, *, timeout: float = 5.0) -> str:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise typed_error(err) from err
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
