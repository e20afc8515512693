"""The client-side install fits the trainers as released, and works at its dependency floors.

1. Resolution: in a fresh virtual environment, `pip install --dry-run ".[client]" FRAMEWORK==VERSION` resolves
   (PyPI only; nothing from Hugging Face) for each framework version docs/INTEGRATIONS.md documents:
   TRL 1.16.0 and verl 0.9.1 with their own requirement lists as published; OpenRLHF 0.11.2 with the requirement
   list of its wheel (its METADATA) less flash-attn==2.8.3, an sdist whose build needs torch and CUDA
   before pip can even read its metadata (it depends on torch and einops only, neither pinned against us).
2. Floors: the generated code (rewardsvc/_proto, grpcio-tools 1.74.0) and the client run with exactly
   grpcio 1.74.0, protobuf 6.31.1 and grpcio-health-checking 1.74.0 (the floors in pyproject.toml): a fresh
   environment with only those scores against a live server, with warnings turned into errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from service_fixtures import start_server
from tiny_service import load_tiny_scorer, save_tiny_heads

pytestmark = pytest.mark.slow  # pip resolves against PyPI: about a minute per framework

ROOT = Path(__file__).resolve().parent.parent
FLOORS = ["grpcio==1.74.0", "protobuf==6.31.1", "grpcio-health-checking==1.74.0"]
NOT_RESOLVABLE_ON_CPU = {"flash-attn"}  # sdist whose metadata build needs torch + CUDA


def fresh_venv(directory: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(directory)], check=True)
    return directory / "bin" / "python"


def pip(python: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(python), "-m", "pip", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def published_requirements(python: Path, requirement: str, directory: Path) -> list[str]:
    """The Requires-Dist lines (no extras) of a release's wheel, as published on PyPI."""
    done = pip(python, "download", "--no-deps", "--only-binary=:all:", "-d", str(directory), requirement)
    assert done.returncode == 0, done.stderr[-2000:]
    [wheel] = directory.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        [metadata] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        lines = archive.read(metadata).decode().splitlines()
    return [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:") and "extra ==" not in line]


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory) -> Path:
    return fresh_venv(tmp_path_factory.mktemp("fit-venv") / "venv")


@pytest.mark.parametrize("framework", ["trl==1.16.0", "verl==0.9.1", "openrlhf==0.11.2"])
def test_client_extra_resolves_with_the_framework(venv_python, framework, tmp_path):
    if framework.startswith("openrlhf"):
        requirements = [r for r in published_requirements(venv_python, framework, tmp_path / "wheel")
                        if r.split("=")[0].split(">")[0].split("<")[0].strip().lower() not in NOT_RESOLVABLE_ON_CPU]  # fmt: skip
        assert any(r.startswith("ray[default]==") for r in requirements) and any(r.startswith("grpcio") for r in requirements)
    else:
        requirements = [framework]
    report = tmp_path / "report.json"
    done = pip(venv_python, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), ".[client]", *requirements)
    assert done.returncode == 0, f"{framework} does not resolve beside rewardsvc[client]:\n{done.stderr[-4000:]}"
    chosen = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert {"rewardsvc", "grpcio", "protobuf", "grpcio-health-checking"} <= set(chosen)
    name, _, version = framework.partition("==")
    if name != "openrlhf":
        assert chosen[name] == version
    else:  # its pins, all taken as published
        assert chosen["ray"] == "2.55.0" and chosen["transformers"] == "5.15.0"


def test_client_runs_at_the_dependency_floors(tiny_llama_dir, tmp_path):
    python = fresh_venv(tmp_path / "floors")
    done = pip(python, "install", "--quiet", *FLOORS)
    assert done.returncode == 0, done.stderr[-2000:]
    server = start_server(load_tiny_scorer(save_tiny_heads(tmp_path / "heads", tiny_llama_dir)))
    script = (
        "import grpc, google.protobuf as p; from rewardsvc.client import RewardClient\n"
        "c = RewardClient(%r); assert c.health() == 'SERVING'\n"
        "[r] = c.score([[{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]])\n"
        "print(grpc.__version__, p.__version__, r.score)\n"
    ) % f"127.0.0.1:{server.port}"
    try:
        # The repository on the path, not installed: only the floors' packages are in that environment.
        ran = subprocess.run([str(python), "-W", "error", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    finally:
        server.stop(0)
    assert ran.returncode == 0, ran.stderr[-3000:]
    grpc_version, protobuf_version, score = ran.stdout.split()
    assert (grpc_version, protobuf_version) == ("1.74.0", "6.31.1")
    assert float(score) == float(score)  # a finite number came back
