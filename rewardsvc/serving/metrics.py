"""Prometheus metrics of one server, in its own CollectorRegistry (so that a process — a test, a benchmark —
can run several servers without metric-name clashes), exported over HTTP when a metrics port is set."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
METRICS_PATH = "/metrics"
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class ServiceMetrics:
    """Names (all prefixed `rewardsvc_`) are listed in docs/SERVING.md. Also the batcher's observer."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("rewardsvc_requests", "RPCs by method and status code", ["method", "code"], registry=r)
        self.latency = Histogram(
            "rewardsvc_request_latency_seconds", "RPC latency by method", ["method"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.in_progress = Gauge("rewardsvc_requests_in_progress", "RPCs being handled", ["method"], registry=r)
        self.batch_conversations = Histogram(
            "rewardsvc_batch_conversations", "conversations per scorer call", buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram("rewardsvc_batch_tokens", "tokens per scorer call", buckets=TOKEN_BUCKETS, registry=r)
        self.batch_seconds = Histogram(
            "rewardsvc_batch_seconds", "compute time per scorer call", buckets=LATENCY_BUCKETS, registry=r
        )
        self.scored_tokens = Counter("rewardsvc_scored_tokens", "tokens scored (rate() = tokens/s)", registry=r)
        self.scored_conversations = Counter("rewardsvc_scored_conversations", "conversations scored", registry=r)
        self.tokens_per_second = Gauge("rewardsvc_tokens_per_second", "throughput of the last scorer call", registry=r)
        self.queue_depth = Gauge("rewardsvc_queue_depth", "requests waiting for the batcher", registry=r)
        self.tokens_in_flight = Gauge("rewardsvc_tokens_in_flight", "tokens admitted and not yet answered", registry=r)
        self.dropped = Counter("rewardsvc_dropped", "requests dropped before compute", ["reason"], registry=r)
        self.batch_splits = Counter("rewardsvc_batch_splits", "failed scorer calls split in halves and retried", registry=r)
        self._http = None

    # ---- RPC side ----------------------------------------------------------------------------------

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    # ---- BatchObserver ------------------------------------------------------------------------------

    def on_batch(self, conversations: int, tokens: int, seconds: float) -> None:
        self.batch_conversations.observe(conversations)
        self.batch_tokens.observe(tokens)
        self.batch_seconds.observe(seconds)
        self.scored_tokens.inc(tokens)
        self.scored_conversations.inc(conversations)
        if seconds > 0:
            self.tokens_per_second.set(tokens / seconds)

    def on_load(self, queue_depth: int, tokens_in_flight: int) -> None:
        self.queue_depth.set(queue_depth)
        self.tokens_in_flight.set(tokens_in_flight)

    def on_drop(self, reason: str) -> None:
        self.dropped.labels(reason).inc()

    def on_split(self) -> None:
        self.batch_splits.inc()

    # ---- HTTP --------------------------------------------------------------------------------------

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics endpoint; returns the bound port (port 0 = ephemeral). Only GET/HEAD /metrics
        answer 200; every other path is 404, so the port can back an HTTP probe or a scrape config without
        a typo'd path looking healthy (prometheus_client's own server answers 200 on any path)."""
        handler = type("MetricsHandler", (_MetricsHandler,), {"registry": self.registry})
        family = ThreadingHTTPServer
        if ":" in host:  # an IPv6 literal
            import socket

            family = type("MetricsHTTPServer6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
        server = family((host.strip("[]"), port), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="rewardsvc-metrics", daemon=True).start()
        self._http = server
        return int(server.server_port)

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _MetricsHandler(BaseHTTPRequestHandler):
    """GET /metrics (any query string) -> the registry in the format the Accept header asks for; else 404."""

    registry: CollectorRegistry

    def _reply(self, send_body: bool) -> None:
        if urlsplit(self.path).path != METRICS_PATH:
            body = f"not found: {urlsplit(self.path).path}; metrics are at {METRICS_PATH}\n".encode()
            status, content_type = 404, "text/plain; charset=utf-8"
        else:
            encoder, content_type = choose_encoder(self.headers.get("Accept"))
            body, status = encoder(self.registry), 200
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (the http.server naming)
        self._reply(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._reply(send_body=False)

    def log_message(self, format: str, *args) -> None:  # scrapes every few seconds would flood the log
        pass
