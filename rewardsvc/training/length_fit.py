"""The numbers behind the length calibration (pure numpy): weighted Spearman, and the two ways to choose the
common offset delta on the verbosity penalties.

Symbols: N responses (or pairs), G grid values. The score at offset delta is s(delta) = s0 - delta * p, where
p = r_v * sum_{j != v} g_j is what raising every lambda_j by delta takes away (debias.apply_length_offset).

- `fit_offset_minimax`: the delta whose worst |Spearman(s(delta), length)| over groups of responses (categories,
  and all of them pooled) is smallest, each group weighted so that every source in it counts the same.
- `fit_offset_pairwise`: Bradley-Terry on preference pairs, logit P(chosen wins) = a * (s0_c - s0_r) + b * (p_c - p_r),
  fit by weighted maximum likelihood; delta = -b / a is the length penalty the preferences support, whatever
  correlation with length it leaves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InvalidInputError

POOLED = "all"
"""The group name of every reference response together (its weights balance the categories too)."""


def weighted_ranks(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mid-ranks in cumulative weight: a value's rank is the weight below it plus half its own (tied values share
    the mid-rank of their tie group). With unit weights this is the ordinary average rank minus 1/2."""
    order = np.argsort(x, kind="stable")
    xs, ws = x[order], w[order]
    group = np.cumsum(np.r_[True, xs[1:] != xs[:-1]]) - 1  # (N,) tie group of each sorted value
    group_weight = np.bincount(group, weights=ws)
    mid = np.cumsum(group_weight) - group_weight / 2
    ranks = np.empty(x.shape[0], dtype=np.float64)
    ranks[order] = mid[group]
    return ranks


def weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """Pearson correlation with row weights; 0 where a side is constant (nothing to correlate)."""
    w = w / w.sum()
    dx, dy = x - w @ x, y - w @ y
    denominator = np.sqrt((w @ (dx * dx)) * (w @ (dy * dy)))
    return float((w @ (dx * dy)) / denominator) if denominator > 0 else 0.0


