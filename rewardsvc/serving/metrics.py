"""Prometheus metrics of one server, in its own CollectorRegistry (so that a process — a test, a benchmark —
can run several servers without metric-name clashes), exported over HTTP when a metrics port is set."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
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
        """Start the /metrics endpoint; returns the bound port (port 0 = ephemeral)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_port)

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
