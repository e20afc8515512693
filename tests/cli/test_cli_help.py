"""The command line's shape: every subcommand registered, `--help` without torch, a broken subcommand loud."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rewardsvc.cli import main as cli

SUBCOMMANDS = ("score", "inspect", "compare", "serve", "train", "eval", "eval-attributes")

PROBE = """
import json, sys
from rewardsvc.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)))
"""


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "rewardsvc.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in SUBCOMMANDS:
        assert command in out.stdout


@pytest.mark.parametrize("argv", [["--help"], ["score", "--help"], ["compare", "--help"], ["inspect", "--help"]])
def test_help_loads_no_heavy_library(argv):
    """`--help` must answer in well under a second: it may not import torch & co (checked by what is
    imported, not by a timing)."""
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=True, timeout=120)
    modules = set(json.loads(out.stdout.splitlines()[-1]))
    for heavy in ("torch", "transformers", "scipy", "grpc", "safetensors", "pyarrow", "matplotlib", "numpy", "tqdm"):
        assert heavy not in modules, f"rewardsvc {' '.join(argv)} imported {heavy}"
    assert "rewardsvc.training.data" not in modules  # the data adapters cost --help 0.4 s


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


@pytest.mark.parametrize("command, shown", [
    ("score", '"prompt": str | messages, "response": str'),
    ("compare", '"chosen": str | messages, "rejected": str | messages'),
    ("inspect", "a JSON list of messages ending with a user message"),
    ("eval", '"subset"?, "category"?'),
    ("eval-attributes", "<attribute>: rating | null"),
    ("train", "--data-dir"),
    ("serve", "rewardsvc.v1.RewardService"),
])  # fmt: skip
def test_each_subcommand_help_shows_its_input_format(command, shown, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert shown in capsys.readouterr().out


def test_a_wrong_flag_shows_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["score", "in.jsonl", "--chunksize", "3"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.startswith("usage: rewardsvc score") and "unrecognized arguments: --chunksize 3" in err, err