def weighted_spearman(x, y, w=None) -> float:
    """Spearman's rho with row weights: the weighted Pearson of weighted mid-ranks. Integer weights give exactly
    scipy's Spearman of the data with each row repeated that many times; unit weights give scipy's Spearman."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    w = np.ones_like(x) if w is None else np.asarray(w, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.shape != w.shape or x.size < 2:
        raise InvalidInputError(f"x {x.shape}, y {y.shape} and w {w.shape} must be one (N,) shape, N >= 2", field="lengths")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(np.isfinite(w))) or np.any(w < 0) or not w.sum() > 0:
        raise InvalidInputError("x, y must be finite and w finite, >= 0 and not all 0", field="weights")
    return weighted_pearson(weighted_ranks(x, w), weighted_ranks(y, w), w)


def balanced_response_weights(categories: Sequence[str], sources: Sequence[str]) -> np.ndarray:
    """(N,) weights: every category weighs the same in all, and within a category every source the same
    (stage 2's balanced sampling, training.stage2.balanced_weights, applied to responses)."""
    count: dict[tuple[str, str], int] = {}
    sources_of: dict[str, set[str]] = {}
    for c, s in zip(categories, sources):
        count[(c, s)] = count.get((c, s), 0) + 1
        sources_of.setdefault(c, set()).add(s)
    return np.array([1.0 / (len(sources_of) * len(sources_of[c]) * count[(c, s)]) for c, s in zip(categories, sources)])


def offset_spearman(score, penalty, lengths, weights, groups: Mapping[str, np.ndarray], grid) -> dict[str, np.ndarray]:
    """Per group (name -> boolean mask (N,)): the weighted Spearman of s(delta) with length at every grid value (G,)."""
    score, penalty = np.asarray(score, np.float64), np.asarray(penalty, np.float64)
    lengths, weights = np.asarray(lengths, np.float64), np.asarray(weights, np.float64)
    out = {}
    for name, mask in groups.items():
        w = weights[mask]
        rank_length = weighted_ranks(lengths[mask], w)
        out[name] = np.array([weighted_pearson(weighted_ranks(score[mask] - d * penalty[mask], w), rank_length, w)
                              for d in grid])  # fmt: skip
    return out


def fit_offset_minimax(score, penalty, lengths, categories: Sequence[str], weights, grid: Sequence[float]) -> dict[str, Any]:
    """The grid value delta minimising max |rho| over the categories and all responses pooled (ties: smallest
    |delta|). Returns {"delta", "spearman": {group: rho at delta}, "spearman_at_zero": {group: rho at 0}}."""
    score = np.asarray(score, np.float64)
    n = score.shape[0]
    categories = np.asarray(list(categories), dtype=object)
    values = np.asarray(grid, dtype=np.float64)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise InvalidInputError("grid must be a non-empty list of finite values", field="grid")
    for name, a in (("penalty", penalty), ("lengths", lengths), ("weights", weights), ("categories", categories)):
        if np.shape(a) != (n,):
            raise InvalidInputError(f"{name} must have one value per response ({n}), got {np.shape(a)}", field=name)
    if n < 3 or not np.all(np.isfinite(score)) or not np.all(np.isfinite(np.asarray(penalty, np.float64))):
        raise InvalidInputError(f"the reference needs >= 3 responses with finite scores, got {n}", field="length_reference")
    groups = {POOLED: np.ones(n, dtype=bool)}
    groups.update({str(c): categories == c for c in sorted(set(categories))})
    groups = {k: m for k, m in groups.items() if m.sum() >= 3}
    rho = offset_spearman(score, penalty, lengths, weights, groups, values)  # {group: (G,)}
    worst = np.max(np.abs(np.stack(list(rho.values()))), axis=0)  # (G,)
    best = int(np.argmin(worst + 1e-9 * np.abs(values)))
    at_zero = offset_spearman(score, penalty, lengths, weights, groups, [0.0])
    return {"delta": float(values[best]), "spearman": {k: float(v[best]) for k, v in rho.items()},
            "spearman_at_zero": {k: float(v[0]) for k, v in at_zero.items()}}  # fmt: skip


def fit_offset_pairwise(score_diff, penalty_diff, weights, max_iter: int = 100) -> dict[str, Any]:
    """Weighted Bradley-Terry with two regressors and no intercept: maximise sum_i w_i log sigmoid(a ds_i + b dp_i),
    ds = s0_chosen - s0_rejected, dp = p_chosen - p_rejected (Newton's method; the log-likelihood is concave).

    a scales the score, b is the weight the preferences give to p; s(delta) = s0 - delta p with delta = -b / a
    gives the same ranking as a * s0 + b * p. Returns {"delta", "a", "b", "se_a", "se_b", "pairs",
    "converged"}; delta is None where a <= 0 (the score does not predict the preferences: no penalty follows).
    """
    ds, dp = np.asarray(score_diff, np.float64), np.asarray(penalty_diff, np.float64)
    w = np.asarray(weights, np.float64)
    if ds.ndim != 1 or ds.shape != dp.shape or ds.shape != w.shape or ds.size < 2:
        raise InvalidInputError(f"score_diff {ds.shape}, penalty_diff {dp.shape}, weights {w.shape}: one (N,) shape, N >= 2",
                                field="pairs")  # fmt: skip
    if not (np.all(np.isfinite(ds)) and np.all(np.isfinite(dp)) and np.all(np.isfinite(w))) or np.any(w < 0) or not w.sum() > 0:
        raise InvalidInputError("pair differences must be finite, weights finite, >= 0 and not all 0", field="pairs")
    w = w * (w.size / w.sum())  # mean weight 1: the standard errors read as if each pair counted once
    x = np.stack([ds, dp], axis=1)  # (N, 2)
    beta = np.zeros(2)
    converged = False
    for _ in range(max_iter):
        margin = x @ beta
        p = 1.0 / (1.0 + np.exp(-margin))  # P(chosen wins)
        gradient = x.T @ (w * (1.0 - p))
        hessian = (x * (w * p * (1.0 - p))[:, None]).T @ x  # minus the second derivative
        step = np.linalg.solve(hessian + 1e-12 * np.eye(2), gradient)
        beta = beta + step
        if np.max(np.abs(step)) < 1e-10 * (1 + np.max(np.abs(beta))):
            converged = True
            break
    margin = x @ beta
    p = 1.0 / (1.0 + np.exp(-margin))
    covariance = np.linalg.pinv((x * (w * p * (1.0 - p))[:, None]).T @ x)
    a, b = float(beta[0]), float(beta[1])
    return {"delta": -b / a if a > 0 else None, "a": a, "b": b, "se_a": float(np.sqrt(covariance[0, 0])),
            "se_b": float(np.sqrt(covariance[1, 1])), "pairs": int(ds.size), "converged": converged}  # fmt: skip


def fit_offsets_coordinatewise(score, penalties, lengths, categories: Sequence[str], weights, grid: Sequence[float],
                               sweeps: int = 8) -> dict[str, Any]:  # fmt: skip
    """Several offsets d (C,), s(d) = s0 - penalties @ d with penalties (N, C): coordinate descent over the grid,
    each step the value of one d_c that minimises max |rho| over the categories and all responses pooled (weighted
    as in `fit_offset_minimax`), plus 1e-3 times the sum of squares. Returns {"offsets" (C,), "spearman", "spearman_at_zero", "sweeps"}."""
    score, penalties = np.asarray(score, np.float64), np.asarray(penalties, np.float64)
    n, c_count = penalties.shape
    categories = np.asarray(list(categories), dtype=object)
    values = np.asarray(grid, dtype=np.float64)
    if score.shape != (n,) or np.shape(lengths) != (n,) or np.shape(weights) != (n,) or categories.shape != (n,):
        raise InvalidInputError(f"score, lengths, weights and categories must have one value per response ({n})", field="lengths")
    groups = {POOLED: np.ones(n, dtype=bool)}
    groups.update({str(c): categories == c for c in sorted(set(categories))})
    groups = {k: m for k, m in groups.items() if m.sum() >= 3}
    d = np.zeros(c_count)
    done = 0
    for done in range(1, sweeps + 1):
        before = d.copy()
        for c in range(c_count):
            rest = score - penalties @ d + penalties[:, c] * d[c]  # the score without offset c
            rho = np.stack(list(offset_spearman(rest, penalties[:, c], lengths, weights, groups, values).values()))
            # The worst |rho| first; where another offset's category holds the worst fixed, the sum of squares
            # still says which value of this one helps (a pure max would leave it anywhere).
            key = np.max(np.abs(rho), axis=0) + 1e-3 * np.sum(rho * rho, axis=0) + 1e-9 * np.abs(values)
            d[c] = values[int(np.argmin(key))]
        if np.array_equal(before, d):
            break
    final = offset_spearman(score - penalties @ d, np.zeros(n), lengths, weights, groups, [0.0])
    at_zero = offset_spearman(score, np.zeros(n), lengths, weights, groups, [0.0])
    return {"offsets": d.tolist(), "spearman": {k: float(v[0]) for k, v in final.items()},
            "spearman_at_zero": {k: float(v[0]) for k, v in at_zero.items()}, "sweeps": done}  # fmt: skip
