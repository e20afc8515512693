"""The HTTP/JSON endpoint beside gRPC (`rewardsvc serve --http-port PORT`), an asyncio server on aiohttp.

    POST /get_reward         OpenRLHF's remote reward model (rewardsvc.integrations.openrlhf)
    POST /classify           vLLM's pooling protocol for a reward model (rewardsvc.integrations.vllm_pooling)
    POST /pooling
    GET  /v1/models          the models this service serves, in vLLM's (OpenAI's) ModelList shape
    POST /v1/score           the proto's JSON mapping of ScoreRequest -> ScoreResponse (also score_group,
    POST /v1/score_group          compare, inspect_weights, model_info): for curl users
    POST /v1/compare
    POST /v1/inspect_weights
    GET|POST /v1/model_info
    GET  /health             200 SERVING / 503 NOT_SERVING (open without a token, like gRPC health)

Why asyncio: OpenRLHF posts one sample per request, hundreds at once. A request waiting for its score holds
no thread here, so every concurrent sample reaches the batcher together (a fixed pool of threads would let
only as many through as it has threads). The event loop runs on its own thread and never runs the model nor
tokenizes: parsing, templating and encoding of /get_reward, /classify and /pooling run on a small thread pool
(`encode_threads`), which enqueues the work with the batcher and returns; the loop then awaits the work's
future. The /v1 routes run the gRPC servicer's own handlers (same validation, same messages) on a second pool of
`handler_threads`, as gRPC does. A client that disconnects cancels its call: the work leaves the batcher's queue
(and its tokens leave admission control) at once, and is never computed.

Every call goes through the same RewardService (limits, batcher, admission control) as gRPC. It shares the
in-flight count (a drain waits for HTTP calls too), the bearer token (`Authorization: Bearer <token>`) and the
metrics (method label `HTTP/<path>`). Status codes: 400 INVALID_ARGUMENT / FAILED_PRECONDITION, 401
UNAUTHENTICATED, 404 unknown path or model, 405 wrong method, 413 body over max_message_bytes, 429
RESOURCE_EXHAUSTED (Retry-After), 499 the client went away, 503 UNAVAILABLE, 504 DEADLINE_EXCEEDED, 500 INTERNAL.
Error bodies: {"error": {"code", "message", "field"}}; on the vLLM routes vLLM's own shape.

A request may carry `Request-Timeout: <seconds>` (a deadline, as gRPC's); without it there is none.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any

from aiohttp import web
from google.protobuf import json_format

from .._proto.rewardsvc.v1 import reward_pb2 as pb
from .. import tracing
from ..errors import DeadlineExceededError, InvalidInputError, NotReadyError, OverloadedError, grpc_status_name
from ..integrations import openrlhf, vllm_pooling
from ..integrations.chat_text import ChatTemplateSplitter
from ..types import AttributeWeights
from .batching import WorkItem
from .interceptors import ActiveCalls
from .logs import log_line
from .metrics import ServiceMetrics
from .service import CallContext, RewardService, check_finite_results
from .servicer import RewardServicer

log = logging.getLogger("rewardsvc.server")
STOP_S = 5.0  # on stop, the longest wait for handlers still running and for the loop thread
BACKLOG = 4096  # pending connections: a rollout opens hundreds at once

HTTP_STATUS = {
    "OK": 200, "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}  # fmt: skip

# /v1/<route> -> (servicer method, request message)
V1_ROUTES = {
    "score": ("Score", pb.ScoreRequest),
    "score_group": ("ScoreGroup", pb.ScoreGroupRequest),
    "compare": ("Compare", pb.CompareRequest),
    "inspect_weights": ("InspectWeights", pb.InspectWeightsRequest),
    "model_info": ("GetModelInfo", pb.GetModelInfoRequest),
}
VLLM_PATHS = (vllm_pooling.CLASSIFY_PATH, vllm_pooling.POOLING_PATH, vllm_pooling.MODELS_PATH)


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers or {}


class _Context:
    """What the gRPC servicer's handlers read from their context, for one HTTP call. abort() raises;
    callbacks run when the HTTP client goes away (see HttpEndpoint._blocking)."""

    def __init__(self, timeout_s: float | None):
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._metadata: tuple = ()
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._ended = False

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if not self._ended:
                self._callbacks.append(callback)
                return True
        callback()  # the client is already gone
        return True

    def end(self) -> None:
        with self._lock:
            self._ended, callbacks = True, list(self._callbacks)
        for callback in callbacks:
            callback()

    def set_trailing_metadata(self, metadata) -> None:
        self._metadata = tuple(metadata)

    def abort(self, code, details: str):
        meta = dict(self._metadata)
        headers = {}
        if "retry-after-ms" in meta:
            headers = {"Retry-After": str(max(1, math.ceil(int(meta["retry-after-ms"]) / 1000))), "Retry-After-Ms": meta["retry-after-ms"]}
        raise HttpError(HTTP_STATUS.get(code.name, 500), code.name, details, meta.get("rewardsvc-field"), headers)


def _error_of(exc: BaseException, method: str) -> HttpError:
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, (CancelledError, asyncio.CancelledError)):
        return HttpError(499, "CANCELLED", "cancelled")
    name = grpc_status_name(exc)
    message = str(exc)
    if name == "INTERNAL":  # never a stack trace on the wire; the id finds it in the log
        error_id = uuid.uuid4().hex[:12]
        log.error("event=http.internal_error method=%s error_id=%s error=%r", method, error_id, exc, exc_info=exc)
        message = f"internal error (id {error_id}, logged by the server)"
    headers = {}
    if isinstance(exc, OverloadedError):
        ms = max(1, math.ceil(exc.retry_after_s * 1000))
        headers = {"Retry-After": str(max(1, math.ceil(ms / 1000))), "Retry-After-Ms": str(ms)}
    return HttpError(HTTP_STATUS.get(name, 500), name, message, getattr(exc, "field", None), headers)


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> web.Response:
    body = json.dumps(payload, ensure_ascii=False, allow_nan=False).encode()
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


class _Submitted:
    """The WorkItem a pool thread enqueued for a call, and whether the call has ended meanwhile: a call that
    ends while its request is still being encoded cancels the item as soon as it exists."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._item: WorkItem | None = None
        self._gone: str | None = None

    def set(self, item: WorkItem) -> None:
        with self._lock:
            self._item, gone = item, self._gone
        if gone is not None:
            item.cancel(gone)

    def cancel(self, reason: str) -> None:
        with self._lock:
            self._gone, item = reason, self._item
        if item is not None:
            item.cancel(reason)


