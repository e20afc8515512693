"""A server on a tiny random scorer (hidden size 32, built locally): fast enough for property-based and
reliability tests that send hundreds of requests on a 2-core CPU. Scores are meaningless; the checks are
about status codes, metrics, drain and shutdown."""

from __future__ import annotations

import time
from pathlib import Path

from rewardsvc.config import ScorerConfig
from rewardsvc.model.scorer import Scorer
from tiny_models import TINY_ATTRIBUTES as ATTRS  # noqa: F401  (re-exported for the tests)
from tiny_models import save_tiny_heads  # noqa: F401  (re-exported for the tests)


def load_tiny_scorer(directory: Path) -> Scorer:
    return Scorer.load(directory, config=ScorerConfig(max_tokens=256, token_budget=2048))


class SlowScorer:
    """Wraps a scorer; every scorer call first sleeps `delay_s` (a forward pass that takes a while)."""

    def __init__(self, scorer, delay_s: float):
        self._scorer, self.delay_s, self.calls = scorer, delay_s, 0

    def __getattr__(self, name):
        return getattr(self._scorer, name)

    def score_encoded(self, encoded, weights=None):
        self.calls += 1
        time.sleep(self.delay_s)
        return self._scorer.score_encoded(encoded, weights)

    def inspect_encoded(self, encoded, weights=None):
        time.sleep(self.delay_s)
        return self._scorer.inspect_encoded(encoded, weights)
