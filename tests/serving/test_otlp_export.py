"""OTLP export as deployed: a `rewardsvc serve` process configured only by the standard OTEL_* variables sends its
spans over OTLP/gRPC to a collector endpoint on 127.0.0.1, and a SIGTERM right after the call still delivers them
(the SDK's batch processor is flushed at shutdown, so the last calls before a rollout are not lost).

The collector here is the OTLP TraceService itself (the generated servicer of `opentelemetry-proto`, the same
protocol an OpenTelemetry Collector's otlp receiver speaks); it records what arrives, as the wire carries it."""

from __future__ import annotations

import os
import signal
import threading
from concurrent import futures

import grpc
import pytest

pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc", reason="the otel extra is not installed; CI installs it")

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc  # noqa: E402

from rewardsvc import tracing  # noqa: E402
from rewardsvc._proto.rewardsvc.v1 import reward_pb2_grpc as pb_grpc  # noqa: E402
from service_fixtures import score_request, serve_process  # noqa: E402
from tiny_service import save_tiny_heads  # noqa: E402

# A whole `serve` process (imports torch and transformers, loads, warms up): tens of seconds on a shared CPU.
pytestmark = pytest.mark.slow
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"
CONVERSATION = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every exported span with its resource's service.name."""

    def __init__(self):
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 (the OTLP method name)
        with self.lock:
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((attributes.get("service.name", ""), s) for s in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id_hex: str) -> list[tuple[str, object]]:
        with self.lock:
            return [(service, s) for service, s in self.spans if s.trace_id.hex() == trace_id_hex]


@pytest.fixture()
def collector():
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(0)


def test_serve_exports_the_call_over_otlp_and_flushes_on_sigterm(tiny_llama_dir, collector, tmp_path):
    servicer, collector_port = collector
    heads = save_tiny_heads(tmp_path / "heads", tiny_llama_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update({
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector_port}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_SERVICE_NAME": "rewardsvc-under-test",
        # An hour between scheduled exports: whatever arrives was flushed by the shutdown, not by the timer.
        "OTEL_BSP_SCHEDULE_DELAY": "3600000",
    })  # fmt: skip
    args = ["--model", str(heads), "--host", "127.0.0.1", "--port", "0", "--grace", "10"]
    with serve_process(args, tmp_path / "serve.log", env=env) as served:
        assert "event=tracing.installed exporters=otlp" in served.log()
        port = served.logged_port("address")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = pb_grpc.RewardServiceStub(channel).Score(score_request([CONVERSATION]), metadata=(("traceparent", TRACEPARENT),))
        assert len(reply.results) == 1
        assert servicer.of_trace(TRACE_ID) == []  # nothing exported yet: the schedule is an hour away
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(120) == 0, served.log()
    exported = servicer.of_trace(TRACE_ID)
    assert {service for service, _ in exported} == {"rewardsvc-under-test"}
    spans = sorted((s for _, s in exported), key=lambda s: s.start_time_unix_nano)
    assert [s.name for s in spans] == list(tracing.TRACE_SPANS)
    receive = spans[0]
    assert receive.parent_span_id.hex() == "b7ad6b7169203331"  # the caller's span, from the traceparent metadata
    assert all(s.parent_span_id in (receive.span_id, spans[3].span_id) for s in spans[1:])
