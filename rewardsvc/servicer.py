"""protobuf <-> dataclasses, and typed errors -> gRPC status (through `errors.grpc_status_name`).

Nothing here decides anything about scoring: the RewardService does. The conversion functions are shared
with the client (rewardsvc.client), so both ends read the wire the same way.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
import uuid
from concurrent.futures import CancelledError
from typing import Any

import grpc
from google.protobuf import struct_pb2

from ._proto.rewardsvc.v1 import reward_pb2 as pb
from ._proto.rewardsvc.v1 import reward_pb2_grpc as pb_grpc
from .errors import InvalidInputError, OverloadedError, grpc_status_name
from .scorer import InspectResult, ScoreResult
from .service import Call, CompareResult, GroupResult, RewardService, check_finite_results
from .steering import AttributeWeights, weights_source

log = logging.getLogger("rewardsvc.server")

RETRY_AFTER_KEY = "retry-after-ms"
FIELD_KEY = "rewardsvc-field"

_MODE_TO_PB = {"override": pb.AttributeWeights.OVERRIDE, "mask": pb.AttributeWeights.MASK}
_MODE_FROM_PB = {v: k for k, v in _MODE_TO_PB.items()}

# ---- protobuf -> dataclasses / plain Python -----------------------------------------------------------


def messages_from_pb(messages) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def weights_from_pb(request) -> AttributeWeights | None:
    if not request.HasField("weights"):
        return None
    w = request.weights
    if w.mode == pb.AttributeWeights.MODE_UNSPECIFIED:
        if w.values:
            raise InvalidInputError("weights.mode must be OVERRIDE or MASK when weights.values are given", "weights.mode")
        return None
    if w.mode not in _MODE_FROM_PB:
        raise InvalidInputError(f"weights.mode: unknown mode {w.mode}", field="weights.mode")
    return AttributeWeights(mode=_MODE_FROM_PB[w.mode], values=dict(w.values))


def result_from_pb(r) -> ScoreResult:
    return ScoreResult(
        score=r.score,
        rewards=dict(r.rewards),
        gating=dict(r.gating),
        coefficients=dict(r.coefficients),
        num_tokens=r.num_tokens,
        truncated=r.truncated,
        weights_source=r.weights_source,
        model_id=r.model_id,
    )


def group_from_pb(response) -> GroupResult:
    return GroupResult(
        results=[result_from_pb(r) for r in response.results],
        mean=response.mean,
        std=response.std,
        ranks=list(response.ranks),
    )


def compare_from_pb(r) -> CompareResult:
    return CompareResult(
        p_chosen=r.p_chosen,
        score_chosen=r.score_chosen,
        score_rejected=r.score_rejected,
        chosen=result_from_pb(r.chosen),
        rejected=result_from_pb(r.rejected),
    )


def inspect_from_pb(response) -> InspectResult:
    return InspectResult(
        gating={a.attribute: a.weight for a in response.attributes},
        coefficients={a.attribute: a.coefficient for a in response.attributes},
        num_tokens=response.num_tokens,
        truncated=response.truncated,
        weights_source=response.weights_source,
        model_id=response.model_id,
    )


def struct_to_python(s) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(s)


def model_info_from_pb(info) -> dict[str, Any]:
    return {
        "model_id": info.model_id,
        "attributes": list(info.attributes),
        "backbone": info.backbone,
        "dtype": info.dtype,
        "device": info.device,
        "max_tokens": info.max_tokens,
        "truncation": info.truncation,
        "trained": info.trained,
        "provenance": struct_to_python(info.provenance),
        "metrics": struct_to_python(info.metrics),
        "label_scales": struct_to_python(info.label_scales),
        "server_version": info.server_version,
        "limits": {
            "max_message_bytes": info.limits.max_message_bytes,
            "max_conversations_per_request": info.limits.max_conversations_per_request,
            "max_tokens_per_conversation": info.limits.max_tokens_per_conversation,
            "max_group_size": info.limits.max_group_size,
            "max_tokens_in_flight": info.limits.max_tokens_in_flight,
        },
    }


# ---- dataclasses / plain Python -> protobuf -----------------------------------------------------------


def messages_to_pb(messages) -> list:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return [pb.Message(role=m["role"], content=m["content"]) for m in messages]


def weights_to_pb(weights: AttributeWeights | None):
    if weights is None:
        return None
    return pb.AttributeWeights(mode=_MODE_TO_PB[weights.mode], values=dict(weights.values))


def result_to_pb(r: ScoreResult):
    return pb.ScoreResult(
        score=r.score,
        rewards=r.rewards,
        gating=r.gating,
        coefficients=r.coefficients,
        num_tokens=r.num_tokens,
        truncated=r.truncated,
        model_id=r.model_id,
        weights_source=r.weights_source,
    )


def _struct(value: Any):
    s = struct_pb2.Struct()
    if isinstance(value, dict) and value:
        # Round-trip through JSON: Struct holds only JSON types (paths, tuples, numpy scalars become JSON).
        s.update(json.loads(json.dumps(value, default=str)))
    return s


def model_info_to_pb(info: dict[str, Any]):
    limits = info.get("limits", {})
    return pb.ModelInfo(
        model_id=info["model_id"],
        attributes=info["attributes"],
        backbone=info["backbone"],
        dtype=info["dtype"],
        device=info["device"],
        max_tokens=info["max_tokens"],
        truncation=info.get("truncation", ""),
        trained=info["trained"],
        provenance=_struct(info.get("provenance")),
        metrics=_struct(info.get("metrics")),
        label_scales=_struct(info.get("label_scales")),
        server_version=info.get("server_version", ""),
        limits=pb.ServerLimits(**limits),
    )


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


def call_of(context) -> Call:
    started, remaining = time.monotonic(), context.time_remaining()
    deadline = None if remaining is None or remaining > NO_DEADLINE_S else started + remaining
    passed = None if deadline is None else (lambda: context.time_remaining() <= 0)
    return Call(deadline=deadline, on_cancel=context.add_callback, deadline_passed=passed, started=started)


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

    def _source(self, weights) -> dict[str, str]:
        return {"model_id": self.service.model_id, "weights_source": weights_source(weights)}

    @_unary
    def Score(self, request, context):
        weights = weights_from_pb(request)
        conversations = [messages_from_pb(c.messages) for c in request.conversations]
        results = self.service.score(conversations, weights, call_of(context))
        return pb.ScoreResponse(
            results=[result_to_pb(r) for r in results], request_id=request.request_id, **self._source(weights)
        )

    @_unary
    def ScoreGroup(self, request, context):
        weights = weights_from_pb(request)
        group = self.service.score_group(messages_from_pb(request.prompt), list(request.responses), weights, call_of(context))
        return pb.ScoreGroupResponse(
            results=[result_to_pb(r) for r in group.results],
            mean=group.mean,
            std=group.std,
            ranks=group.ranks,
            request_id=request.request_id,
            **self._source(weights),
        )

    @_unary
    def Compare(self, request, context):
        weights = weights_from_pb(request)
        pairs = [(messages_from_pb(p.prompt), p.chosen, p.rejected) for p in request.pairs]
        results = self.service.compare(pairs, weights, call_of(context))
        return pb.CompareResponse(
            results=[
                pb.CompareResult(
                    p_chosen=r.p_chosen,
                    score_chosen=r.score_chosen,
                    score_rejected=r.score_rejected,
                    chosen=result_to_pb(r.chosen),
                    rejected=result_to_pb(r.rejected),
                )
                for r in results
            ],
            request_id=request.request_id,
            **self._source(weights),
        )

    @_unary
    def InspectWeights(self, request, context):
        weights = weights_from_pb(request)
        result = self.service.inspect(messages_from_pb(request.prompt), weights, request.top_k, call_of(context))
        return pb.InspectWeightsResponse(
            attributes=[
                pb.AttributeWeight(attribute=a, weight=w, coefficient=result.coefficients[a])
                for a, w in result.gating.items()
            ],
            num_tokens=result.num_tokens,
            truncated=result.truncated,
            model_id=result.model_id,
            weights_source=result.weights_source,
        )

    @_unary
    def GetModelInfo(self, request, context):
        return model_info_to_pb(self.service.model_info())

    def ScoreStream(self, request_iterator, context):
        """Reads requests on a helper thread so several are in flight at once (the batcher can group them);
        answers in completion order. A failing request gets an `error` response; the stream goes on."""
        call = call_of(context)
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

        def respond(request_id: str, weights, item) -> None:
            with lock:
                items.discard(item)
            try:
                results = check_finite_results(item.future.result())
            except BaseException as exc:  # CancelledError included: the stream is gone anyway
                out.put(("done", pb.ScoreStreamResponse(request_id=request_id, error=error_to_pb(exc, "ScoreStream"))))
                return
            response = pb.ScoreResponse(
                results=[result_to_pb(r) for r in results], request_id=request_id, **self._source(weights)
            )
            out.put(("done", pb.ScoreStreamResponse(request_id=request_id, response=response)))

        def read_one(request) -> None:
            rid = "" if isinstance(request, UndecodableRequest) else request.request_id
            try:
                check_request(self.service, request)
                weights = weights_from_pb(request)
                conversations = [messages_from_pb(c.messages) for c in request.conversations]
                if not conversations:
                    self.service.score([], weights, call)  # readiness check only
                    response = pb.ScoreResponse(request_id=rid, **self._source(weights))
                    out.put(("now", pb.ScoreStreamResponse(request_id=rid, response=response)))
                    return
                item = self.service.submit_score(conversations, weights, call)
            except Exception as exc:
                out.put(("now", pb.ScoreStreamResponse(request_id=rid, error=error_to_pb(exc, "ScoreStream"))))
                return
            with lock:
                items.add(item)
            out.put(("submitted", None))  # queued before its "done", so the count never goes negative
            item.future.add_done_callback(lambda _f, rid=rid, w=weights, it=item: respond(rid, w, it))

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
