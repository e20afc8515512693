"""The skip policy of the test suite, a pytest plugin loaded by tests/conftest.py: CI never passes by skipping.

- `needs_data` tests read the staged data sets (`../shared/data`, or `$REWARDSVC_DATA_DIR`). Without the
  directory they are skipped on a developer's machine; under `CI=true` (or `REWARDSVC_REQUIRE_DATA=1`) the run
  stops before any test with an error naming the missing directory.
- `gpu` tests are skipped on a machine without CUDA (the one skip CI accepts).
- the terminal summary prints the number of skips; under CI any other skip fails the run (exit code 1) and is
  listed with its reason. An xfail is not a skip.
"""

from __future__ import annotations

import os

import pytest

GPU_SKIP_REASON = "needs a CUDA device"


def strict_ci() -> bool:
    """CI (GitHub Actions, GitLab, ... set CI=true) or an explicit request: missing data and skips fail."""
    truthy = ("1", "true", "yes")
    return os.environ.get("CI", "").lower() in truthy or os.environ.get("REWARDSVC_REQUIRE_DATA", "").lower() in truthy


def pytest_collection_modifyitems(config, items):
    from rewardsvc.training.data.files import default_data_dir

    data_dir = default_data_dir()
    needs_data = [item for item in items if "needs_data" in item.keywords]
    if needs_data and not data_dir.is_dir():
        if strict_ci():
            pytest.exit(
                f"CI: the staged data directory {data_dir} is missing, and {len(needs_data)} selected tests need it "
                f"(e.g. {needs_data[0].nodeid}). CI never skips them: stage the data at ../shared/data beside the "
                f"repository or set REWARDSVC_DATA_DIR.",
                returncode=pytest.ExitCode.USAGE_ERROR,
            )
        skip_data = pytest.mark.skip(reason=f"staged data not found at {data_dir} (set REWARDSVC_DATA_DIR to run these tests)")
        for item in needs_data:
            item.add_marker(skip_data)
    gpu = [item for item in items if "gpu" in item.keywords]
    if gpu and not _cuda_available():  # torch is imported only when a gpu test is selected
        skip_gpu = pytest.mark.skip(reason=GPU_SKIP_REASON)
        for item in gpu:
            item.add_marker(skip_gpu)


class SkipLedger:
    """Every skipped test with its reason, for one session (registered per config, so that a pytest run inside a
    test keeps its own); xfails are not skips (they ran and failed as expected)."""

    def __init__(self) -> None:
        self.gpu: list[str] = []
        self.other: list[tuple[str, str]] = []

    def pytest_runtest_logreport(self, report) -> None:
        if not report.skipped or hasattr(report, "wasxfail"):
            return
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "gpu" in report.keywords and GPU_SKIP_REASON in reason:
            self.gpu.append(report.nodeid)
        else:
            self.other.append((report.nodeid, reason))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        total = len(self.gpu) + len(self.other)
        terminalreporter.write_line(f"skips: {total} ({len(self.gpu)} gpu on a machine without CUDA, {len(self.other)} other)")
        if self.other and strict_ci():
            terminalreporter.write_line("CI: only gpu tests may skip; these skipped, so the run fails:", red=True)
            for nodeid, reason in self.other:
                terminalreporter.write_line(f"  {nodeid}: {reason}", red=True)

    def pytest_sessionfinish(self, session, exitstatus) -> None:
        if self.other and strict_ci() and exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config) -> None:
    config.pluginmanager.register(SkipLedger(), "rewardsvc-skip-ledger")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
