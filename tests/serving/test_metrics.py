"""ServiceMetrics: what the batcher and the interceptor report lands in the server's own registry, is served
over HTTP, and every metric is listed in docs/SERVING.md."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

from rewardsvc.serving.metrics import ServiceMetrics

SERVING_DOC = Path(__file__).resolve().parents[2] / "docs" / "SERVING.md"


def test_observer_hooks_update_the_registry():
    m = ServiceMetrics()
    value = m.registry.get_sample_value
    m.observe_rpc("Score", "OK", 0.02)
    m.observe_rpc("Score", "INVALID_ARGUMENT", 0.001)
    m.on_batch(conversations=3, tokens=300, seconds=0.5)
    m.on_batch(conversations=1, tokens=50, seconds=0.0)  # no throughput from a zero-length interval
    m.on_load(queue_depth=2, tokens_in_flight=120)
    m.on_drop("deadline")
    m.on_split()
    assert value("rewardsvc_requests_total", {"method": "Score", "code": "OK"}) == 1
    assert value("rewardsvc_requests_total", {"method": "Score", "code": "INVALID_ARGUMENT"}) == 1
    assert value("rewardsvc_request_latency_seconds_count", {"method": "Score"}) == 2
    assert value("rewardsvc_scored_tokens_total") == 350 and value("rewardsvc_scored_conversations_total") == 4
    assert value("rewardsvc_tokens_per_second") == 600
    assert value("rewardsvc_batch_conversations_count") == 2 and value("rewardsvc_batch_tokens_sum") == 350
    assert value("rewardsvc_queue_depth") == 2 and value("rewardsvc_tokens_in_flight") == 120
    assert value("rewardsvc_dropped_total", {"reason": "deadline"}) == 1 and value("rewardsvc_batch_splits_total") == 1


def test_two_servers_do_not_share_metrics():
    a, b = ServiceMetrics(), ServiceMetrics()
    a.on_split()
    assert a.registry.get_sample_value("rewardsvc_batch_splits_total") == 1
    assert b.registry.get_sample_value("rewardsvc_batch_splits_total") == 0


def test_http_endpoint_serves_the_registry():
    m = ServiceMetrics()
    m.on_drop("cancelled")
    port = m.serve_http("127.0.0.1", 0)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        m.stop_http()
    assert 'rewardsvc_dropped_total{reason="cancelled"} 1.0' in text
    m.stop_http()  # idempotent


def test_every_metric_is_documented():
    documented = set(re.findall(r"^\| `(rewardsvc_\w+)` \|", SERVING_DOC.read_text(), flags=re.M))
    exposed = set()
    for family in ServiceMetrics().registry.collect():
        exposed.add(f"{family.name}_total" if family.type == "counter" else family.name)
    assert exposed == documented


def test_http_endpoint_answers_only_on_metrics_path():
    """The metrics port backs probes and scrape configs: a wrong path must be 404, never a healthy 200."""
    import urllib.error

    m = ServiceMetrics()
    m.on_split()
    port = m.serve_http("127.0.0.1", 0)
    try:
        ok = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics?name[]=x", timeout=10)
        assert ok.status == 200 and "rewardsvc_batch_splits_total 1.0" in ok.read().decode()
        for path in ("/", "/healthz", "/metrics/extra", "/metricsx"):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10)
                raise AssertionError(f"{path} answered 200")
            except urllib.error.HTTPError as exc:
                assert exc.code == 404, (path, exc.code)
                assert "/metrics" in exc.read().decode()
        head = urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/metrics", method="HEAD"), timeout=10)
        assert head.status == 200 and head.read() == b""
    finally:
        m.stop_http()
