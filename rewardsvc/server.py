"""Build, start and stop the gRPC reward server: RewardService + standard health + reflection, bearer-token
auth, optional (mutual) TLS, Prometheus metrics, structured key=value logs, graceful shutdown.

    running = build_server(scorer, ServerConfig(port=0))
    running.port            # the bound port
    running.stop(grace=30)  # NOT_SERVING, refuse new calls, finish in-flight work, stop

Health (`grpc.health.v1.Health`, services "" and "rewardsvc.v1.RewardService") is NOT_SERVING until the
model is loaded and one warm-up score has run, SERVING after, NOT_SERVING again from the start of shutdown.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ._proto.rewardsvc.v1 import reward_pb2 as pb
from ._proto.rewardsvc.v1 import reward_pb2_grpc as pb_grpc
from .batching import Batcher, BatcherConfig
from .errors import InvalidInputError, RewardError
from .metrics import ServiceMetrics
from .service import DEADLINE_SLACK_S, SERVICE_NAME, Limits, RewardService
from .servicer import NO_DEADLINE_S, RewardServicer, tolerant_deserializer

log = logging.getLogger("rewardsvc.server")

METHOD_PREFIX = f"/{SERVICE_NAME}/"
# Health and reflection stay open when auth is on: load balancers and grpcurl probe without credentials.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
FLUSH_S = 1.0  # after the drain, how long gRPC may take to send replies already written before it cancels
BATCHER_JOIN_S = 120.0  # on stop, the longest wait for the batcher's current scorer call to end
WARMUP_CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


@dataclass(frozen=True)
class ServerConfig:
    """Network, limits, batching, security and shutdown of one server."""

    host: str = "127.0.0.1"
    """Address to bind; 0.0.0.0 (or ::) to listen on every interface."""
    port: int = 50051
    """gRPC port; 0 = an ephemeral port (see RunningServer.port)."""
    metrics_port: int | None = None
    """Prometheus /metrics HTTP port on the same host; None = off, 0 = ephemeral."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest request accepted (INVALID_ARGUMENT above it). gRPC itself refuses messages over twice this
    size with RESOURCE_EXHAUSTED before they are parsed."""
    max_conversations_per_request: int = 256
    """Most conversations in one Score (or ScoreStream message); a Compare pair counts as two."""
    max_tokens_per_conversation: int | None = None
    """Most tokens per templated conversation; None = the scorer's own max_tokens."""
    max_group_size: int = 256
    """Most responses in one ScoreGroup."""
    token_budget: int = 8192
    """Most tokens the batcher hands to the scorer in one call."""
    max_wait_ms: float = 3.0
    """How long the batcher waits for more requests after the first before computing."""
    max_tokens_in_flight: int = 262_144
    """Admission control: more tokens than this queued or computing -> RESOURCE_EXHAUSTED + retry-after-ms."""
    handler_threads: int = 64
    """gRPC handler threads (they only translate, encode and wait; one thread per concurrent call)."""
    auth_token: str | None = field(default=None, repr=False)
    """If set, every RewardService call needs `authorization: Bearer <token>` metadata."""
    tls_cert: str | None = None
    """PEM server certificate chain; with tls_key, the server speaks TLS only."""
    tls_key: str | None = None
    """PEM private key of tls_cert."""
    tls_client_ca: str | None = None
    """PEM CA bundle; if set, clients must present a certificate it signed (mutual TLS)."""
    grace_s: float = 30.0
    """On shutdown, how long in-flight calls may take to finish before they are cancelled."""

    def __post_init__(self) -> None:
        def bad(name: str, message: str) -> None:
            raise InvalidInputError(f"server.{name} {message}", field=f"server.{name}")

        if not self.host:
            bad("host", "must be a non-empty address")
        if not 0 <= self.port <= 65535:
            bad("port", f"must be in [0, 65535], got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            bad("metrics_port", f"must be None or in [0, 65535], got {self.metrics_port}")
        for name in ("max_message_bytes", "max_conversations_per_request", "max_group_size", "token_budget",
                     "max_tokens_in_flight", "handler_threads"):  # fmt: skip
            if int(getattr(self, name)) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_tokens_per_conversation is not None and self.max_tokens_per_conversation < 2:
            bad("max_tokens_per_conversation", f"must be None or >= 2, got {self.max_tokens_per_conversation}")
        if not 0 <= self.max_wait_ms <= 1000:
            bad("max_wait_ms", f"must be in [0, 1000], got {self.max_wait_ms}")
        if self.grace_s < 0:
            bad("grace_s", f"must be >= 0, got {self.grace_s}")
        if self.auth_token is not None and not self.auth_token.strip():
            bad("auth_token", "must be None or a non-empty token")
        if bool(self.tls_cert) != bool(self.tls_key):
            bad("tls_cert", "and server.tls_key must be given together")
        if self.tls_client_ca and not self.tls_cert:
            bad("tls_client_ca", "needs server.tls_cert and server.tls_key (mutual TLS is TLS first)")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def batcher_config(self) -> BatcherConfig:
        return BatcherConfig(
            token_budget=self.token_budget,
            max_wait_s=self.max_wait_ms / 1000.0,
            max_tokens_in_flight=self.max_tokens_in_flight,
        )

    def limits(self) -> Limits:
        return Limits(
            max_message_bytes=self.max_message_bytes,
            max_conversations_per_request=self.max_conversations_per_request,
            max_group_size=self.max_group_size,
            max_tokens_in_flight=self.max_tokens_in_flight,
        )


def kv(event: str, **fields: Any) -> str:
    """`event=... key=value ...` with values quoted when they hold spaces (one line, grep- and parse-able)."""
    parts = [f"event={event}"]
    for key, value in fields.items():
        text = str(value)
        if not text or any(c.isspace() or c in '"=' for c in text):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


# ---- interceptors ------------------------------------------------------------------------------------


def _rebuild(handler, wrap_unary_response, wrap_stream_response, wrap_deserializer=None):
    """The same handler kind, with its behaviour (and optionally its request deserializer) wrapped."""
    deserializer = handler.request_deserializer
    if wrap_deserializer is not None and deserializer is not None:
        deserializer = wrap_deserializer(deserializer)
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


class _ActiveCalls:
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


class ObservingInterceptor(grpc.ServerInterceptor):
    """Metrics (requests by method and code, latency, in progress), a log line per call, and the count of
    calls in progress. Only RewardService methods: health's Watch must keep its non-blocking handler.

    Requests are decoded by a tolerant deserializer (servicer.tolerant_deserializer): bytes that do not parse
    reach the handler, which answers INVALID_ARGUMENT and is counted. A call is counted, and leaves the
    in-flight count, when gRPC has finished it (context callback), with the code the client saw: a call
    whose client went away is CANCELLED (DEADLINE_EXCEEDED past its deadline; UNAVAILABLE when shutdown
    cancelled it), whatever the handler returned."""

    def __init__(self, metrics: ServiceMetrics, active: _ActiveCalls, max_message_bytes: int = 4 * 1024 * 1024):
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
            return time.monotonic(), context.time_remaining()

        def end(context, begun: tuple[float, float], code: str | None) -> None:
            """The handler returned or raised; the reply may not be written yet."""
            code = code or _code_name(context) or "OK"
            started, budget = begun
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
                    else:
                        final = "CANCELLED"
                seconds = time.monotonic() - started
                metrics.in_progress.labels(method).dec()
                metrics.observe_rpc(method, final, seconds)
                active.exit()
                level = logging.DEBUG if final == "OK" else logging.INFO
                if log.isEnabledFor(level):
                    log.log(level, kv("rpc", method=method, code=final, ms=f"{seconds * 1000:.1f}", peer=context.peer()))

            if not context.add_callback(on_finished):  # the call is already over
                on_finished()

        def wrap_unary(behavior):
            def wrapped(request, context):
                started, code = begin(context), None
                try:
                    return behavior(request, context)
                except BaseException:
                    code = _code_name(context) or "UNKNOWN"
                    raise
                finally:
                    end(context, started, code)

            return wrapped

        def wrap_stream(behavior):
            def wrapped(request, context):
                started, code = begin(context), None
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

        return _rebuild(handler, wrap_unary, wrap_stream, wrap_deserializer)


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


# ---- server ------------------------------------------------------------------------------------------


def _read(path: str, name: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"server.{name}: cannot read {path}: {exc}", field=f"server.{name}") from exc


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials:
    key, cert = _read(config.tls_key, "tls_key"), _read(config.tls_cert, "tls_cert")
    client_ca = _read(config.tls_client_ca, "tls_client_ca") if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


ScorerOrLoader = Any  # a loaded Scorer, or a zero-argument callable returning one


class RunningServer:
    """A started server. `port` / `metrics_port` are the bound ports."""

    def __init__(self, config: ServerConfig, server: grpc.Server, port: int, service: RewardService,
                 health_servicer: health.HealthServicer, metrics: ServiceMetrics, active: _ActiveCalls):  # fmt: skip
        self.config = config
        self.port = port
        self.metrics_port: int | None = None
        self.service = service
        self.metrics = metrics
        self.batcher: Batcher | None = None
        self.load_error: BaseException | None = None
        self._server = server
        self._health = health_servicer
        self._active = active
        self._ready = threading.Event()
        self._finished = threading.Event()  # set when loading ends, ready or failed
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    @property
    def address(self) -> str:
        return _address(self.config.host, self.port)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def calls_in_progress(self) -> int:
        """RewardService calls admitted and not yet answered."""
        return self._active.count

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once SERVING; False on timeout or when loading failed (see load_error)."""
        self._finished.wait(timeout)
        return self._ready.is_set()

    def _set_health(self, status) -> None:
        for service in (health.OVERALL_HEALTH, SERVICE_NAME):
            self._health.set(service, status)

    def _load(self, scorer: ScorerOrLoader) -> None:
        try:
            started = time.monotonic()
            if callable(scorer) and not hasattr(scorer, "score_encoded"):
                scorer = scorer()
            if self.config.max_tokens_per_conversation is not None:
                scorer = scorer.with_config(replace(scorer.config, max_tokens=self.config.max_tokens_per_conversation))
            if self.config.max_tokens_in_flight < scorer.config.max_tokens:
                raise InvalidInputError(
                    f"server.max_tokens_in_flight={self.config.max_tokens_in_flight} is below the most tokens of one "
                    f"conversation ({scorer.config.max_tokens}); such a conversation could never be admitted",
                    field="server.max_tokens_in_flight",
                )
            self.batcher = Batcher(scorer, self.config.batcher_config(), self.metrics).start()
            self.service.attach(scorer, self.batcher)
            # Warm-up: the first forward pass allocates and picks kernels; a trainer should not pay for it.
            self.service.score([WARMUP_CONVERSATION], None)
            if self._stopped.is_set():  # stopped while loading: stop() found no batcher to join
                self.batcher.close(timeout=BATCHER_JOIN_S)
                return
            self._set_health(health_pb2.HealthCheckResponse.SERVING)
            self._ready.set()
            log.info(kv("serve.ready", address=self.address, model_id=scorer.model_id,
                        load_s=f"{time.monotonic() - started:.1f}", trained=scorer.trained))  # fmt: skip
        except BaseException as exc:
            self.load_error = exc
            # An expected failure (bad checkpoint, missing directory, bad limits) is one line; anything else
            # keeps its traceback for the bug report.
            expected = isinstance(exc, RewardError)
            log.error(kv("serve.load_failed", error=str(exc) if expected else repr(exc)), exc_info=None if expected else exc)
            raise
        finally:
            self._finished.set()

    def stop(self, grace: float | None = None) -> None:
        """Graceful stop: health NOT_SERVING, refuse new calls, let in-flight calls finish within `grace`
        seconds (default config.grace_s), then answer what is left UNAVAILABLE, stop the server and join the
        batcher thread. Idempotent.

        The order cannot lose a reply or abort the process: a call counts as in flight until gRPC has
        written its reply; the server stops with FLUSH_S of its own grace so the transport sends what it
        holds; past the grace the batcher gives up on its queue first (handlers answer UNAVAILABLE at once)
        and its thread is joined after the server stopped, once its current scorer call ends (at most
        BATCHER_JOIN_S), so no thread is inside the model when the interpreter exits."""
        grace = self.config.grace_s if grace is None else grace
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
            deadline = time.monotonic() + grace
            log.info(kv("serve.stopping", address=self.address, grace_s=grace))
            self._health.enter_graceful_shutdown()  # every service NOT_SERVING, for good
            self._active.close()  # new RewardService calls -> UNAVAILABLE; health keeps answering
            log.info(kv("serve.draining", address=self.address, calls_in_progress=self._active.count))
            drained = self._active.wait_idle(max(0.0, deadline - time.monotonic()))
            if not drained:
                if self.batcher is not None:  # queued and computing work -> UNAVAILABLE now
                    self.batcher.abandon("the server's shutdown grace ran out before this request was computed")
                self._active.wait_idle(FLUSH_S)  # handlers write those replies
                self._active.cancelling = True
            # Cancels whatever is left (open streams, health Watch streams, which never end by themselves)
            # after letting the transport flush the replies already written.
            self._server.stop(FLUSH_S).wait()
            batcher_stopped = True
            if self.batcher is not None:
                batcher_stopped = self.batcher.close(timeout=BATCHER_JOIN_S)
            self.metrics.stop_http()
            log.info(kv("serve.stopped", address=self.address, drained=drained, batcher_stopped=batcher_stopped))

    @property
    def batcher_running(self) -> bool:
        """True if the batcher thread outlived stop() (stuck in a scorer call longer than BATCHER_JOIN_S)."""
        return self.batcher is not None and self.batcher.thread_alive

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)


def build_server(scorer: ScorerOrLoader, config: ServerConfig = ServerConfig(), *, wait_ready: bool = True) -> RunningServer:
    """Bind and start the server, then load (if `scorer` is a loader) and warm up the model.

    The port is bound before the model loads, so health answers NOT_SERVING during a slow load. With
    wait_ready=False loading runs on a background thread (see RunningServer.wait_ready / load_error);
    with wait_ready=True (default) this returns once SERVING and raises if loading failed."""
    metrics = ServiceMetrics()
    active = _ActiveCalls()
    service = RewardService(config.limits())
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    for name in (health.OVERALL_HEALTH, SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    interceptors: list[grpc.ServerInterceptor] = [ObservingInterceptor(metrics, active, config.max_message_bytes)]
    if config.auth_token:
        interceptors.append(BearerAuthInterceptor(config.auth_token))
    transport_limit = 2 * config.max_message_bytes  # see ServerConfig.max_message_bytes
    server = grpc.server(
        ThreadPoolExecutor(max_workers=config.handler_threads, thread_name_prefix="rewardsvc-rpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", transport_limit),
            ("grpc.max_send_message_length", transport_limit),
            # A second server on a fixed port must fail, not silently share the port.
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_RewardServiceServicer_to_server(RewardServicer(service), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["RewardService"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME),
        server,
    )
    address = _address(config.host, config.port)
    try:
        port = server.add_secure_port(address, server_credentials(config)) if config.tls else server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc raises RuntimeError when it cannot bind
        raise InvalidInputError(f"server.port: cannot bind {address}: {exc}", field="server.port") from exc
    if port == 0:
        raise InvalidInputError(f"server.port: cannot bind {address}", field="server.port")
    server.start()
    running = RunningServer(config, server, port, service, health_servicer, metrics, active)
    try:
        if config.metrics_port is not None:
            running.metrics_port = metrics.serve_http(config.host, config.metrics_port)
    except OSError as exc:
        server.stop(0)
        raise InvalidInputError(f"server.metrics_port: cannot bind {config.metrics_port}: {exc}", field="server.metrics_port") from exc
    log.info(kv("serve.listening", address=running.address, tls=config.tls, mutual_tls=bool(config.tls_client_ca),
                auth=bool(config.auth_token), metrics_port=running.metrics_port))  # fmt: skip
    if wait_ready:
        try:
            running._load(scorer)
        except BaseException:
            running.stop(0)
            raise
    else:
        threading.Thread(target=_load_quietly, args=(running, scorer), name="rewardsvc-load", daemon=True).start()
    return running


def _load_quietly(running: RunningServer, scorer: ScorerOrLoader) -> None:
    try:
        running._load(scorer)
    except BaseException:  # recorded in running.load_error and logged
        pass

