"""Fixtures shared by the integration tests: a tiny random scorer and a real server on loopback for it
(metrics on, so tests can count RPCs), one of each per test module."""

from __future__ import annotations

import pytest

from service_fixtures import start_server
from tiny_service import load_tiny_scorer, save_tiny_heads


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, tmp_path_factory):
    return load_tiny_scorer(save_tiny_heads(tmp_path_factory.mktemp("tiny-heads"), tiny_llama_dir))


@pytest.fixture(scope="module")
def server(tiny):
    running = start_server(tiny, metrics_port=0)
    yield running
    running.stop(0)
