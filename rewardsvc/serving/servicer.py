"""The RPC handlers: protobuf -> plain Python (rewardsvc.wire), the RewardService call, and back; typed errors
-> gRPC status (through `errors.grpc_status_name`).

Nothing here decides anything about scoring: the RewardService does. The conversion functions live in
rewardsvc.wire, shared with the client, so both ends read the wire the same way.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from concurrent.futures import CancelledError
from typing import Any

import grpc

from .._proto.rewardsvc.v1 import reward_pb2 as pb
from .._proto.rewardsvc.v1 import reward_pb2_grpc as pb_grpc
from ..errors import InvalidInputError, OverloadedError, grpc_status_name
from ..wire import (
    FIELD_KEY,
    RETRY_AFTER_KEY,
    compare_to_pb,
    inspect_attributes_to_pb,
    messages_from_pb,
    model_info_to_pb,
    request_normalization_from_pb,
    result_to_pb,
    weights_from_pb,
)
from .service import CallContext, RewardService, check_finite_results

log = logging.getLogger("rewardsvc.server")


def error_to_pb(exc: BaseException, method: str) -> Any:
    """A per-message error inside ScoreStream."""
    name, message = _status_of(exc, method)
    retry_ms = _retry_after_ms(exc) if isinstance(exc, OverloadedError) else 0
    return pb.Error(code=name, message=message, field=getattr(exc, "field", None) or "", retry_after_ms=retry_ms)


# ---- errors --------------------------------------------------------------------------------------------


def _retry_after_ms(exc: OverloadedError) -> int:
    return max(1, math.ceil(exc.retry_after_s * 1000))


def _status_of(exc: BaseException, method: str) -> tuple[str, str]:
    if isinstance(exc, CancelledError):
        return "CANCELLED", "cancelled"
    name = grpc_status_name(exc)
    if name != "INTERNAL":
        return name, str(exc)
    error_id = uuid.uuid4().hex[:12]
    log.error("event=rpc.internal_error method=%s error_id=%s error=%r", method, error_id, exc, exc_info=exc)
    return name, f"internal error (id {error_id}, logged by the server)"


def abort_with(context, exc: BaseException, method: str):
    """Turn a raised error into the call's status (and trailing metadata), then abort the call."""
    name, message = _status_of(exc, method)
    metadata = []
    if isinstance(exc, OverloadedError):
        metadata.append((RETRY_AFTER_KEY, str(_retry_after_ms(exc))))
    if getattr(exc, "field", None):
        metadata.append((FIELD_KEY, str(exc.field)))
    if metadata:
        context.set_trailing_metadata(tuple(metadata))
    context.abort(grpc.StatusCode[name], message)


class UndecodableRequest:
    """Stands in for a request whose bytes do not parse (e.g. a string field with bad UTF-8) or exceed
    max_message_bytes: the handler then answers INVALID_ARGUMENT, counted like any other call, instead of
    gRPC answering INTERNAL before any handler (or metric) sees the call."""

    def __init__(self, error: InvalidInputError):
        self.error = error


def tolerant_deserializer(deserialize, max_message_bytes: int):
    """Wrap a protobuf `FromString`: bytes that do not parse give an UndecodableRequest, never an exception;
    messages over max_message_bytes are refused before parsing."""

    def parse(data: bytes):
        if len(data) > max_message_bytes:
            return UndecodableRequest(
                InvalidInputError(f"request: {len(data)} bytes, over max_message_bytes={max_message_bytes}", field="request")
            )
        try:
            return deserialize(data)
        except Exception as exc:  # google.protobuf.message.DecodeError, or anything a parser may raise
            return UndecodableRequest(
                InvalidInputError(f"request: the message does not decode as protobuf ({exc}); "
                                  "string fields must be valid UTF-8", field="request")  # fmt: skip
            )

    return parse


def check_request(service: RewardService, request) -> None:
    """The checks every request passes before its fields are read: it decoded, and it is within the size."""
    if isinstance(request, UndecodableRequest):
        raise request.error
    service.check_message_bytes(request.ByteSize())


NO_DEADLINE_S = 1e7  # gRPC reports "no deadline" as a time centuries ahead; waits that long overflow


def call_context(context) -> CallContext:
    started, remaining = time.monotonic(), context.time_remaining()
    deadline = None if remaining is None or remaining > NO_DEADLINE_S else started + remaining
    passed = None if deadline is None else (lambda: context.time_remaining() <= 0)
    return CallContext(deadline=deadline, on_cancel=context.add_callback, deadline_passed=passed, started=started)


def _unary(method):
    name = method.__name__

    def wrapper(self, request, context):
        try:
            check_request(self.service, request)
            return method(self, request, context)
        except Exception as exc:  # every error leaves as a status, never as a stack trace on the wire
            abort_with(context, exc, name)

    wrapper.__name__ = name
    wrapper.__doc__ = method.__doc__
    return wrapper


_END = object()


