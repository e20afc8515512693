"""The length calibration's numbers against independent computations: scipy's Spearman (on replicated rows for
weights), a brute-force scan of the grid with scipy, scikit-learn's logistic regression for the Bradley-Terry fit,
planted coefficients it must recover, and the score through ArmoHeads.combine."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.linear_model import LogisticRegression

from rewardsvc.config import HeadsConfig
from rewardsvc.errors import InvalidInputError
from rewardsvc.model.heads import ArmoHeads
from rewardsvc.training.data.schema import PreferencePair
from rewardsvc.training.length_calibration import apply_length_calibration, fit_length_calibration
from rewardsvc.training.length_fit import (
    POOLED, balanced_response_weights, fit_offset_minimax, fit_offset_pairwise, fit_offsets_coordinatewise, weighted_spearman,
)
from rewardsvc.training.pair_split import PairSplit
from rewardsvc.training.stage2 import balanced_weights

GRID = np.round(np.arange(-100, 101) * 0.01, 2)


def test_weighted_spearman_is_scipys_with_unit_weights_and_with_rows_repeated():
    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    y = np.round(np.exp(x + rng.normal(size=300)) * 20)  # lengths: many ties
    assert weighted_spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    w = rng.integers(1, 5, size=300)
    repeated = stats.spearmanr(np.repeat(x, w), np.repeat(y, w)).statistic
    assert weighted_spearman(x, y, w) == pytest.approx(repeated, abs=1e-12)
    assert weighted_spearman(x, np.ones(300)) == 0.0  # a constant side: nothing to correlate
    with pytest.raises(InvalidInputError) as exc:
        weighted_spearman(x, y, -w)
    assert exc.value.field == "weights"


def test_balanced_response_weights_give_every_category_and_source_its_share():
    categories = ["chat"] * 6 + ["safety"] * 4
    sources = ["a"] * 5 + ["b"] + ["c"] * 3 + ["d"]
    w = balanced_response_weights(categories, sources)
    share = lambda mask: w[np.array(mask)].sum()  # noqa: E731
    assert share([c == "chat" for c in categories]) == pytest.approx(0.5)
    assert share([s == "a" for s in sources]) == pytest.approx(0.25) == share([s == "b" for s in sources])
    assert share([s == "d" for s in sources]) == pytest.approx(0.25)


def _planted(n: int, slope: float, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """score0 = z + slope * p with p = log length plus noise: Spearman(score0 - delta p, length) ~ 0 at delta = slope."""
    log_length = rng.normal(6, 1, size=n)
    penalty = log_length + rng.normal(0, 0.1, size=n)
    score = 0.3 * rng.normal(size=n) + slope * penalty  # small noise: rho moves fast with delta
    return score, penalty, np.round(np.exp(log_length))


def test_minimax_finds_a_planted_offset():
    rng = np.random.default_rng(1)
    score, penalty, length = _planted(4000, 0.4, rng)
    fit = fit_offset_minimax(score, penalty, length, ["chat"] * 4000, np.ones(4000), GRID)
    assert fit["delta"] == pytest.approx(0.4, abs=0.03)
    assert abs(fit["spearman"][POOLED]) < 0.02 and fit["spearman_at_zero"][POOLED] > 0.3


def test_minimax_over_two_categories_is_the_brute_force_scan_with_scipy():
    """Two equal-sized categories of one source each (so the balanced weights are all equal and scipy applies):
    one wants delta 0.2, the other 0.6; the fit is the grid value with the smallest worst |rho|."""
    rng = np.random.default_rng(2)
    a, b = _planted(500, 0.2, rng), _planted(500, 0.6, rng)
    score, penalty, length = (np.concatenate([x, y]) for x, y in zip(a, b))
    categories = ["chat"] * 500 + ["safety"] * 500
    w = balanced_response_weights(categories, categories)
    fit = fit_offset_minimax(score, penalty, length, categories, w, GRID)

    def worst(delta):
        s = score - delta * penalty
        return max(abs(stats.spearmanr(s[m], length[m]).statistic)
                   for m in (slice(None), slice(0, 500), slice(500, None)))  # fmt: skip

    scan = [worst(d) for d in GRID]
    assert fit["delta"] == GRID[int(np.argmin(scan))]
    assert 0.25 < fit["delta"] < 0.55  # between the two categories' own zeros
    assert max(abs(v) for v in fit["spearman"].values()) == pytest.approx(min(scan), abs=1e-9)
    assert fit["spearman"]["chat"] < 0 < fit["spearman"]["safety"]


def _bradley_terry_pairs(n: int, a: float, b: float, rng):
    """Two responses per pair; the first wins with P = sigmoid(a ds + b dp); oriented as (chosen, rejected)."""
    s, p = rng.normal(size=(2, n)), rng.normal(size=(2, n))
    first_wins = rng.random(n) < 1 / (1 + np.exp(-(a * (s[0] - s[1]) + b * (p[0] - p[1]))))
    sign = np.where(first_wins, 1.0, -1.0)
    return sign * (s[0] - s[1]), sign * (p[0] - p[1])


def test_pairwise_fit_recovers_a_planted_length_coefficient():
    rng = np.random.default_rng(3)
    ds, dp = _bradley_terry_pairs(20000, 2.0, -1.5, rng)
    fit = fit_offset_pairwise(ds, dp, np.ones_like(ds))
    assert fit["converged"]
    assert fit["a"] == pytest.approx(2.0, abs=4 * fit["se_a"]) and fit["b"] == pytest.approx(-1.5, abs=4 * fit["se_b"])
    assert fit["delta"] == pytest.approx(0.75, abs=0.05)


def test_pairwise_fit_is_scikit_learns_weighted_logistic_regression():
    """The same maximum: each pair also enters flipped with label 0 (the likelihood has no intercept, so this
    doubles it), weights passed as sample weights, no regularization."""
    rng = np.random.default_rng(4)
    ds, dp = _bradley_terry_pairs(3000, 1.0, 0.5, rng)
    w = rng.uniform(0.2, 3.0, size=3000)
    fit = fit_offset_pairwise(ds, dp, w)
    x = np.stack([ds, dp], 1)
    reference = LogisticRegression(fit_intercept=False, C=1e12, tol=1e-12, max_iter=10000)
    reference.fit(np.concatenate([x, -x]), np.r_[np.ones(3000), np.zeros(3000)], sample_weight=np.r_[w, w])
    np.testing.assert_allclose([fit["a"], fit["b"]], reference.coef_[0], rtol=1e-4)


def test_pairwise_fit_gives_no_offset_where_the_score_does_not_predict():
    rng = np.random.default_rng(5)
    ds, dp = _bradley_terry_pairs(2000, -1.0, 0.3, rng)
    assert fit_offset_pairwise(ds, dp, np.ones(2000))["delta"] is None
    with pytest.raises(InvalidInputError):
        fit_offset_pairwise(ds, dp[:-1], np.ones(2000))


# ---- the calibration on real heads: the penalty it fits on is what raising every lambda takes from the score ----

ATTRS = ("helpfulness", "verbosity", "safety", "preference_chat")
V = 1


def _split(n: int, rng, h: int = 8) -> PairSplit:
    pairs = [PreferencePair(id=f"p{k}", source=["ultrafeedback", "pandalm", "xstest"][k % 3],
                            prompt=[{"role": "user", "content": f"q{k}"}], chosen="x" * int(rng.integers(10, 900)),
                            rejected="y" * int(rng.integers(10, 900)), subset="s", category=["chat", "chat", "safety"][k % 3],
                            group=f"g{k}")
             for k in range(n)]  # fmt: skip
    return PairSplit(pairs, *(torch.randn(n, 1, h, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3)))


def _heads(h: int = 8) -> ArmoHeads:
    torch.manual_seed(0)
    heads = ArmoHeads(HeadsConfig(attributes=ATTRS, hidden_size=h, verbosity_attribute="verbosity", regression_bias=True,
                                  gating_hidden_dim=4))  # fmt: skip
    with torch.no_grad():
        heads.regression_layer.weight.normal_()
    return heads


@pytest.mark.parametrize("method", ["pairwise", "balanced-spearman", "per-category", "chat-spearman", "none"])
def test_every_method_fits_an_offset_that_moves_only_row_v(method):
    rng = np.random.default_rng(6)
    train, val = _split(120, rng), _split(30, rng)
    heads = _heads()
    before = heads.reward_transform_matrix.clone()
    fit = fit_length_calibration(method, heads, train, val, 0, V)
    assert torch.equal(heads.reward_transform_matrix, before)  # fitting does not apply
    apply_length_calibration(heads, V, fit)
    expected = before.clone()
    for j, name in enumerate(ATTRS):
        if j != V:
            expected[V, j] -= fit["deltas"][name] if "deltas" in fit else fit["delta"]
    torch.testing.assert_close(heads.reward_transform_matrix, expected)
    assert fit["method"] == method


def test_the_pairwise_fit_is_on_the_score_differences_that_the_served_heads_give():
    """Independent path: the pair score differences through ArmoHeads.combine at delta 0 and at delta 1 (their
    difference is the penalty difference), weighted by stage 2's balanced weights; the same Bradley-Terry fit."""
    rng = np.random.default_rng(7)
    train = _split(150, rng)
    heads = _heads()
    fit = fit_length_calibration("pairwise", heads, train, train, 0, V)

    def diffs(delta):
        h = copy.deepcopy(heads)
        apply_length_calibration(h, V, {"delta": delta})
        with torch.no_grad():
            g = h.gate(train.prompt[:, 0])
            sc, sr = (h.combine(h.rewards(x[:, 0]), g).score.double().numpy() for x in (train.chosen, train.rejected))
        return sc - sr

    ds0 = diffs(0.0)
    dp = ds0 - diffs(1.0)  # s(1) = s0 - p
    weights = balanced_weights([(p.category, p.source) for p in train.pairs]).numpy()
    reference = fit_offset_pairwise(ds0, dp, weights)
    assert fit["a"] == pytest.approx(reference["a"], rel=1e-4) and fit["b"] == pytest.approx(reference["b"], rel=1e-4, abs=1e-6)
    assert fit["delta"] == pytest.approx(-reference["b"] / reference["a"], rel=1e-4, abs=1e-6)


