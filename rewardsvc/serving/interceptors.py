"""Server interceptors: metrics, a log line and the count of calls in progress (ObservingInterceptor), and
bearer-token auth (BearerAuthInterceptor). Only RewardService methods are observed; health and reflection stay
open when auth is on."""

from __future__ import annotations

import hmac
import logging
import threading
import time

import grpc

from .. import tracing
from ..config import Limits
from ..wire import SERVICE_NAME
from .logs import log_line
from .metrics import ServiceMetrics
from .service import DEADLINE_SLACK_S
from .servicer import NO_DEADLINE_S, tolerant_deserializer

log = logging.getLogger("rewardsvc.server")

METHOD_PREFIX = f"/{SERVICE_NAME}/"
# Health and reflection stay open when auth is on: load balancers and grpcurl probe without credentials.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _rebuild(handler, wrap_unary_response, wrap_stream_response, wrap_deserializer=None, wrap_serializer=None,
             take_unary_request=None):  # fmt: skip
    """The same handler kind, with its behaviour (and optionally its request deserializer and response
    serializer) wrapped. With take_unary_request, a unary method becomes stream-request: its wrapped behaviour
    takes the one request itself (wrap_unary_response(behaviour, take_unary_request))."""
    deserializer = handler.request_deserializer
    if wrap_deserializer is not None and deserializer is not None:
        deserializer = wrap_deserializer(deserializer)
    if wrap_serializer is not None and handler.response_serializer is not None:
        handler = handler._replace(response_serializer=wrap_serializer(handler.response_serializer))
    if handler.unary_unary and take_unary_request is not None:
        return grpc.stream_unary_rpc_method_handler(
            wrap_unary_response(handler.unary_unary, take_unary_request), deserializer, handler.response_serializer
        )
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap_unary_response(handler.unary_unary), deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap_stream_response(handler.unary_stream), deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap_unary_response(handler.stream_unary), deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        wrap_stream_response(handler.stream_stream), deserializer, handler.response_serializer
    )


class ActiveCalls:
    """Counts RewardService calls in progress, so shutdown knows when in-flight work is done; once closed,
    refuses new ones (checked and counted under one lock, so no call slips between). A call counts until
    gRPC has written its reply (status sent, call closed), not merely until its handler returned."""

    def __init__(self) -> None:
        self._count = 0
        self._closed = False
        self.cancelling = False  # set when shutdown cancels what outlived the grace (clients see UNAVAILABLE)
        self._idle = threading.Condition()

    def try_enter(self) -> bool:
        with self._idle:
            if self._closed:
                return False
            self._count += 1
            return True

    def close(self) -> None:
        with self._idle:
            self._closed = True

    def exit(self) -> None:
        with self._idle:
            self._count -= 1
            if self._count == 0:
                self._idle.notify_all()

    @property
    def count(self) -> int:
        return self._count

    @property
    def closed(self) -> bool:
        return self._closed

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout)


def _code_name(context) -> str | None:
    code = context.code()
    return None if code is None else code.name


def _client_gone(context) -> bool:
    """Whether the call ended without the client receiving our status (it cancelled, its deadline passed, or
    the server cancelled the call). grpc's sync server keeps this in private state once the call is over;
    while the call runs, is_active() says the same."""
    state = getattr(context, "_state", None)
    client = getattr(state, "client", None)
    if isinstance(client, str):
        return client == "cancelled"
    return False


_reply_trace = threading.local()  # the handler thread's receive span, until its reply is serialized


