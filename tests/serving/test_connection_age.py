"""--max-connection-age: the server sends GOAWAY to a connection after about that long, the client's channel
leaves READY (so a dns:/// target is re-resolved on the next call, which is how autoscaled replicas get traffic
from clients already connected) and the next call succeeds on a new connection."""

from __future__ import annotations

import threading

import grpc
import pytest

from rewardsvc.client import RewardClient
from rewardsvc.errors import InvalidInputError
from rewardsvc.serving.config import ServerConfig
from rewardsvc.serving.server import build_server
from service_fixtures import wait_until

CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def _states(client: RewardClient) -> list:
    seen: list = []
    lock = threading.Lock()

    def record(state) -> None:
        with lock:
            seen.append(state)

    client.channel.subscribe(record, try_to_connect=False)
    return seen


def test_connections_are_recycled(tiny_scorer):
    running = build_server(tiny_scorer, ServerConfig(port=0, max_connection_age_s=1.0))
    try:
        with RewardClient(f"dns:///127.0.0.1:{running.port}", timeout=30) as client:
            states = _states(client)
            first = client.score([CONVERSATION])[0].score
            assert wait_until(lambda: grpc.ChannelConnectivity.READY in states, timeout=10)
            ready_at = states.index(grpc.ChannelConnectivity.READY)
            # GOAWAY after ~1 s (+-10 %): the channel leaves READY without any call failing.
            assert wait_until(lambda: any(s != grpc.ChannelConnectivity.READY for s in states[ready_at + 1:]), timeout=20), states
            assert client.score([CONVERSATION])[0].score == pytest.approx(first, abs=1e-6)
            assert states.count(grpc.ChannelConnectivity.READY) >= 2  # connected again
    finally:
        running.stop(0)


def test_connections_live_on_by_default(tiny_scorer):
    running = build_server(tiny_scorer, ServerConfig(port=0))
    try:
        with RewardClient(f"127.0.0.1:{running.port}", timeout=30) as client:
            states = _states(client)
            client.score([CONVERSATION])
            assert wait_until(lambda: grpc.ChannelConnectivity.READY in states, timeout=10)
            assert not wait_until(lambda: states[-1] != grpc.ChannelConnectivity.READY, timeout=3), states
    finally:
        running.stop(0)


@pytest.mark.parametrize("age", [0, 0.5, -1])
def test_bad_age_names_the_field(age):
    with pytest.raises(InvalidInputError, match="server.max_connection_age_s") as info:
        ServerConfig(max_connection_age_s=age)
    assert info.value.field == "server.max_connection_age_s"