def test_the_train_command_offers_exactly_the_configs_methods_with_its_default():
    """`rewardsvc train --help` must not import torch, so the CLI spells the choices out; they must stay the config's."""
    import argparse

    from rewardsvc.cli.train import add_arguments
    from rewardsvc.training.train_config import LENGTH_CALIBRATIONS, TrainConfig

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    action = next(a for a in parser._actions if a.dest == "length_calibration")
    assert tuple(action.choices) == LENGTH_CALIBRATIONS and action.default == TrainConfig("o", "w").length_calibration
    with pytest.raises(InvalidInputError) as exc:
        TrainConfig("o", "w", length_calibration="zero")
    assert exc.value.field == "length_calibration"


def test_one_offset_per_category_reaches_what_one_common_offset_cannot():
    """Two categories whose penalties are separate columns want 0.2 and 0.6: one common offset leaves both off,
    the coordinatewise fit brings each near 0 (checked with scipy on the final scores)."""
    rng = np.random.default_rng(8)
    a, b = _planted(500, 0.2, rng), _planted(500, 0.6, rng)
    score, penalty, length = (np.concatenate([x, y]) for x, y in zip(a, b))
    categories = ["chat"] * 500 + ["safety"] * 500
    columns = np.zeros((1000, 2))
    columns[:500, 0], columns[500:, 1] = penalty[:500], penalty[500:]
    w = balanced_response_weights(categories, categories)
    common = fit_offset_minimax(score, penalty, length, categories, w, GRID)
    fit = fit_offsets_coordinatewise(score, columns, length, categories, w, GRID)
    assert fit["offsets"] == pytest.approx([0.2, 0.6], abs=0.03)
    final = score - columns @ np.array(fit["offsets"])
    for name, part in (("chat", slice(0, 500)), ("safety", slice(500, None))):
        assert fit["spearman"][name] == pytest.approx(stats.spearmanr(final[part], length[part]).statistic, abs=1e-9)
    assert max(map(abs, fit["spearman"].values())) < 0.05 < max(map(abs, common["spearman"].values()))


