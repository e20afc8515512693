"""Fixtures shared by the integration tests: a tiny random scorer and a real server on loopback for it
(metrics on, so tests can count RPCs), one of each per test module."""

from __future__ import annotations

import pytest

from service_fixtures import start_server


@pytest.fixture(scope="module")
def server(tiny):
    running = start_server(tiny, metrics_port=0)
    yield running
    running.stop(0)
