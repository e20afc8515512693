"""The result maths of rewardsvc.types, against independent computations (statistics, the logistic function)."""

from __future__ import annotations

import math
import statistics

import pytest

from rewardsvc.errors import InvalidInputError
from rewardsvc.types import AttributeWeights, CompareResult, GroupResult, ScoreResult, sigmoid


def result(score: float) -> ScoreResult:
    return ScoreResult(score=score, rewards={}, gating={}, coefficients={}, num_tokens=3, truncated=False,
                       weights_source="gating", model_id="m")  # fmt: skip


def test_group_statistics_match_the_statistics_module():
    scores = [0.5, -1.25, 2.0, 0.5, 3.75]
    group = GroupResult.of([result(s) for s in scores])
    assert group.mean == pytest.approx(statistics.fmean(scores))
    assert group.std == pytest.approx(statistics.stdev(scores))  # ddof=1, as TRL's GRPO
    assert group.ranks == [3, 5, 2, 4, 1]  # ties (the two 0.5) by position
    assert group.scores == scores
    single = GroupResult.of([result(1.5)])
    assert (single.mean, single.std, single.ranks) == (1.5, 0.0, [1])
    assert GroupResult.of([]) == GroupResult(results=[], mean=0.0, std=0.0, ranks=[])


def test_compare_is_the_logistic_of_the_margin_without_overflow():
    chosen, rejected = result(1.0), result(-0.5)
    pair = CompareResult.of(chosen, rejected)
    assert pair.p_chosen == pytest.approx(1 / (1 + math.exp(-1.5)))
    assert (pair.score_chosen, pair.score_rejected, pair.chosen, pair.rejected) == (1.0, -0.5, chosen, rejected)
    assert sigmoid(-800.0) == 0.0 and sigmoid(800.0) == 1.0  # math.exp(800) would overflow
    assert sigmoid(-3.0) == pytest.approx(1 - sigmoid(3.0))


def test_weights_coercion_is_one_function():
    assert AttributeWeights.of(None) is None
    w = AttributeWeights("mask", {"a": 0.0})
    assert AttributeWeights.of(w) is w
    assert AttributeWeights.of({"mode": "override", "values": {"a": 2}}) == AttributeWeights("override", {"a": 2})
    assert AttributeWeights.of({"mode": "mask"}) == AttributeWeights("mask", {})
    with pytest.raises(InvalidInputError, match="weights must be") as err:
        AttributeWeights.of({"values": {"a": 1}})
    assert err.value.field == "weights"
    with pytest.raises(InvalidInputError, match="weights.mode"):
        AttributeWeights.of({"mode": "boost"})
