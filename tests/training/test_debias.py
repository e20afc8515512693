"""Verbosity penalties checked with scipy's spearmanr per grid value, and the transform through ArmoHeads."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from scipy import stats

from rewardsvc.config import HeadsConfig
from rewardsvc.training.debias import (
    DEFAULT_GRID, DEFAULT_OFFSET_GRID, apply_length_offset, fit_length_offset, fit_verbosity_penalties,
    verbosity_transform,
)
from rewardsvc.errors import InvalidInputError
from rewardsvc.model.heads import ArmoHeads

ATTRS = ("helpfulness", "correctness", "verbosity", "safety", "style")
V = 2


def _rewards(n: int = 600, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r_v = rng.normal(size=n)
    slopes = {0: 0.8, 1: 0.3, 3: -0.4, 4: 1.7}  # positive, mild, negative (passes at 0), steep
    r = np.empty((n, len(ATTRS)))
    r[:, V] = r_v
    for j, a in slopes.items():
        r[:, j] = a * r_v + rng.normal(size=n) * 0.7
    return r


def _spearman(r: np.ndarray, j: int, lam: float) -> float:
    return stats.spearmanr(r[:, j] - lam * r[:, V], r[:, V])[0]


def test_lambda_is_the_smallest_grid_value_meeting_the_threshold():
    r = _rewards()
    lambdas, transform, report = fit_verbosity_penalties(torch.from_numpy(r), V, ATTRS, threshold=0.03)
    assert lambdas["verbosity"] == 1.0 and "verbosity" not in report
    grid = np.asarray(DEFAULT_GRID)
    for j, name in enumerate(ATTRS):
        if j == V:
            continue
        lam = lambdas[name]
        achieved = _spearman(r, j, lam)
        assert achieved <= 0.03
        assert report[name]["reached"] is True
        assert report[name]["spearman"] == pytest.approx(achieved, abs=1e-9)
        assert report[name]["spearman_at_zero"] == pytest.approx(_spearman(r, j, 0.0), abs=1e-9)
        i = int(np.flatnonzero(np.isclose(grid, lam))[0])
        if i > 0:
            assert _spearman(r, j, grid[i - 1]) > 0.03  # the previous grid value fails: minimal
    assert lambdas["safety"] == 0.0  # negatively correlated: already passes at 0
    assert lambdas["safety"] < lambdas["correctness"] < lambdas["helpfulness"] < lambdas["style"]
    assert transform.shape == (5, 5) and transform.dtype == torch.float32


def test_transform_structure_and_armo_heads_combine():
    r = _rewards(200, seed=3)
    lambdas, transform, _ = fit_verbosity_penalties(r, V, ATTRS)
    expected = torch.eye(5)
    for j, name in enumerate(ATTRS):
        expected[V, j] = 0.0 if j == V else -lambdas[name]
    torch.testing.assert_close(transform, expected, rtol=0, atol=0)
    torch.testing.assert_close(verbosity_transform(lambdas, V, ATTRS), transform, rtol=0, atol=0)

    config = HeadsConfig(attributes=ATTRS, hidden_size=8, gating_hidden_dim=8, verbosity_attribute="verbosity")
    heads = ArmoHeads(config)
    heads.reward_transform_matrix.copy_(transform)
    rewards = torch.from_numpy(r[:16]).float()  # (B, K)
    gating = torch.rand(16, 5)
    out = heads.combine(rewards, gating)
    for j, name in enumerate(ATTRS):
        want = torch.zeros(16) if j == V else rewards[:, j] - lambdas[name] * rewards[:, V]
        torch.testing.assert_close(out.debiased[:, j], want)
    torch.testing.assert_close(out.score, (gating * out.debiased).sum(-1))
    torch.testing.assert_close((out.coefficients * rewards).sum(-1), out.score)


def test_unreachable_threshold_takes_smallest_abs_spearman_and_reports_it(caplog):
    r = _rewards()
    grid = (0.0, 0.1, 0.2)  # far too short for "style" (slope 1.7)
    with caplog.at_level(logging.WARNING, logger="rewardsvc.training.debias"):
        lambdas, _, report = fit_verbosity_penalties(r, V, ATTRS, grid=grid)
    rhos = {lam: _spearman(r, 4, lam) for lam in grid}
    assert report["style"]["reached"] is False
    assert lambdas["style"] == min(rhos, key=lambda lam: abs(rhos[lam]))
    assert report["style"]["spearman"] == pytest.approx(rhos[lambdas["style"]], abs=1e-9)
    assert report["safety"]["reached"] is True and lambdas["safety"] == 0.0
    assert "'style' never reaches" in caplog.text


def test_errors_name_the_problem():
    r = _rewards(50)
    r[:, V] = 1.0
    with pytest.raises(InvalidInputError, match="'verbosity' is constant"):
        fit_verbosity_penalties(r, V, ATTRS)
    with pytest.raises(InvalidInputError, match="verbosity_index 7"):
        fit_verbosity_penalties(_rewards(50), 7, ATTRS)
    with pytest.raises(InvalidInputError, match=r"rewards must be \(N, 4\)"):
        fit_verbosity_penalties(_rewards(50), V, ATTRS[:4])


def _length_case(n: int = 400, seed: int = 1):
    """Rewards whose mixed score leans toward long responses, a gating varying per row, and true lengths."""
    rng = np.random.default_rng(seed)
    r = torch.from_numpy(_rewards(n, seed))
    length = np.exp(r[:, V].numpy() + rng.normal(size=n) * 0.3) * 200  # r_v predicts log length, with error
    gating = torch.softmax(torch.from_numpy(rng.normal(size=(n, len(ATTRS)))), dim=1) * 1.5  # sums to beta 1.5
    _, transform, _ = fit_verbosity_penalties(r, V, ATTRS, threshold=0.3)  # under-corrected on purpose
    return r, gating, transform, length


def _score_spearman(r, gating, transform, length) -> float:
    """Independent path: the score through ArmoHeads.combine, then scipy."""
    heads = ArmoHeads(HeadsConfig(attributes=ATTRS, hidden_size=4, verbosity_attribute="verbosity"))
    heads.reward_transform_matrix.copy_(transform)
    score = heads.combine(r.float(), gating.float()).score.double().numpy()
    return stats.spearmanr(score, length)[0]


def test_length_offset_minimizes_the_score_spearman_over_the_grid():
    r, gating, transform, length = _length_case()
    delta, rho, rho_zero = fit_length_offset(r, gating, transform, V, length)
    assert rho_zero == pytest.approx(_score_spearman(r, gating, transform, length), abs=1e-5)
    assert rho_zero > 0.1  # the case does lean toward length, so there is something to remove
    shifted = apply_length_offset(transform, V, delta)
    assert rho == pytest.approx(_score_spearman(r, gating, shifted, length), abs=1e-5)
    assert abs(rho) < 0.02 and delta > 0
    # No grid value does better, each scored the independent way (every 10th value, and both neighbours).
    index = DEFAULT_OFFSET_GRID.index(delta)
    for value in DEFAULT_OFFSET_GRID[::10] + DEFAULT_OFFSET_GRID[index - 1 : index + 2]:
        assert abs(_score_spearman(r, gating, apply_length_offset(transform, V, value), length)) >= abs(rho) - 1e-6


def test_apply_length_offset_raises_every_lambda_and_keeps_verbosity_out():
    _, _, transform, _ = _length_case()
    shifted = apply_length_offset(transform, V, 0.25)
    expected = transform.clone()
    for j in range(len(ATTRS)):
        if j != V:
            expected[V, j] -= 0.25
    assert torch.equal(shifted, expected) and shifted[V, V] == 0
    assert torch.equal(apply_length_offset(transform, V, 0.0), transform)


def test_length_offset_errors_name_the_field():
    r, gating, transform, length = _length_case()
    with pytest.raises(InvalidInputError) as exc:
        fit_length_offset(r, gating, transform, V, length[:-1])
    assert exc.value.field == "lengths"
    with pytest.raises(InvalidInputError) as exc:
        fit_length_offset(r, gating, transform, V, length, grid=[])
    assert exc.value.field == "grid"