class RewardServicer(pb_grpc.RewardServiceServicer):
    def __init__(self, service: RewardService):
        self.service = service

    def _source(self, weights, model: str) -> dict[str, str]:
        """The response fields saying what answered: the served model's name and model_id, and the weights."""
        return {"model": self.service.model_name(model), "model_id": self.service.model_id_of(model),
                "weights_source": self.service.weights_source(weights, model)}  # fmt: skip

    @_unary
    def Score(self, request, context):
        weights = weights_from_pb(request)
        conversations = [messages_from_pb(c.messages) for c in request.conversations]
        results = self.service.score(conversations, weights, call_context(context), model=request.model,
                                     normalization=request_normalization_from_pb(request))  # fmt: skip
        return pb.ScoreResponse(
            results=[result_to_pb(r) for r in results], request_id=request.request_id, **self._source(weights, request.model)
        )

    @_unary
    def ScoreGroup(self, request, context):
        weights = weights_from_pb(request)
        group = self.service.score_group(
            messages_from_pb(request.prompt), list(request.responses), weights, call_context(context), model=request.model,
            normalization=request_normalization_from_pb(request),
        )
        return pb.ScoreGroupResponse(
            results=[result_to_pb(r) for r in group.results],
            mean=group.mean,
            std=group.std,
            ranks=group.ranks,
            request_id=request.request_id,
            **self._source(weights, request.model),
        )

    @_unary
    def Compare(self, request, context):
        weights = weights_from_pb(request)
        pairs = [(messages_from_pb(p.prompt), p.chosen, p.rejected) for p in request.pairs]
        results = self.service.compare(pairs, weights, call_context(context), model=request.model,
                                       normalization=request_normalization_from_pb(request))  # fmt: skip
        return pb.CompareResponse(
            results=[compare_to_pb(r) for r in results],
            request_id=request.request_id,
            **self._source(weights, request.model),
        )

    @_unary
    def InspectWeights(self, request, context):
        weights = weights_from_pb(request)
        result = self.service.inspect(
            messages_from_pb(request.prompt), weights, request.top_k, call_context(context), model=request.model
        )
        return pb.InspectWeightsResponse(
            attributes=inspect_attributes_to_pb(result),
            num_tokens=result.num_tokens,
            truncated=result.truncated,
            model_id=result.model_id,
            weights_source=result.weights_source,
            model=self.service.model_name(request.model),
        )

    @_unary
    def GetModelInfo(self, request, context):
        return model_info_to_pb(self.service.model_info(request.model))

    def ScoreStream(self, request_iterator, context):
        """Reads requests on a helper thread so several are in flight at once (the batcher can group them);
        answers in completion order. A failing request gets an `error` response; the stream goes on."""
        call = call_context(context)
        # Messages: ("submitted", None) when an item is enqueued, ("done", response) when it completes,
        # ("now", response) for an answer without model work (an error, an empty request), (_END, None).
        out: queue.SimpleQueue = queue.SimpleQueue()
        items: set = set()  # in flight, to cancel if the stream ends early
        lock = threading.Lock()

        def cancel_all() -> None:
            with lock:
                alive = list(items)
            reason = call.cancel_reason()
            for item in alive:  # outside the lock: cancelling runs respond(), which takes it
                item.cancel(reason)

        context.add_callback(cancel_all)

        def respond(request_id: str, weights, model: str, normalization, item) -> None:
            with lock:
                items.discard(item)
            try:
                results = self.service.normalized(check_finite_results(item.future.result()), normalization, model)
            except BaseException as exc:  # CancelledError included: the stream is gone anyway
                out.put(("done", pb.ScoreStreamResponse(request_id=request_id, error=error_to_pb(exc, "ScoreStream"))))
                return
            response = pb.ScoreResponse(
                results=[result_to_pb(r) for r in results], request_id=request_id, **self._source(weights, model)
            )
            out.put(("done", pb.ScoreStreamResponse(request_id=request_id, response=response)))

        def read_one(request) -> None:
            rid = "" if isinstance(request, UndecodableRequest) else request.request_id
            try:
                check_request(self.service, request)
                weights = weights_from_pb(request)
                normalization = self.service.normalization_for(request_normalization_from_pb(request), weights, request.model)
                conversations = [messages_from_pb(c.messages) for c in request.conversations]
                if not conversations:
                    self.service.score([], weights, call, model=request.model)  # readiness and model check only
                    response = pb.ScoreResponse(request_id=rid, **self._source(weights, request.model))
                    out.put(("now", pb.ScoreStreamResponse(request_id=rid, response=response)))
                    return
                item = self.service.submit_score(conversations, weights, call, model=request.model)
            except Exception as exc:
                out.put(("now", pb.ScoreStreamResponse(request_id=rid, error=error_to_pb(exc, "ScoreStream"))))
                return
            with lock:
                items.add(item)
            out.put(("submitted", None))  # queued before its "done", so the count never goes negative
            item.future.add_done_callback(
                lambda _f, rid=rid, w=weights, m=request.model, n=normalization, it=item: respond(rid, w, m, n, it)
            )

        def read_all() -> None:
            try:
                for request in request_iterator:
                    read_one(request)
            except Exception as exc:  # the client broke the stream (cancelled): nothing left to answer
                log.info("event=stream.read_ended error=%r", exc)
            finally:
                out.put((_END, None))

        threading.Thread(target=read_all, name="rewardsvc-stream-reader", daemon=True).start()
        pending, reading = 0, True
        while reading or pending:
            kind, message = out.get()
            if kind is _END:
                reading = False
            elif kind == "submitted":
                pending += 1
            else:
                if kind == "done":
                    pending -= 1
                yield message
