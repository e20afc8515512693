"""Fixtures and helpers of the service tests (server, client, batching). Import the fixtures you use:

    from service_fixtures import served, short_conversation  # noqa: F401

The real embedded scorer comes from conftest.py's session fixture `embedded_scorer` (loaded once). Several
servers may share it, but only one is sent traffic at a time: the scorer is not thread-safe.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from rewardsvc._proto.rewardsvc.v1 import reward_pb2 as pb
from rewardsvc._proto.rewardsvc.v1 import reward_pb2_grpc as pb_grpc
from rewardsvc.serving.config import ServerConfig
from rewardsvc.serving.server import RunningServer, build_server

ROOT = Path(__file__).resolve().parents[1]


def long_conversation(i: int) -> list[dict[str, str]]:
    """~1,200 tokens, distinct per `i` (no shared prompt, nothing computed once for two): 8 of them are ~10k
    tokens, seconds of backbone compute on any CPU, so a 50 ms deadline always expires while they run instead
    of only on a slow machine (8 short conversations took ~40 ms on a fast CPU)."""
    return [
        {"role": "system", "content": ""},
        {"role": "user", "content": f"Question {i}: tell me about lake number {i}. " * 50},
        {"role": "assistant", "content": f"Lake {i} is deep and cold. " * 80},
    ]


def short_conversation(i: int) -> list[dict[str, str]]:
    """~19 tokens: an explicit empty system message replaces SmolLM2's ~20-token default system prompt,
    so the tests stay cheap on a 2-core CPU."""
    return [
        {"role": "system", "content": ""},
        {"role": "user", "content": f"Q{i}"},
        {"role": "assistant", "content": f"A{i}"},
    ]


def start_server(scorer, **overrides) -> RunningServer:
    return build_server(scorer, ServerConfig(**{"port": 0, "grace_s": 5.0, **overrides}))


@pytest.fixture(scope="module")
def served(embedded_scorer):
    """One plain server (metrics on) per test module."""
    running = start_server(embedded_scorer, metrics_port=0)
    yield running
    running.stop(0)


@pytest.fixture()
def stub(served):
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        yield pb_grpc.RewardServiceStub(channel)


def pb_conversation(messages) -> pb.Conversation:
    return pb.Conversation(messages=[pb.Message(role=m["role"], content=m["content"]) for m in messages])


def score_request(conversations, **kwargs) -> pb.ScoreRequest:
    return pb.ScoreRequest(conversations=[pb_conversation(c) for c in conversations], **kwargs)


def metric_value(metrics_port: int, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples of `name` (matching `labels`) on the /metrics page."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in (labels or {}).items()):
            total += float(m.group(3))
    return total


def settled_requests(metrics_port: int, labels: dict[str, str], timeout: float = 10.0) -> float:
    """requests_total matching `labels` once no RPC of that method is in progress. A call is counted when gRPC
    has finished it, a moment after the client has its reply; the server counts it before the in-progress gauge
    drops, so after the gauge reads 0 every call a client has seen answered is in the count."""
    in_progress = {"method": labels["method"]} if "method" in labels else None
    wait_until(lambda: metric_value(metrics_port, "rewardsvc_requests_in_progress", in_progress) == 0, timeout)
    return metric_value(metrics_port, "rewardsvc_requests_total", labels)


def has_metric(metrics_port: int, name: str) -> bool:
    """Whether the /metrics page has at least one sample named `name` (metric_value is 0 for a missing one)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return any(re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s", line) for line in text.splitlines())


class ServeProcess:
    """A running `rewardsvc serve` process; its stdout and stderr go to a log file the test reads."""

    def __init__(self, process: subprocess.Popen, log_path: Path):
        self.process = process
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def logged_port(self, key: str) -> int:
        """A port the process logged: `address` (gRPC, from serve.listening), `metrics_port` or `http_port`."""
        pattern = r"event=serve.listening address=127\.0\.0\.1:(\d+)" if key == "address" else rf"{key}=(\d+)"
        found = re.search(pattern, self.log())
        assert found, f"no {key} in the log:\n{self.log()}"
        return int(found.group(1))


@contextmanager
def serve_process(args: list[str], log_path: Path, env: dict[str, str] | None = None, ready_timeout: float = 300):
    """Start `python -m rewardsvc.cli.serve ARGS` offline, wait for serve.ready (a process that exits first fails
    with its log), yield it, and kill it on the way out if the test left it running."""
    env = {**(os.environ if env is None else env), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "rewardsvc.cli.serve", *args]
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    served = ServeProcess(process, log_path)
    try:
        assert wait_until(lambda: "event=serve.ready" in served.log() or process.poll() is not None, ready_timeout, 0.2), served.log()
        assert "event=serve.ready" in served.log(), served.log()
        yield served
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def make_certs(directory: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate for localhost / 127.0.0.1 and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def name(common: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def builder(subject, issuer, public_key):
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    ca_key = key()
    ca = (
        builder(name("rewardsvc test CA"), name("rewardsvc test CA"), ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = key()
    server = (
        builder(name("localhost"), ca.subject, server_key.public_key())
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    client_key = key()
    client = (
        builder(name("trainer"), ca.subject, client_key.public_key())
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def write(filename: str, data: bytes) -> Path:
        path = directory / filename
        path.write_bytes(data)
        return path

    def key_pem(k) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    return {
        "ca": write("ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
        "server_cert": write("server.pem", server.public_bytes(serialization.Encoding.PEM)),
        "server_key": write("server.key", key_pem(server_key)),
        "client_cert": write("client.pem", client.public_bytes(serialization.Encoding.PEM)),
        "client_key": write("client.key", key_pem(client_key)),
    }
