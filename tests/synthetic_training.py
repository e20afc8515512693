"""A small synthetic training set (every attribute rated, pairs in two categories) for the training tests."""

from __future__ import annotations

import random

from rewardsvc.training.data.attributes import ATTRIBUTES, VERBOSITY, make_labels
from rewardsvc.training.data.build import TrainingSets
from rewardsvc.training.data.schema import PreferencePair, RatedConversation

WORDS = "the answer explains each step with care and stays brief unless the question needs more detail".split()


def _text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def synthetic_sets(n_rated: int = 48, n_pairs: int = 24, n_eval: int = 12) -> TrainingSets:
    """Rated conversations with a rating for every attribute, and preference pairs, in two categories."""
    rng = random.Random(0)

    def rated(i: int) -> RatedConversation:
        response = _text(rng, 1, 40)
        ratings = {a.name: rng.uniform(a.low, a.high) for a in ATTRIBUTES if a.name != VERBOSITY}
        messages = [{"role": "user", "content": f"Question {i}: {_text(rng, 2, 8)}?"}, {"role": "assistant", "content": response}]
        return RatedConversation(f"r{i}", "synthetic", messages, make_labels(response, **ratings), f"r{i}")

    def pair(i: int) -> PreferencePair:
        return PreferencePair(f"p{i}", "synthetic", [{"role": "user", "content": f"Task {i}: {_text(rng, 2, 8)}."}],
                              _text(rng, 5, 30), _text(rng, 1, 20), f"subset-{i % 3}", ("chat", "safety")[i % 2],
                              f"p{i}")  # fmt: skip

    stage1 = [rated(i) for i in range(n_rated)]
    pairs = [pair(i) for i in range(n_pairs + n_eval)]
    cut, val = n_rated * 3 // 4, n_pairs * 3 // 4
    return TrainingSets(stage1[:cut], stage1[cut:], pairs[:val], pairs[val:n_pairs], pairs[n_pairs:])
