"""Shared fixtures. Tests never touch the network: the hub is off.

tests/ mirrors the packages (model/, serving/, client/, training/, evaluation/, cli/); test modules are
imported by basename (no __init__.py), so basenames are unique across the tree. Helpers shared by several
directories live here at the top: tiny_models.py (a tiny random Llama, heads for it),
service_fixtures.py (servers, requests, metrics) and local_ray.py (a local Ray that survives a slow start).
Tests that load the real embedded backbone are marked `slow`; the unit tier is `pytest -m "not slow"`.

Skip policy (CI never passes by skipping; tests/skip_policy.py):
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
# `auto` on a CPU picks its plan by timing candidates at load (model/plan_measurement.py). The suite compares
# scores across configurations, so it keeps the fixed per-device rule (fp32, padded) unless a test asks for
# the measurement itself (tests/model/test_auto_plan.py); subprocesses inherit this.
os.environ.setdefault("REWARDSVC_AUTO_PLAN", "device")

import pytest

from tiny_models import build_tokenizer, save_tiny_heads, save_tiny_llama


# The skip policy (markers needs_data and gpu, the skip ledger, CI failures) is a plugin of its own, so that
# tests/test_skip_policy.py can run it on a throw-away suite.
pytest_plugins = ["skip_policy"]


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


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, tmp_path_factory):
    """A Scorer over the tiny random Llama with the default ScorerConfig, one per test module (each module's
    server owns its own): the backend of the HTTP, client and reliability tests."""
    from tiny_service import load_tiny_scorer

    return load_tiny_scorer(save_tiny_heads(tmp_path_factory.mktemp("tiny-heads"), tiny_llama_dir))


@pytest.fixture(scope="session")
def tiny_scorer(tiny_llama_dir, tmp_path_factory):
    """A real Scorer over the tiny random Llama (hidden 32, attributes tiny_models.TINY_ATTRIBUTES): the small
    backend of the unit tests of scoring and serving. Small budgets so that batching is exercised."""
    from rewardsvc.config import ScorerConfig
    from rewardsvc.model.scorer import Scorer

    directory = save_tiny_heads(tmp_path_factory.mktemp("tiny-heads"), tiny_llama_dir)
    return Scorer.load(directory, config=ScorerConfig(token_budget=200, max_batch_size=5))