class ObservingInterceptor(grpc.ServerInterceptor):
    """Metrics (requests by method and code, latency, in progress), a log line per call, and the count of
    calls in progress. Only RewardService methods: health's Watch must keep its non-blocking handler.

    Requests are decoded by a tolerant deserializer (servicer.tolerant_deserializer): bytes that do not parse
    reach the handler, which answers INVALID_ARGUMENT and is counted. A call is counted, and leaves the
    in-flight count, when gRPC has finished it (context callback), with the code the client saw: a call
    whose client went away is CANCELLED (DEADLINE_EXCEEDED past its deadline; UNAVAILABLE when shutdown
    cancelled it), whatever the handler returned.

    Unary-request methods are served as stream-request ones that take their one request themselves. grpc's
    sync server receives a unary request before any Python code runs, so a message over the transport's
    receive limit (2 x max_message_bytes; gRPC core answers RESOURCE_EXHAUSTED) would end the call unseen.
    Taken here, the refused receive happens inside the observed call, which is then counted and logged as
    RESOURCE_EXHAUSTED. The server cannot tell that refusal from a client that cancels while its request is
    still arriving (both end the receive the same way); a unary client sends its request with the call's
    headers, so the second is rare. ScoreStream's messages arrive while the stream runs, where a client's
    cancel is common: an oversize message there counts as CANCELLED."""

    def __init__(self, metrics: ServiceMetrics, active: ActiveCalls, max_message_bytes: int = Limits.max_message_bytes):
        self.metrics = metrics
        self.active = active
        self.max_message_bytes = max_message_bytes

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        full = handler_call_details.method
        if handler is None or not full.startswith(METHOD_PREFIX):
            return handler
        method = full[len(METHOD_PREFIX) :]
        metrics, active = self.metrics, self.active

        def begin(context):
            if not active.try_enter():
                # Draining: an explicit UNAVAILABLE (retryable: go to another replica), while health says
                # NOT_SERVING. gRPC's own refusal during its shutdown would be CANCELLED, which is not.
                metrics.observe_rpc(method, "UNAVAILABLE", 0.0)
                context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")
            metrics.in_progress.labels(method).inc()
            # The receive span covers the call until its reply is serialized (or the call ends); the caller's
            # trace continues through the W3C traceparent metadata.
            trace = tracing.start(tracing.RECEIVE, tracing.extract(dict(context.invocation_metadata() or ())), rpc_method=method)
            _reply_trace.handle = trace
            return time.monotonic(), context.time_remaining(), trace

        def end(context, begun: tuple[float, float, object], code: str | None, request_refused: bool = False) -> None:
            """The handler returned or raised; the reply may not be written yet. request_refused: the call's one
            request never arrived (the transport refused it as too large)."""
            code = code or _code_name(context) or "OK"
            started, budget, trace = begun
            gone_already = not context.is_active()  # the client left while the handler ran
            finished = threading.Lock()

            def on_finished() -> None:  # gRPC has sent the status (or the call was cancelled)
                if not finished.acquire(blocking=False):
                    return  # once only
                final = code
                if gone_already or _client_gone(context):
                    if active.cancelling:
                        final = "UNAVAILABLE"
                    elif budget < NO_DEADLINE_S and context.time_remaining() <= max(DEADLINE_SLACK_S, 0.25 * budget):
                        # A client's deadline reaches us as a cancel a little before our copy of it.
                        final = "DEADLINE_EXCEEDED"
                    elif request_refused:
                        final = "RESOURCE_EXHAUSTED"  # what gRPC core told the client
                    else:
                        final = "CANCELLED"
                seconds = time.monotonic() - started
                tracing.end(trace)
                # Counted before the in-progress gauge drops: "nothing in progress" then means "every call counted".
                metrics.observe_rpc(method, final, seconds)
                metrics.in_progress.labels(method).dec()
                active.exit()
                level = logging.DEBUG if final == "OK" else logging.INFO
                if log.isEnabledFor(level):
                    why = {"reason": "request over the transport's receive limit"} if final == "RESOURCE_EXHAUSTED" and request_refused else {}
                    log.log(level, log_line("rpc", method=method, code=final, ms=f"{seconds * 1000:.1f}", peer=context.peer(), **why))

            if not context.add_callback(on_finished):  # the call is already over
                on_finished()

        def one_request(requests, context):
            """The one request of a unary method served as stream-request (see the class docstring)."""
            try:
                return next(requests)
            except StopIteration:  # what grpc answers a unary call without a message
                context.abort(grpc.StatusCode.UNIMPLEMENTED, f'"{full}" requires exactly one request message.')

        def wrap_unary(behavior, take_request=None):
            """take_request: for a unary method served as stream-request, how the call takes its request."""

            def wrapped(request, context):
                started, code, refused = begin(context), None, False
                try:
                    with tracing.activate(started[2]):
                        if take_request is not None:
                            try:
                                request = take_request(request, context)
                            except BaseException:  # no request: refused by the transport, the client left or sent none
                                # Which one is known when the call ends (on_finished): a client still there gets
                                # our UNIMPLEMENTED; a call gRPC already ended had its message refused. (gRPC may
                                # report the refused receive as the end of the messages or as the cancel.)
                                refused = True
                                raise
                        return behavior(request, context)
                except BaseException:
                    code = _code_name(context) or "UNKNOWN"
                    raise
                finally:
                    end(context, started, code, refused)

            return wrapped

        def wrap_stream(behavior):
            def wrapped(request, context):
                started, code = begin(context), None
                _reply_trace.handle = None  # a stream's messages are not one reply
                try:
                    yield from behavior(request, context)
                except GeneratorExit:
                    code = "CANCELLED"
                    raise
                except BaseException:
                    code = _code_name(context) or "UNKNOWN"
                    raise
                finally:
                    end(context, started, code)

            return wrapped

        def wrap_deserializer(deserialize):
            return tolerant_deserializer(deserialize, self.max_message_bytes)

        def wrap_serializer(serialize):
            if not tracing.enabled():
                return serialize

            def traced(response):
                # gRPC serializes a unary reply on the handler's thread right after the handler returns.
                handle, _reply_trace.handle = getattr(_reply_trace, "handle", None), None
                if handle is None:
                    return serialize(response)
                try:
                    with tracing.activate(handle), tracing.span(tracing.REPLY):
                        return serialize(response)
                finally:
                    tracing.end(handle)

            return traced

        return _rebuild(handler, wrap_unary, wrap_stream, wrap_deserializer, wrap_serializer, take_unary_request=one_request)


class BearerAuthInterceptor(grpc.ServerInterceptor):
    """`authorization: Bearer <token>` on every call except health and reflection -> else UNAUTHENTICATED."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def _authorized(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._expected)  # constant time
        return False

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_METHOD_PREFIXES) or self._authorized(handler_call_details.invocation_metadata):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None

        def deny_unary(_behavior):
            def deny(_request, context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid 'authorization: Bearer <token>' metadata")

            return deny

        def deny_stream(_behavior):
            def deny(_request, context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid 'authorization: Bearer <token>' metadata")
                yield  # pragma: no cover - makes this a generator, like the handler it replaces

            return deny

        return _rebuild(handler, deny_unary, deny_stream)