class HttpEndpoint:
    """The aiohttp application, on an event loop of its own thread. `policy_tokenizer`: a loader of the
    tokenizer whose chat template OpenRLHF's queries are rendered in (None: the reward backbone's own).
    `default_weights`: the steering of the protocols that cannot carry weights (/get_reward, /classify,
    /pooling); None = the gating's."""

    def __init__(self, service: RewardService, metrics: ServiceMetrics, active: ActiveCalls, *, auth_token: str | None,
                 max_message_bytes: int, policy_tokenizer: Callable[[], Any] | None = None,
                 default_weights: AttributeWeights | None = None,
                 openrlhf_scores: openrlhf.ScoresMapping = openrlhf.ScoresMapping(),
                 handler_threads: int = 64, encode_threads: int = 4):  # fmt: skip
        self.service, self.metrics, self.active = service, metrics, active
        self.servicer = RewardServicer(service)
        self._expected = f"Bearer {auth_token}".encode() if auth_token else None
        self.max_message_bytes = max_message_bytes
        self.default_weights = default_weights
        self.openrlhf_scores = openrlhf_scores
        self._policy_tokenizer = policy_tokenizer
        self._splitters: dict[str, tuple[ChatTemplateSplitter, tuple[str, ...]]] = {}
        self._splitter_lock = threading.Lock()
        self._encode_pool = ThreadPoolExecutor(encode_threads, thread_name_prefix="rewardsvc-http-encode")
        self._handler_pool = ThreadPoolExecutor(handler_threads, thread_name_prefix="rewardsvc-http")
        self._created = int(time.time())
        self.stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------

    def start(self, host: str, port: int) -> int:
        """Bind and serve on a new thread; returns the bound port (OSError when it cannot bind)."""
        loop = asyncio.new_event_loop()
        ready: Future = Future()

        async def serve() -> None:
            app = web.Application(client_max_size=2 * self.max_message_bytes)  # ours is checked first, with a clearer message
            app.router.add_route("*", "/{path:.*}", self._dispatch)
            # handler_cancellation: a client that disconnects cancels its handler (and so its queued work).
            runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True,
                                   shutdown_timeout=STOP_S)  # fmt: skip
            await runner.setup()
            site = web.TCPSite(runner, host, port, backlog=BACKLOG, reuse_port=False)
            try:
                await site.start()
            except BaseException:
                await runner.cleanup()
                raise
            self._runner = runner
            return runner.addresses[0][1]

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                ready.set_result(loop.run_until_complete(serve()))
            except BaseException as exc:
                ready.set_exception(exc)
                loop.close()
                return
            loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="rewardsvc-http", daemon=True)
        self._thread.start()
        self.port = int(ready.result())
        return self.port

    def stop(self) -> None:
        """Close the listening socket and every connection, then the loop. Called after the drain (in-flight
        calls, HTTP included, have answered), so only idle keep-alive connections are left to close."""
        loop, runner, self._runner = self._loop, self._runner, None
        if loop is None or runner is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(STOP_S + 1)
        except Exception as exc:  # a stop must not raise; the loop is stopped below anyway
            log.warning(log_line("http.stop_failed", error=repr(exc)))
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(STOP_S)
        self._encode_pool.shutdown(wait=False, cancel_futures=True)
        self._handler_pool.shutdown(wait=False, cancel_futures=True)

    # ---- dispatch ----------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path, verb = request.path, request.method
        vllm = path in VLLM_PATHS
        if path == "/health":
            serving = self.service.ready and not self.stopping and not self.active.closed
            return _json(200 if serving else 503, {"status": "SERVING" if serving else "NOT_SERVING"})
        if path == openrlhf.PATH:
            run, allowed = self._get_reward, ("POST",)
        elif path in (vllm_pooling.CLASSIFY_PATH, vllm_pooling.POOLING_PATH):
            run, allowed = self._pooling, ("POST",)
        elif path == vllm_pooling.MODELS_PATH:
            run, allowed = self._models, ("GET",)
        elif path.startswith("/v1/") and path[4:] in V1_ROUTES:
            run, allowed = self._v1, ("POST", "GET") if path == "/v1/model_info" else ("POST",)
        else:
            return self._error(HttpError(404, "NOT_FOUND", f"path: no route {path}; see docs/INTEGRATIONS.md", "path"), False)
        if verb not in allowed:
            err = HttpError(405, "INVALID_ARGUMENT", f"method: {path} takes {' or '.join(allowed)}, got {verb}", "method",
                            {"Allow": ", ".join(allowed)})  # fmt: skip
            return self._error(err, vllm)
        return await self._observed(f"HTTP{path}", run, request, vllm)

    async def _observed(self, method: str, run, request: web.Request, vllm: bool) -> web.StreamResponse:
        """One counted call: the in-flight count shared with gRPC (drain), metrics, a log line."""
        started = time.monotonic()
        if not self.active.try_enter():
            self.metrics.observe_rpc(method, "UNAVAILABLE", 0.0)
            return self._error(HttpError(503, "UNAVAILABLE", "the server is shutting down; retry on another replica"), vllm)
        self.metrics.in_progress.labels(method).inc()
        code = "OK"
        # The caller's trace continues through the W3C traceparent header; the pools below copy the context.
        receive = tracing.start(tracing.RECEIVE, tracing.extract(request.headers), http_route=method)
        try:
            with tracing.activate(receive):
                self._authorize(request)
                raw = await self._read_body(request)
                payload = await run(request, raw)
                with tracing.span(tracing.REPLY):
                    return _json(200, payload)
        except BaseException as exc:
            err = _error_of(exc, method)
            code = err.code
            if isinstance(exc, asyncio.CancelledError):
                raise  # the client is gone: nobody to answer
            return self._error(err, vllm)
        finally:
            seconds = time.monotonic() - started
            tracing.end(receive)
            self.metrics.in_progress.labels(method).dec()
            self.metrics.observe_rpc(method, code, seconds)
            self.active.exit()
            level = logging.DEBUG if code == "OK" else logging.INFO
            if log.isEnabledFor(level):
                log.log(level, log_line("http", method=method, code=code, ms=f"{seconds * 1000:.1f}", peer=request.remote))

    def _authorize(self, request: web.Request) -> None:
        if self._expected is None:
            return
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, self._expected):  # constant time
            raise HttpError(401, "UNAUTHENTICATED", "missing or invalid 'Authorization: Bearer <token>' header",
                            headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    async def _read_body(self, request: web.Request) -> bytes:
        length = request.content_length
        if length is not None and length > self.max_message_bytes:
            raise HttpError(413, "INVALID_ARGUMENT", f"request: {length} bytes, over max_message_bytes={self.max_message_bytes}", "request")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:  # a body without Content-Length, over twice the limit
            raw = None
        if raw is None or len(raw) > self.max_message_bytes:
            raise HttpError(413, "INVALID_ARGUMENT", f"request: over max_message_bytes={self.max_message_bytes}", "request")
        return raw

    @staticmethod
    def _parse_json(raw: bytes) -> Any:
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInputError(f"request: the body is not valid JSON ({exc})", field="request") from exc

    @staticmethod
    def _timeout(request: web.Request) -> float | None:
        value = request.headers.get("Request-Timeout")
        if value is None:
            return None
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not (seconds > 0 and math.isfinite(seconds)):
            raise InvalidInputError(f"Request-Timeout: must be a positive number of seconds, got {value!r}", field="Request-Timeout")
        return seconds

    # ---- the two ways a call waits -----------------------------------------------------------------

    async def _submitted(self, prepare: Callable[[CallContext], tuple[WorkItem | None, Any]], timeout: float | None) -> tuple[list, Any]:
        """Run `prepare(call)` (parse, template, encode, enqueue: returns the WorkItem, or None when there is
        no work, and anything the reply needs) on the encode pool, then await the item's results on the loop,
        holding no thread. The call's end (client gone, deadline) cancels the item."""
        deadline = None if timeout is None else time.monotonic() + timeout
        call = CallContext(deadline=deadline, started=time.monotonic())
        submitted = _Submitted()

        def enqueue():
            item, extra = prepare(call)
            if item is not None:
                submitted.set(item)
            return item, extra

        try:
            item, extra = await asyncio.wrap_future(self._encode_pool.submit(contextvars.copy_context().run, enqueue))
            if item is None:
                return [], extra
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            results = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(item.future)), remaining)
        except asyncio.TimeoutError:
            submitted.cancel("deadline")
            raise DeadlineExceededError("the deadline passed before the work was computed") from None
        except asyncio.CancelledError:
            submitted.cancel(call.cancel_reason())
            raise
        return check_finite_results(results), extra

    async def _blocking(self, fn: Callable[[_Context], Any], context: _Context) -> Any:
        """Run a blocking handler on the handler pool; the call's end runs the context's callbacks (the
        servicer registers its item's cancel there)."""
        try:
            return await asyncio.wrap_future(self._handler_pool.submit(contextvars.copy_context().run, fn, context))
        except asyncio.CancelledError:
            context.end()
            raise

    # ---- routes ------------------------------------------------------------------------------------

    def _require_ready(self) -> None:
        if not self.service.ready:
            raise NotReadyError("the model is still loading; retry shortly")

    def splitter(self, policy: bool = True) -> tuple[ChatTemplateSplitter, tuple[str, ...]]:
        """A chat template's splitter and the stop strings a policy may append (EOS, pad): the policy's
        (/get_reward) or the reward model's own (vLLM's text inputs)."""
        key = "policy" if policy and self._policy_tokenizer else "reward model's"
        with self._splitter_lock:
            if key not in self._splitters:
                if self.service.scorer is None:
                    raise NotReadyError("the model is still loading; retry shortly")
                tokenizer = self._policy_tokenizer() if key == "policy" else self.service.scorer.encoder.tokenizer
                stops = tuple(t for t in (getattr(tokenizer, "eos_token", None), getattr(tokenizer, "pad_token", None)) if isinstance(t, str) and t)
                self._splitters[key] = (ChatTemplateSplitter.from_tokenizer(tokenizer, name=key), stops)
            return self._splitters[key]

    async def _get_reward(self, request: web.Request, raw: bytes) -> dict[str, Any]:
        self._require_ready()

        def prepare(call: CallContext):
            # OpenRLHF sends no options: the server's default normalization (serve --normalize) applies.
            normalization = self.service.normalization_for(None, self.default_weights)
            splitter, stops = self.splitter()
            parsed = openrlhf.parse_request(self._parse_json(raw), splitter, stops)
            if not parsed:
                return None, ([], None)  # an empty query: empty lists, at once
            item = self.service.submit_score([p.messages for p in parsed], self.default_weights, call)
            return item, ([p.cut for p in parsed], normalization)

        results, (cut, normalization) = await self._submitted(prepare, self._timeout(request))
        return openrlhf.reply(self.service.normalized(results, normalization), cut, self.openrlhf_scores)

    def _check_model(self, model: str | None) -> str:
        served = self.service.model_ids
        if model is not None and model not in served:
            raise HttpError(404, "NOT_FOUND", f"The model `{model}` does not exist; this server serves {served}", "model")
        return model if model is not None else served[0]

    async def _pooling(self, request: web.Request, raw: bytes) -> dict[str, Any]:
        self._require_ready()
        route = request.path

        def prepare(call: CallContext):
            parsed = vllm_pooling.parse_request(self._parse_json(raw), route)
            model = self._check_model(parsed.model)
            conversations = [self._conversation_of(one, f"input[{i}]") for i, one in enumerate(parsed.inputs)]
            return self.service.submit_score(conversations, self.default_weights, call, model=model), (parsed, model)

        results, (parsed, model) = await self._submitted(prepare, self._timeout(request))
        build = vllm_pooling.classify_reply if route == vllm_pooling.CLASSIFY_PATH else vllm_pooling.pooling_reply
        return build(model, results, parsed.use_activation)

    def _conversation_of(self, one: vllm_pooling.PoolingInput, field: str) -> Any:
        if one.messages is not None:
            return one.messages
        splitter, stops = self.splitter(policy=False)
        text = one.text
        if one.tokens is not None:
            text = self.service.scorer.encoder.tokenizer.decode(list(one.tokens), skip_special_tokens=False)
        return splitter.split(text, None, field=field, extra_stops=stops)

    async def _models(self, request: web.Request, raw: bytes) -> dict[str, Any]:
        self._require_ready()
        return vllm_pooling.models_reply(self.service.model_ids, self.service.limits.max_tokens_per_conversation, self._created)

    async def _v1(self, request: web.Request, raw: bytes) -> dict[str, Any]:
        method, request_type = V1_ROUTES[request.path[4:]]
        context = _Context(self._timeout(request))

        def handle(context: _Context) -> dict[str, Any]:
            try:
                message = json_format.ParseDict(self._parse_json(raw), request_type())
            except json_format.ParseError as exc:
                raise InvalidInputError(f"request: does not match rewardsvc.v1.{request_type.__name__} ({exc})", field="request") from exc
            response = getattr(self.servicer, method)(message, context)
            return json_format.MessageToDict(response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)

        return await self._blocking(handle, context)

    # ---- replies -----------------------------------------------------------------------------------

    @staticmethod
    def _error(err: HttpError, vllm: bool) -> web.Response:
        if vllm:
            return _json(err.status, vllm_pooling.error_body(err.status, err.message, err.field), err.headers)
        payload = {"error": {"code": err.code, "message": err.message, "field": err.field or ""}}
        return _json(err.status, payload, err.headers)
