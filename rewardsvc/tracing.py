"""Trace hooks for the request path, a no-op unless a tracer is installed (standard library only).

The serving code marks its steps with `span(...)`; `rewardsvc.serving.otel.install_from_env()` installs the
OpenTelemetry implementation when the standard OTEL_* variables ask for it (docs/OBSERVABILITY.md). Until then
every call here returns at once and allocates nothing, so the hooks cost nothing on an untraced server.

Spans of one Score call (names are TRACE_SPANS): receive (the whole call, child of the caller's context from
gRPC metadata / HTTP headers), validate (checks + tokenizing), queue_wait (submit -> the batcher takes it),
batch_forward (the batch's scorer call; batch_size, tokens; linked to the other calls of the batch), heads (the
heads on the batch's embeddings), reply (results -> the wire).

Work crosses threads (handler -> batcher), so a context is captured with `current()` where the work is
submitted and handed to `span(..., parent=...)` on the other side.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

RECEIVE, VALIDATE, QUEUE_WAIT, BATCH_FORWARD, HEADS, REPLY = (
    "rewardsvc.receive", "rewardsvc.validate", "rewardsvc.queue_wait", "rewardsvc.batch_forward",
    "rewardsvc.heads", "rewardsvc.reply",
)  # fmt: skip
TRACE_SPANS = (RECEIVE, VALIDATE, QUEUE_WAIT, BATCH_FORWARD, HEADS, REPLY)


class Tracing(Protocol):
    """What an installed tracer provides (serving/otel.py implements it over OpenTelemetry)."""

    def span(self, name: str, parent: Any, links: Iterable[Any], attributes: dict[str, Any]) -> AbstractContextManager: ...

    def record(self, name: str, start_ns: int, end_ns: int, parent: Any, attributes: dict[str, Any]) -> None: ...

    def start(self, name: str, parent: Any, attributes: dict[str, Any]) -> Any: ...

    def activate(self, handle: Any) -> AbstractContextManager: ...

    def end(self, handle: Any) -> None: ...

    def current(self) -> Any: ...

    def extract(self, carrier: Mapping[str, str]) -> Any: ...


_installed: Tracing | None = None
_NO_SPAN = nullcontext()


def install(tracing: Tracing | None) -> None:
    """Route the hooks to `tracing` (None: back to no-ops)."""
    global _installed
    _installed = tracing


def enabled() -> bool:
    return _installed is not None


def span(name: str, parent: Any = None, links: Iterable[Any] = (), **attributes: Any) -> AbstractContextManager:
    """A span around a `with` block: child of `parent` (a context from current()/extract()) or of the span
    current in this thread."""
    if _installed is None:
        return _NO_SPAN
    return _installed.span(name, parent, links, attributes)


def record(name: str, start_ns: int, end_ns: int, parent: Any = None, **attributes: Any) -> None:
    """A span whose times are known only afterwards (queue wait: from submit to the batcher taking the item)."""
    if _installed is not None:
        _installed.record(name, start_ns, end_ns, parent, attributes)


def start(name: str, parent: Any = None, **attributes: Any) -> Any:
    """A span that outlives one `with` block (a gRPC call ends in a callback): a handle for activate()/end(),
    None when tracing is off."""
    return None if _installed is None else _installed.start(name, parent, attributes)


def activate(handle: Any) -> AbstractContextManager:
    """Make a started span current in this thread for the `with` block (its children nest under it)."""
    if _installed is None or handle is None:
        return _NO_SPAN
    return _installed.activate(handle)


def end(handle: Any) -> None:
    """End a started span (once; later calls do nothing)."""
    if _installed is not None and handle is not None:
        _installed.end(handle)


def current() -> Any:
    """The context to hand to another thread (None when tracing is off)."""
    return None if _installed is None else _installed.current()


def extract(carrier: Mapping[str, str]) -> Any:
    """The caller's trace context from gRPC metadata or HTTP headers (W3C `traceparent`, lower-case keys)."""
    return None if _installed is None else _installed.extract(carrier)
