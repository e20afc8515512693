"""The suite's skip policy (tests/skip_policy.py) on a throw-away suite run by pytester: without the data a
`needs_data` test skips locally and stops the run under CI naming the directory; under CI any skip other than
a gpu test fails the run, and the summary always prints the skip count."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
TESTS = Path(__file__).resolve().parent

SUITE = """
import pytest

@pytest.mark.needs_data
def test_reads_data():
    pass

@pytest.mark.gpu
def test_on_a_gpu():
    pass

@pytest.mark.xfail(reason="known")
def test_known_failure():
    assert False

def test_plain():
    pass
"""


def run(pytester, monkeypatch, *, ci: bool, data_dir, extra: str = ""):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("REWARDSVC_DATA_DIR", str(data_dir))
    monkeypatch.delenv("REWARDSVC_REQUIRE_DATA", raising=False)
    if ci:
        monkeypatch.setenv("CI", "true")
    else:
        monkeypatch.delenv("CI", raising=False)
    pytester.makeini('[pytest]\nmarkers =\n  gpu: gpu\n  needs_data: data\n')
    pytester.makepyfile(test_suite=SUITE + extra)
    return pytester.runpytest_subprocess("-p", "skip_policy", "-p", "no:cacheprovider")


@pytest.fixture
def cuda():
    import torch

    return torch.cuda.is_available()


def test_without_data_locally_the_data_tests_skip(pytester, monkeypatch, tmp_path, cuda):
    result = run(pytester, monkeypatch, ci=False, data_dir=tmp_path / "missing")
    result.assert_outcomes(passed=2 if cuda else 1, skipped=1 if cuda else 2, xfailed=1)
    assert result.ret == 0
    result.stdout.fnmatch_lines([f"skips: {1 if cuda else 2} (* gpu *, 1 other)"])


def test_without_data_under_ci_the_run_stops_naming_the_directory(pytester, monkeypatch, tmp_path):
    missing = tmp_path / "no-such-data"
    result = run(pytester, monkeypatch, ci=True, data_dir=missing)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stdout.fnmatch_lines([f"*CI: the staged data directory {missing} is missing*test_reads_data*"])
    result.assert_outcomes()  # nothing ran


def test_under_ci_only_the_gpu_skip_is_accepted(pytester, monkeypatch, tmp_path, cuda):
    result = run(pytester, monkeypatch, ci=True, data_dir=tmp_path)  # the data directory exists
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines([f"skips: {0 if cuda else 1} ({0 if cuda else 1} gpu on a machine without CUDA, 0 other)"])
    other = run(pytester, monkeypatch, ci=True, data_dir=tmp_path,
                extra="\ndef test_skips_itself():\n    pytest.skip('optional package missing')\n")  # fmt: skip
    assert other.ret == pytest.ExitCode.TESTS_FAILED
    other.stdout.fnmatch_lines(["CI: only gpu tests may skip*", "*test_skips_itself: Skipped: optional package missing"])
