"""Shared fixtures. Tests never touch the network: the hub is off.

tests/ mirrors the packages (model/, serving/, client/, training/, evaluation/, cli/); test modules are
imported by basename (no __init__.py), so basenames are unique across the tree. Helpers shared by several
directories live here at the top: tiny_models.py (a tiny random Llama, heads for it) and
service_fixtures.py (servers, requests, metrics). Tests that load the real embedded backbone are marked
`slow`; the unit tier is `pytest -m "not slow"`.

Skip policy (CI never passes by skipping):
- tests that read the staged data sets carry the `needs_data` marker. Without the data directory
  (`../shared/data`, or `$REWARDSVC_DATA_DIR`) they are skipped on a developer's machine; under `CI=true`
  (or `REWARDSVC_REQUIRE_DATA=1`) the run stops at once with an error naming the missing directory.
- packages that scripts/setup.sh installs are imported at the top of a test module, never importorskip'd:
  a broken install fails, it does not read as a skip.
- the summary prints the number of skips; under CI any skip other than a `gpu` test on a machine without
  CUDA fails the run (exit code 1), naming the test and its reason.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from tiny_models import build_tokenizer, save_tiny_heads, save_tiny_llama


GPU_SKIP_REASON = "needs a CUDA device"


def strict_ci() -> bool:
    """CI (GitHub Actions, GitLab, ... set CI=true) or an explicit request: missing data and skips fail."""
    truthy = ("1", "true", "yes")
    return os.environ.get("CI", "").lower() in truthy or os.environ.get("REWARDSVC_REQUIRE_DATA", "").lower() in truthy


def pytest_collection_modifyitems(config, items):
    from rewardsvc.training.data import default_data_dir

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
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason=GPU_SKIP_REASON)
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


class _SkipLedger:
    """Every skipped test with its reason; xfails are not skips (they ran and failed as expected)."""

    def __init__(self) -> None:
        self.gpu: list[str] = []
        self.other: list[tuple[str, str]] = []

    def add(self, report) -> None:
        if not report.skipped or hasattr(report, "wasxfail"):
            return
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "gpu" in report.keywords and GPU_SKIP_REASON in reason:
            self.gpu.append(report.nodeid)
        else:
            self.other.append((report.nodeid, reason))


_skips = _SkipLedger()


def pytest_runtest_logreport(report):
    _skips.add(report)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    total = len(_skips.gpu) + len(_skips.other)
    terminalreporter.write_line(f"skips: {total} ({len(_skips.gpu)} gpu on a machine without CUDA, {len(_skips.other)} other)")
    if _skips.other and strict_ci():
        terminalreporter.write_line("CI: only gpu tests may skip; these skipped, so the run fails:", red=True)
        for nodeid, reason in _skips.other:
            terminalreporter.write_line(f"  {nodeid}: {reason}", red=True)


def pytest_sessionfinish(session, exitstatus):
    if _skips.other and strict_ci() and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def chatml_tokenizer():
    return build_tokenizer("chatml")


@pytest.fixture(scope="session")
def llama3_tokenizer():
    return build_tokenizer("llama3")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), "chatml")


@pytest.fixture(scope="session")
def embedded_scorer():
    """The packaged default heads on the real embedded SmolLM2-135M backbone (loaded once per session)."""
    from rewardsvc.model.scorer import Scorer

    return Scorer.load()


@pytest.fixture(scope="session")
def tiny_scorer(tiny_llama_dir, tmp_path_factory):
    """A real Scorer over the tiny random Llama (hidden 32, attributes tiny_models.TINY_ATTRIBUTES): the small
    backend of the unit tests of scoring and serving. Small budgets so that batching is exercised."""
    from rewardsvc.config import ScorerConfig
    from rewardsvc.model.scorer import Scorer

    directory = save_tiny_heads(tmp_path_factory.mktemp("tiny-heads"), tiny_llama_dir)
    return Scorer.load(directory, config=ScorerConfig(token_budget=200, max_batch_size=5))
