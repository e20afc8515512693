"""Structured log lines of the server: `event=... key=value ...`, one line each, grep- and parse-able."""

from __future__ import annotations

from typing import Any


def log_line(event: str, **fields: Any) -> str:
    """`event=... key=value ...` with values quoted when they hold spaces (one line, grep- and parse-able)."""
    parts = [f"event={event}"]
    for key, value in fields.items():
        text = str(value)
        if not text or any(c.isspace() or c in '"=' for c in text):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)
