"""`rewardsvc serve` takes host and ports from the environment (how the Docker image and the Kubernetes pod pass
them); a flag wins over its variable; a bad value is an error naming the variable."""

from __future__ import annotations

import argparse

import pytest

from rewardsvc.cli.serve import add_serve_arguments, server_config
from rewardsvc.errors import InvalidInputError
from rewardsvc.serving.config import ServerConfig


def config(*argv: str) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return server_config(parser.parse_args(list(argv)))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("REWARDSVC_HOST", "REWARDSVC_PORT", "REWARDSVC_METRICS_PORT", "REWARDSVC_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def test_defaults_without_environment():
    c = config()
    assert (c.host, c.port, c.metrics_port) == (ServerConfig.host, ServerConfig.port, None)


def test_environment_sets_host_and_ports(monkeypatch):
    monkeypatch.setenv("REWARDSVC_HOST", "0.0.0.0")
    monkeypatch.setenv("REWARDSVC_PORT", "6000")
    monkeypatch.setenv("REWARDSVC_METRICS_PORT", "9100")
    c = config()
    assert (c.host, c.port, c.metrics_port) == ("0.0.0.0", 6000, 9100)
    c = config("--host", "127.0.0.1", "--port", "7000", "--metrics-port", "0")  # flags win
    assert (c.host, c.port, c.metrics_port) == ("127.0.0.1", 7000, 0)


@pytest.mark.parametrize("value", ["off", "", "none", "OFF"])
def test_metrics_can_be_switched_off(monkeypatch, value):
    monkeypatch.setenv("REWARDSVC_METRICS_PORT", value)
    assert config().metrics_port is None


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("REWARDSVC_PORT", "http", "$REWARDSVC_PORT='http' is not an integer port"),
        ("REWARDSVC_PORT", "tcp://10.0.0.1:50051", "is not an integer port"),  # a Kubernetes service link
        ("REWARDSVC_PORT", "70000", "$REWARDSVC_PORT=70000 is outside [0, 65535]"),
        ("REWARDSVC_PORT", "off", "is not an integer port"),  # only the metrics port can be off
        ("REWARDSVC_METRICS_PORT", "x", 'or "off"'),
        ("REWARDSVC_HOST", " ", "$REWARDSVC_HOST is set but empty"),
    ],
)
def test_bad_environment_names_the_variable(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidInputError) as info:
        config()
    assert message in str(info.value) and info.value.field == name