def test_per_category_offsets_follow_the_gating_in_the_served_heads():
    """Independent path: after applying the fit, score the training responses through ArmoHeads.combine and check
    the reported Spearman per category with the weighted Spearman of those scores."""
    rng = np.random.default_rng(9)
    train = _split(150, rng)
    heads = _heads()
    fit = fit_length_calibration("per-category", heads, train, train, 0, V)
    assert set(fit["category_offsets"]) == {"chat", "safety"} and set(fit["deltas"]) == set(ATTRS) - {"verbosity"}
    apply_length_calibration(heads, V, fit)
    with torch.no_grad():
        g = heads.gate(train.prompt[:, 0])
        scores = np.concatenate([heads.combine(heads.rewards(x[:, 0]), g).score.double().numpy() for x in (train.chosen, train.rejected)])
    categories = np.array([p.category for p in train.pairs] * 2)
    sources = [p.source for p in train.pairs] * 2
    lengths = np.array([len(p.chosen) for p in train.pairs] + [len(p.rejected) for p in train.pairs])
    w = balanced_response_weights(list(categories), sources)
    for name in ("chat", "safety"):
        m = categories == name
        assert fit["spearman"][name] == pytest.approx(weighted_spearman(scores[m], lengths[m], w[m]), abs=1e-5)
