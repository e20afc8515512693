"""OpenTelemetry traces of one call (rewardsvc.tracing hooks + serving/otel.py), with the SDK's in-memory span
exporter, on a real server (gRPC and HTTP on 127.0.0.1) over the tiny random Llama: the spans of TRACE_SPANS in
order, each a child of the call's receive span, which continues the caller's W3C traceparent."""

from __future__ import annotations

import json
import urllib.request

import grpc
import pytest

otel_sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="the otel extra is not installed; CI installs it")

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from rewardsvc import tracing  # noqa: E402
from rewardsvc._proto.rewardsvc.v1 import reward_pb2_grpc as pb_grpc  # noqa: E402
from rewardsvc.config import ScorerConfig  # noqa: E402
from rewardsvc.model.scorer import Scorer  # noqa: E402
from rewardsvc.serving.otel import OtelTracing, configured  # noqa: E402
from service_fixtures import score_request, start_server  # noqa: E402
from tiny_models import save_tiny_heads  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01"
CONVERSATION = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    heads = save_tiny_heads(tmp_path_factory.mktemp("trace-heads"), tiny_llama_dir)
    running = start_server(Scorer.load(heads, config=ScorerConfig()), http_port=0, max_wait_ms=0)
    yield running
    running.stop(0)


@pytest.fixture()
def exporter():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(OtelTracing(provider))
    yield exporter
    tracing.install(None)
    provider.shutdown()


def spans_of_one_call(exporter, server) -> list:
    """The finished spans of the trace (the warm-up call before install left none)."""
    spans = [s for s in exporter.get_finished_spans() if format(s.context.trace_id, "032x") == TRACE_ID]
    return sorted(spans, key=lambda s: s.start_time)


def assert_one_call_trace(spans) -> None:
    names = [s.name for s in spans]
    assert names == list(tracing.TRACE_SPANS), names
    receive = spans[0]
    assert format(receive.parent.span_id, "016x") == CALLER_SPAN_ID and receive.parent.is_remote
    by_name = {s.name: s for s in spans}
    for name in (tracing.VALIDATE, tracing.QUEUE_WAIT, tracing.BATCH_FORWARD, tracing.REPLY):
        assert by_name[name].parent.span_id == receive.context.span_id, name
    assert by_name[tracing.HEADS].parent.span_id == by_name[tracing.BATCH_FORWARD].context.span_id
    forward = by_name[tracing.BATCH_FORWARD]
    assert forward.attributes["batch_size"] == 1 and forward.attributes["tokens"] > 0
    for earlier, later in zip(spans, spans[1:]):
        assert earlier.start_time <= later.start_time
    assert all(receive.start_time <= s.start_time and s.end_time <= receive.end_time for s in spans[1:])


def test_grpc_call_continues_the_callers_trace(server, exporter):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        response = pb_grpc.RewardServiceStub(channel).Score(score_request([CONVERSATION]), metadata=(("traceparent", TRACEPARENT),))
    assert len(response.results) == 1
    spans = spans_of_one_call(exporter, server)
    assert_one_call_trace(spans)
    assert spans[0].attributes["rpc_method"] == "Score"


def test_http_call_continues_the_callers_trace(server, exporter):
    body = json.dumps({"conversations": [{"messages": CONVERSATION}]}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/v1/score", data=body, method="POST",
                                     headers={"Content-Type": "application/json", "traceparent": TRACEPARENT})  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert len(json.load(reply)["results"]) == 1
    assert_one_call_trace(spans_of_one_call(exporter, server))


def test_off_by_default_and_configured_only_by_otel_variables():
    assert not tracing.enabled() and tracing.current() is None and tracing.extract({"traceparent": TRACEPARENT}) is None
    assert not configured({})
    assert configured({"OTEL_TRACES_EXPORTER": "otlp"}) and configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})
    assert not configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"})
    assert not configured({"OTEL_TRACES_EXPORTER": "none"})
