"""The command line's shape: every subcommand registered, `--help` without torch, a broken subcommand loud."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rewardsvc.cli import main as cli

SUBCOMMANDS = ("score", "inspect", "serve", "train", "eval", "eval-attributes")

PROBE = """
import json, sys
from rewardsvc.cli.main import build_parser
build_parser()
print(json.dumps(sorted(sys.modules)))
"""


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "rewardsvc.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in SUBCOMMANDS:
        assert command in out.stdout


def test_building_the_parser_loads_no_heavy_library():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120)
    modules = set(json.loads(out.stdout))
    for heavy in ("torch", "transformers", "scipy", "grpc", "safetensors"):
        assert heavy not in modules, f"building the CLI parser imported {heavy}"


def test_a_broken_subcommand_fails_loudly(monkeypatch):
    monkeypatch.setattr(cli, "EXTENSIONS", [*cli.EXTENSIONS, ("broken", "no_such_module", "a subcommand that is gone")])
    with pytest.raises(ModuleNotFoundError, match="no_such_module"):
        cli.build_parser()


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_each_subcommand_has_its_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    assert f"usage: rewardsvc {command}" in capsys.readouterr().out
