"""OpenTelemetry behind the rewardsvc.tracing hooks (optional extra `rewardsvc[otel]`).

Off unless configured: `install_from_env()` (called by `rewardsvc serve` and the Ray Serve deployment) installs
tracing only when the standard variables ask for it: OTEL_TRACES_EXPORTER (e.g. `otlp`, `console`) or an OTLP
endpoint (OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), and not OTEL_SDK_DISABLED=true or
OTEL_TRACES_EXPORTER=none. The OTLP exporter then reads every other OTEL_* variable itself (headers, protocol,
timeout, compression, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER...).

The caller's context comes in through the W3C `traceparent` / `tracestate` headers (gRPC metadata keys are
lower-case already; HTTP header names are matched case-insensitively).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from typing import Any

from .. import tracing

log = logging.getLogger("rewardsvc.server")

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def configured(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the OTEL_* variables ask for traces."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(exporter) or any(environ.get(v) for v in ENDPOINT_VARIABLES)


class _Handle:
    """A started span and whether it has ended (a gRPC call may end on two paths)."""

    __slots__ = ("span", "ended", "lock")

    def __init__(self, span: Any):
        self.span, self.ended, self.lock = span, False, threading.Lock()


class OtelTracing:
    """rewardsvc.tracing.Tracing over an OpenTelemetry TracerProvider (the global one by default)."""

    def __init__(self, tracer_provider: Any = None):
        from opentelemetry import context, propagate, trace

        from .. import __version__

        self._trace, self._context, self._propagate = trace, context, propagate
        provider = tracer_provider or trace.get_tracer_provider()
        self.tracer = provider.get_tracer("rewardsvc", __version__)

    def _links(self, contexts: Iterable[Any]) -> list[Any]:
        links = []
        for ctx in contexts:
            span_context = self._trace.get_current_span(ctx).get_span_context() if ctx is not None else None
            if span_context is not None and span_context.is_valid:
                links.append(self._trace.Link(span_context))
        return links

    def span(self, name: str, parent: Any, links: Iterable[Any], attributes: dict[str, Any]):
        return self.tracer.start_as_current_span(name, context=parent, links=self._links(links), attributes=attributes)

    def record(self, name: str, start_ns: int, end_ns: int, parent: Any, attributes: dict[str, Any]) -> None:
        span = self.tracer.start_span(name, context=parent, attributes=attributes, start_time=start_ns)
        span.end(end_time=end_ns)

    def start(self, name: str, parent: Any, attributes: dict[str, Any]) -> _Handle:
        return _Handle(self.tracer.start_span(name, context=parent, attributes=attributes))

    @contextmanager
    def activate(self, handle: _Handle):
        with self._trace.use_span(handle.span, end_on_exit=False, record_exception=True, set_status_on_exception=True):
            yield handle.span

    def end(self, handle: _Handle) -> None:
        with handle.lock:
            if handle.ended:
                return
            handle.ended = True
        handle.span.end()

    def current(self) -> Any:
        return self._context.get_current()

    def extract(self, carrier: Mapping[str, str]) -> Any:
        return self._propagate.extract({k.lower(): v for k, v in carrier.items()})


def install_from_env(environ: Mapping[str, str] = os.environ) -> bool:
    """Install OTLP (or console) tracing when the OTEL_* variables ask for it; True when installed.

    A missing `rewardsvc[otel]` extra is a clear error, not a silent no-op: the variables said to trace."""
    if tracing.enabled() or not configured(environ):
        return tracing.enabled()
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError as exc:
        from ..errors import InvalidInputError

        raise InvalidInputError(f"OTEL_* variables ask for traces but OpenTelemetry is not installed ({exc}); "
                                "pip install 'rewardsvc[otel]'", field="OTEL_TRACES_EXPORTER") from exc  # fmt: skip
    resource = Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME", "rewardsvc")})
    provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER, as the SDK reads it
    exporters = [e.strip().lower() for e in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if e.strip()]
    for name in exporters:
        if name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name == "otlp":
            protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"))
            if protocol.startswith("http"):
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            else:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # endpoint, headers: OTEL_* env
        else:
            from ..errors import InvalidInputError

            raise InvalidInputError(f"OTEL_TRACES_EXPORTER: {name!r} is not supported here; use otlp, console or none",
                                    field="OTEL_TRACES_EXPORTER")  # fmt: skip
    trace.set_tracer_provider(provider)
    tracing.install(OtelTracing(provider))
    log.info("event=tracing.installed exporters=%s", ",".join(exporters))
    return True
