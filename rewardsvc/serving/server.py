"""Build, start and stop the gRPC reward server: RewardService + standard health + reflection, bearer-token
auth, optional (mutual) TLS, Prometheus metrics, structured key=value logs, graceful shutdown.

    running = build_server(scorer, ServerConfig(port=0))
    running.port            # the bound port
    running.stop(grace=30)  # NOT_SERVING, refuse new calls, finish in-flight work, stop

Health (`grpc.health.v1.Health`, services "" and "rewardsvc.v1.RewardService") is NOT_SERVING until the
model is loaded and one warm-up score has run, SERVING after, NOT_SERVING again from the start of shutdown.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .._proto.rewardsvc.v1 import reward_pb2 as pb
from .._proto.rewardsvc.v1 import reward_pb2_grpc as pb_grpc
from ..errors import InvalidInputError, RewardError
from ..wire import SERVICE_NAME
from .backend import ScorerBackend
from .batching import Batcher
from .config import ServerConfig
from .interceptors import ActiveCalls, BearerAuthInterceptor, ObservingInterceptor
from .logs import log_line
from .metrics import ServiceMetrics
from .models import ModelSet
from .service import RewardService
from .servicer import RewardServicer

log = logging.getLogger("rewardsvc.server")

FLUSH_S = 1.0  # after the drain, how long gRPC may take to send replies already written before it cancels
BATCHER_JOIN_S = 120.0  # on stop, the longest wait for the batcher's current scorer call to end
WARMUP_CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


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


# A loaded scorer or several served models by name (ModelSet), or a loader of either.
ScorerOrLoader = ScorerBackend | ModelSet | Callable[[], ScorerBackend | ModelSet]


class RunningServer:
    """A started server. `port` / `metrics_port` are the bound ports."""

    def __init__(self, config: ServerConfig, server: grpc.Server, port: int, service: RewardService,
                 health_servicer: health.HealthServicer, metrics: ServiceMetrics, active: ActiveCalls):  # fmt: skip
        self.config = config
        self.port = port
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self.http = None  # serving.http.HttpEndpoint when config.http_port is set
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
            if not isinstance(scorer, (ScorerBackend, ModelSet)):
                scorer = scorer()
            models = scorer if isinstance(scorer, ModelSet) else ModelSet.single(scorer)
            if self.config.max_tokens_per_conversation is not None:
                limit = self.config.max_tokens_per_conversation
                models = ModelSet([(name, b.with_config(replace(b.config, max_tokens=limit))) for name, b in models.items()],
                                  check_names=False)
            for _, backend in models.items():
                if self.config.max_tokens_in_flight < backend.config.max_tokens:
                    raise InvalidInputError(
                        f"server.max_tokens_in_flight={self.config.max_tokens_in_flight} is below the most tokens of one "
                        f"conversation ({backend.config.max_tokens}); such a conversation could never be admitted",
                        field="server.max_tokens_in_flight",
                    )
            if self.config.http_default_weights is not None:  # a wrong name fails the start, not every request
                self.config.http_default_weights.check_attributes(models.get(None).attributes)
            self.batcher = Batcher(models, self.config.batcher_config(), self.metrics).start()
            self.service.attach(models, self.batcher)
            # Warm-up: the first forward pass allocates and picks kernels; a trainer should not pay for it.
            for name in models.names:
                self.service.score([WARMUP_CONVERSATION], None, model=name)
            if self._stopped.is_set():  # stopped while loading: stop() found no batcher to join
                self.batcher.close(timeout=BATCHER_JOIN_S)
                return
            self._set_health(health_pb2.HealthCheckResponse.SERVING)
            self._ready.set()
            log.info(log_line("serve.ready", address=self.address, model_id=models.get(None).model_id, models=",".join(models.names),
                        load_s=f"{time.monotonic() - started:.1f}", trained=all(b.trained for _, b in models.items()),
                        plan=_plan_summary(models.get(None))))  # fmt: skip
        except BaseException as exc:
            self.load_error = exc
            # An expected failure (bad checkpoint, missing directory, bad limits) is one line; anything else
            # keeps its traceback for the bug report.
            expected = isinstance(exc, RewardError)
            log.error(log_line("serve.load_failed", error=str(exc) if expected else repr(exc)), exc_info=None if expected else exc)
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
            log.info(log_line("serve.stopping", address=self.address, grace_s=grace))
            self._health.enter_graceful_shutdown()  # every service NOT_SERVING, for good
            if self.http is not None:
                self.http.stopping = True  # GET /health -> 503 too
            self._active.close()  # new RewardService calls -> UNAVAILABLE; health keeps answering
            log.info(log_line("serve.draining", address=self.address, calls_in_progress=self._active.count))
            drained = self._active.wait_idle(max(0.0, deadline - time.monotonic()))
            if not drained:
                if self.batcher is not None:  # queued and computing work -> UNAVAILABLE now
                    self.batcher.abandon("the server's shutdown grace ran out before this request was computed")
                self._active.wait_idle(FLUSH_S)  # handlers write those replies
                self._active.cancelling = True
            # Cancels whatever is left (open streams, health Watch streams, which never end by themselves)
            # after letting the transport flush the replies already written.
            self._server.stop(FLUSH_S).wait()
            if self.http is not None:  # after the drain, which counted HTTP calls too
                self.http.stop()
            batcher_stopped = True
            if self.batcher is not None:
                batcher_stopped = self.batcher.close(timeout=BATCHER_JOIN_S)
            self.metrics.stop_http()
            log.info(log_line("serve.stopped", address=self.address, drained=drained, batcher_stopped=batcher_stopped))

    @property
    def batcher_running(self) -> bool:
        """True if the batcher thread outlived stop() (stuck in a scorer call longer than BATCHER_JOIN_S)."""
        return self.batcher is not None and self.batcher.thread_alive

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)


def _plan_summary(backend) -> str:
    """The default model's scoring plan for serve.ready: `float32/padded(measured)`, or "-" for a backend that
    has none (off CPU, a test double)."""
    decision = getattr(backend, "plan_decision", None)
    return "-" if decision is None else f"{decision.plan.name}({decision.source})"


def build_server(scorer: ScorerOrLoader, config: ServerConfig = ServerConfig(), *, wait_ready: bool = True) -> RunningServer:
    """Bind and start the server, then load (if `scorer` is a loader) and warm up the model.

    The port is bound before the model loads, so health answers NOT_SERVING during a slow load. With
    wait_ready=False loading runs on a background thread (see RunningServer.wait_ready / load_error);
    with wait_ready=True (default) this returns once SERVING and raises if loading failed."""
    metrics = ServiceMetrics()
    active = ActiveCalls()
    service = RewardService(config.limits(), config.default_normalization())
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    for name in (health.OVERALL_HEALTH, SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    interceptors: list[grpc.ServerInterceptor] = [ObservingInterceptor(metrics, active, config.max_message_bytes)]
    if config.auth_token:
        interceptors.append(BearerAuthInterceptor(config.auth_token))
    transport_limit = 2 * config.max_message_bytes  # see ServerConfig.max_message_bytes
    options = [
        ("grpc.max_receive_message_length", transport_limit),
        ("grpc.max_send_message_length", transport_limit),
        # A second server on a fixed port must fail, not silently share the port.
        ("grpc.so_reuseport", 0),
    ]
    if config.max_connection_age_s is not None:  # no age grace set: calls in progress are never cut
        options.append(("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)))
    server = grpc.server(
        ThreadPoolExecutor(max_workers=config.handler_threads, thread_name_prefix="rewardsvc-rpc"),
        interceptors=interceptors,
        options=options,
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
    if config.http_port is not None:
        _start_http(running, config, active)
    log.info(log_line("serve.listening", address=running.address, tls=config.tls, mutual_tls=bool(config.tls_client_ca),
                auth=bool(config.auth_token), metrics_port=running.metrics_port, http_port=running.http_port))  # fmt: skip
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


def _policy_tokenizer_loader(reference: str | None):
    """A loader of the tokenizer named by --http-policy-template (a directory or a cached hub id), or None."""
    if reference is None:
        return None

    def load():
        from ..model.backbone_loading import load_tokenizer
        from ..model.hub import resolve_model_path

        return load_tokenizer(str(resolve_model_path(reference, "--http-policy-template")))

    return load


def _start_http(running: RunningServer, config: ServerConfig, active: ActiveCalls) -> None:
    from .http import HttpEndpoint

    endpoint = HttpEndpoint(running.service, running.metrics, active, auth_token=config.auth_token,
                            max_message_bytes=config.max_message_bytes,
                            policy_tokenizer=_policy_tokenizer_loader(config.http_policy_template),
                            default_weights=config.http_default_weights, openrlhf_scores=config.openrlhf_scores,
                            handler_threads=config.handler_threads, encode_threads=config.http_encode_threads)  # fmt: skip
    try:
        running.http_port = endpoint.start(config.host, config.http_port)
    except OSError as exc:
        running._server.stop(0)
        running.metrics.stop_http()
        raise InvalidInputError(f"server.http_port: cannot bind {config.http_port}: {exc}", field="server.http_port") from exc
    running.http = endpoint
