"""The HTTP/JSON endpoint beside gRPC (`rewardsvc serve --http-port PORT`), on waitress (a production WSGI
server: pure Python, threaded, bounded request bodies and timeouts; no framework needed for six routes).

    POST /get_reward         OpenRLHF's remote reward model (rewardsvc.integrations.openrlhf)
    POST /v1/score           the proto's JSON mapping of ScoreRequest -> ScoreResponse (also score_group,
    POST /v1/score_group          compare, inspect_weights, model_info): for curl users
    POST /v1/compare
    POST /v1/inspect_weights
    GET|POST /v1/model_info
    GET  /health             200 SERVING / 503 NOT_SERVING (open without a token, like gRPC health)

Every call goes through the same RewardService (limits, batcher, admission control) as gRPC: the /v1 routes run
the gRPC servicer's own handlers with an HTTP stand-in for the call context, so validation and error messages
are the same. It shares the in-flight count (a drain waits for HTTP calls too), the bearer token
(`Authorization: Bearer <token>`) and the metrics (method label `HTTP/<path>`). Status codes: 400
INVALID_ARGUMENT / FAILED_PRECONDITION, 401 UNAUTHENTICATED, 404 unknown path, 405 wrong method, 413 body over
max_message_bytes, 429 RESOURCE_EXHAUSTED (Retry-After), 503 UNAVAILABLE, 504 DEADLINE_EXCEEDED, 500 INTERNAL.
Error bodies: {"error": {"code", "message", "field"}}.

A request may carry `Request-Timeout: <seconds>` (a deadline, as gRPC's); without it there is none.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format

from .._proto.rewardsvc.v1 import reward_pb2 as pb
from ..errors import InvalidInputError, NotReadyError, OverloadedError
from ..integrations import openrlhf
from ..integrations.chat_text import ChatTemplateSplitter
from .interceptors import ActiveCalls
from .logs import kv
from .metrics import ServiceMetrics
from .service import Call, RewardService
from .servicer import RewardServicer, _status_of

log = logging.getLogger("rewardsvc.server")
STOP_S = 5.0  # on stop, the longest wait for waitress's worker threads and its I/O thread
FLUSH_S = 1.0  # then for replies still in connection buffers to be sent

HTTP_STATUS = {
    "OK": 200, "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}  # fmt: skip
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
           413: "Content Too Large", 429: "Too Many Requests", 499: "Client Closed Request", 500: "Internal Server Error",
           503: "Service Unavailable", 504: "Gateway Timeout"}  # fmt: skip

# /v1/<route> -> (servicer method, request message)
V1_ROUTES = {
    "score": ("Score", pb.ScoreRequest),
    "score_group": ("ScoreGroup", pb.ScoreGroupRequest),
    "compare": ("Compare", pb.CompareRequest),
    "inspect_weights": ("InspectWeights", pb.InspectWeightsRequest),
    "model_info": ("GetModelInfo", pb.GetModelInfoRequest),
}


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers or {}


class _Context:
    """What the gRPC servicer's handlers read from their context, for one HTTP call. abort() raises."""

    def __init__(self, timeout_s: float | None):
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._metadata: tuple = ()

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def add_callback(self, _callback: Callable[[], None]) -> bool:
        return True  # WSGI cannot see a client leave; the deadline (if any) bounds the wait

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
    name, message = _status_of(exc, method)  # logs INTERNAL with an error id, as gRPC does
    headers = {}
    if isinstance(exc, OverloadedError):
        ms = max(1, math.ceil(exc.retry_after_s * 1000))
        headers = {"Retry-After": str(max(1, math.ceil(ms / 1000))), "Retry-After-Ms": str(ms)}
    return HttpError(HTTP_STATUS.get(name, 500), name, message, getattr(exc, "field", None), headers)


