"""Settings read from the environment (containers and Kubernetes pass ports as variables). A flag given on the
command line wins over its variable; a variable that does not parse is an error naming the variable."""

from __future__ import annotations

import os

from ..errors import InvalidInputError

HOST_ENV = "REWARDSVC_HOST"
PORT_ENV = "REWARDSVC_PORT"
METRICS_PORT_ENV = "REWARDSVC_METRICS_PORT"
OFF = ("", "off", "none")


def env_port(name: str, default: int | None, *, allow_off: bool = False) -> int | None:
    """The port in $name, else `default`. With allow_off, "off" / "none" / "" mean no port (None)."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    text = raw.strip()
    if allow_off and text.lower() in OFF:
        return None
    try:
        value = int(text)
    except ValueError:
        expected = "an integer port in [0, 65535]" + (' or "off"' if allow_off else "")
        raise InvalidInputError(f"${name}={raw!r} is not {expected}", field=name) from None
    if not 0 <= value <= 65535:
        raise InvalidInputError(f"${name}={value} is outside [0, 65535]", field=name)
    return value


def env_host(name: str, default: str) -> str:
    raw = os.environ.get(name)
    if raw is None:
        return default
    if not raw.strip():
        raise InvalidInputError(f"${name} is set but empty; unset it or give an address", field=name)
    return raw.strip()
