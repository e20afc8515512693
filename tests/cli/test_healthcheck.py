"""rewardsvc-healthcheck against real servers on loopback (tiny scorer): exit 0 only on SERVING; 1 while the
model loads, for an unknown service, over the wrong transport, and once the server is stopped."""

from __future__ import annotations

import socket
import threading

import pytest

from rewardsvc.cli import healthcheck
from rewardsvc.serving.config import ServerConfig
from rewardsvc.serving.server import build_server
from service_fixtures import make_certs


def run(capsys, *argv: str) -> tuple[int, str]:
    code = healthcheck.main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture(scope="module")
def live(tiny_scorer):
    running = build_server(tiny_scorer, ServerConfig(port=0, grace_s=1.0))
    yield running
    running.stop(0)


def test_serving_server_passes(live, capsys):
    code, text = run(capsys, "--port", str(live.port))
    assert code == 0 and text.strip() == f"127.0.0.1:{live.port}: SERVING"
    assert run(capsys, "--port", str(live.port), "--service", "rewardsvc.v1.RewardService")[0] == 0


def test_port_from_the_environment(live, capsys, monkeypatch):
    monkeypatch.setenv("REWARDSVC_PORT", str(live.port))
    assert run(capsys, "--timeout", "5") == (0, f"127.0.0.1:{live.port}: SERVING\n")
    monkeypatch.setenv("REWARDSVC_PORT", "fifty")
    code, text = run(capsys)
    assert code == 1 and "REWARDSVC_PORT" in text and "'fifty'" in text


def test_unknown_service_fails(live, capsys):
    code, text = run(capsys, "--port", str(live.port), "--service", "no.such.Service")
    assert code == 1 and "NOT_FOUND" in text.upper()


def test_not_serving_while_loading_then_serving(tiny_scorer, capsys):
    release = threading.Event()

    def slow_loader():
        release.wait(30)
        return tiny_scorer

    running = build_server(slow_loader, ServerConfig(port=0), wait_ready=False)
    try:
        code, text = run(capsys, "--port", str(running.port))
        assert code == 1 and text.strip().endswith("NOT_SERVING")
        release.set()
        assert running.wait_ready(30)
        assert run(capsys, "--port", str(running.port))[0] == 0
    finally:
        release.set()
        running.stop(0)


def test_stopped_server_fails(tiny_scorer, capsys):
    running = build_server(tiny_scorer, ServerConfig(port=0))
    port = running.port
    assert run(capsys, "--port", str(port))[0] == 0
    running.stop(0)
    code, text = run(capsys, "--port", str(port), "--timeout", "2")
    assert code == 1 and "NotReadyError" in text  # nothing listens: UNAVAILABLE, the client's NotReadyError


def test_nothing_listening_fails_fast(capsys):
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _ = run(capsys, "--port", str(port), "--timeout", "2")
    assert code == 1


def test_tls(tiny_scorer, tmp_path, capsys):
    certs = make_certs(tmp_path)
    running = build_server(tiny_scorer, ServerConfig(port=0, tls_cert=str(certs["server_cert"]), tls_key=str(certs["server_key"])))
    try:
        port = str(running.port)
        ok = run(capsys, "--port", port, "--tls-ca", str(certs["ca"]), "--tls-server-name", "localhost")
        assert ok[0] == 0, ok[1]
        assert run(capsys, "--port", port, "--timeout", "2")[0] == 1  # plaintext against a TLS port
        code, text = run(capsys, "--port", port, "--tls-ca", str(tmp_path / "missing.pem"))
        assert code == 1 and "missing.pem" in text
    finally:
        running.stop(0)


def test_bad_timeout_is_refused(capsys):
    code, text = run(capsys, "--timeout", "0")
    assert code == 1 and "--timeout" in text