class HttpEndpoint:
    """The WSGI app and its waitress server. `policy_tokenizer`: a loader of the tokenizer whose chat template
    OpenRLHF's queries are rendered in (None: the reward backbone's own)."""

    def __init__(self, service: RewardService, metrics: ServiceMetrics, active: ActiveCalls, *, auth_token: str | None,
                 max_message_bytes: int, policy_tokenizer: Callable[[], Any] | None = None, threads: int = 16):  # fmt: skip
        self.service, self.metrics, self.active = service, metrics, active
        self.servicer = RewardServicer(service)
        self._expected = f"Bearer {auth_token}".encode() if auth_token else None
        self.max_message_bytes = max_message_bytes
        self._policy_tokenizer = policy_tokenizer
        self._splitter: tuple[ChatTemplateSplitter, tuple[str, ...]] | None = None
        self._splitter_lock = threading.Lock()
        self.threads = threads
        self.stopping = False
        self._server = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------

    def start(self, host: str, port: int) -> int:
        from waitress.server import create_server

        self._server = create_server(
            self.app, host=host, port=port, threads=self.threads, ident="rewardsvc",
            max_request_body_size=2 * self.max_message_bytes,  # ours is checked first, with a clearer message
            channel_timeout=300, clear_untrusted_proxy_headers=True,
        )  # fmt: skip
        self.port = int(self._server.effective_port)
        self._thread = threading.Thread(target=self._server.run, name="rewardsvc-http", daemon=True)
        self._thread.start()
        return self.port

    def stop(self) -> None:
        """Close the listening socket and the worker threads. Called after the drain (in-flight calls, HTTP
        included, have answered), so only idle keep-alive connections are left to close."""
        if self._server is None:
            return
        server, self._server = self._server, None
        # Worker threads finish the task in hand (its reply goes into its connection's buffer) and exit.
        server.task_dispatcher.shutdown(cancel_pending=False, timeout=STOP_S)
        deadline = time.monotonic() + FLUSH_S
        while time.monotonic() < deadline and any(getattr(c, "total_outbufs_len", 0) for c in list(server._map.values())):
            time.sleep(0.01)  # the I/O thread sends what those replies left in the buffers

        def close_all() -> None:  # on the I/O thread (sockets are its own): every connection, then the listener
            for dispatcher in list(server._map.values()):
                dispatcher.close()

        # Kept-alive connections would keep waitress's loop running; closing them all ends it.
        server.trigger.pull_trigger(close_all)
        if self._thread is not None:
            self._thread.join(timeout=STOP_S)

    # ---- WSGI --------------------------------------------------------------------------------------

    def app(self, environ, start_response):
        path, verb = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
        if path == "/health":
            serving = self.service.ready and not self.stopping and not self.active.closed
            return self._send(start_response, 200 if serving else 503, {"status": "SERVING" if serving else "NOT_SERVING"})
        if path == openrlhf.PATH:
            route, allowed = "get_reward", ("POST",)
        elif path.startswith("/v1/") and path[4:] in V1_ROUTES:
            route, allowed = path[4:], ("POST", "GET") if path == "/v1/model_info" else ("POST",)
        else:
            return self._send_error(start_response, HttpError(404, "NOT_FOUND", f"path: no route {path}; see docs/INTEGRATIONS.md", "path"))
        if verb not in allowed:
            err = HttpError(405, "INVALID_ARGUMENT", f"method: {path} takes {' or '.join(allowed)}, got {verb}", "method")
            return self._send_error(start_response, err, {"Allow": ", ".join(allowed)})
        return self._observed(f"HTTP{path}", route, environ, start_response)

    def _observed(self, method: str, route: str, environ, start_response):
        """One counted call: the in-flight count shared with gRPC (drain), metrics, a log line."""
        started = time.monotonic()
        if not self.active.try_enter():
            self.metrics.observe_rpc(method, "UNAVAILABLE", 0.0)
            return self._send_error(start_response, HttpError(503, "UNAVAILABLE", "the server is shutting down; retry on another replica"))
        self.metrics.in_progress.labels(method).inc()
        code = "OK"
        try:
            self._authorize(environ)
            body = self._read_json(environ)
            reply = self._get_reward(body, environ) if route == "get_reward" else self._v1(route, body, environ)
            return self._send(start_response, 200, reply)
        except BaseException as exc:
            err = _error_of(exc, method)
            code = err.code
            return self._send_error(start_response, err)
        finally:
            seconds = time.monotonic() - started
            self.metrics.in_progress.labels(method).dec()
            self.metrics.observe_rpc(method, code, seconds)
            self.active.exit()
            level = logging.DEBUG if code == "OK" else logging.INFO
            if log.isEnabledFor(level):
                log.log(level, kv("http", method=method, code=code, ms=f"{seconds * 1000:.1f}", peer=environ.get("REMOTE_ADDR")))

    def _authorize(self, environ) -> None:
        if self._expected is None:
            return
        given = (environ.get("HTTP_AUTHORIZATION") or "").encode()
        if not hmac.compare_digest(given, self._expected):  # constant time
            raise HttpError(401, "UNAUTHENTICATED", "missing or invalid 'Authorization: Bearer <token>' header",
                            headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    def _read_json(self, environ) -> Any:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise HttpError(400, "INVALID_ARGUMENT", "Content-Length: not a number", "request") from None
        if length > self.max_message_bytes:
            raise HttpError(413, "INVALID_ARGUMENT", f"request: {length} bytes, over max_message_bytes={self.max_message_bytes}", "request")
        raw = environ["wsgi.input"].read(length) if length else b""
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInputError(f"request: the body is not valid JSON ({exc})", field="request") from exc

    @staticmethod
    def _timeout(environ) -> float | None:
        value = environ.get("HTTP_REQUEST_TIMEOUT")
        if value is None:
            return None
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not (seconds > 0 and math.isfinite(seconds)):
            raise InvalidInputError(f"Request-Timeout: must be a positive number of seconds, got {value!r}", field="Request-Timeout")
        return seconds

    # ---- routes ------------------------------------------------------------------------------------

    def splitter(self) -> tuple[ChatTemplateSplitter, tuple[str, ...]]:
        """The policy template's splitter and the stop strings a policy may append (EOS, pad)."""
        with self._splitter_lock:
            if self._splitter is None:
                if self.service.scorer is None:
                    raise NotReadyError("the model is still loading; retry shortly")
                name = "policy" if self._policy_tokenizer else "reward model's"
                tokenizer = self._policy_tokenizer() if self._policy_tokenizer else self.service.scorer.encoder.tokenizer
                stops = tuple(t for t in (getattr(tokenizer, "eos_token", None), getattr(tokenizer, "pad_token", None)) if isinstance(t, str) and t)
                self._splitter = (ChatTemplateSplitter.from_tokenizer(tokenizer, name=name), stops)
            return self._splitter

    def _get_reward(self, body: Any, environ) -> dict[str, Any]:
        self.service._require_ready()
        splitter, stops = self.splitter()
        conversations = openrlhf.conversations_of(body, splitter, stops)
        timeout = self._timeout(environ)
        call = Call(deadline=None if timeout is None else time.monotonic() + timeout, started=time.monotonic())
        return openrlhf.reply(self.service.score(conversations, None, call))

    def _v1(self, route: str, body: Any, environ) -> dict[str, Any]:
        method, request_type = V1_ROUTES[route]
        try:
            request = json_format.ParseDict(body, request_type())
        except json_format.ParseError as exc:
            raise InvalidInputError(f"request: does not match rewardsvc.v1.{request_type.__name__} ({exc})", field="request") from exc
        response = getattr(self.servicer, method)(request, _Context(self._timeout(environ)))
        return json_format.MessageToDict(response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)

    # ---- replies -----------------------------------------------------------------------------------

    @staticmethod
    def _send(start_response, status: int, payload: Any, headers: dict[str, str] | None = None):
        body = json.dumps(payload, ensure_ascii=False, allow_nan=False).encode()
        start_response(f"{status} {REASONS.get(status, '')}".strip(), [
            ("Content-Type", "application/json"), ("Content-Length", str(len(body))), *(headers or {}).items(),
        ])  # fmt: skip
        return [body]

    def _send_error(self, start_response, err: HttpError, headers: dict[str, str] | None = None):
        payload = {"error": {"code": err.code, "message": err.message, "field": err.field or ""}}
        return self._send(start_response, err.status, payload, {**err.headers, **(headers or {})})
