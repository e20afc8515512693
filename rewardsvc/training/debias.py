"""Verbosity debiasing: per-attribute penalties lambda_j and the transform T (K, K) with r' = r T.

Symbols: N rows of a reference set, K attributes, H hidden size, v the verbosity attribute's index.

lambda_j is the smallest value on a grid such that Spearman(r_j - lambda_j r_v, r_v) <= threshold (the reference
criterion, signed: an attribute already negatively correlated with verbosity passes at lambda 0). lambda_v = 1,
so T[v, v] = 0 and verbosity contributes nothing to the score.

Grid: 0 .. 5 in steps of 0.01 by default. Stage-1 rewards are in standardized label units, so the lambda that
removes a linear dependence is about corr(r_j, r_v) * std(r_j) / std(r_v), of order 1; 5 leaves room for heads
of very different spreads, and a step of 0.01 moves the Spearman by roughly 0.01 (below the 0.03 threshold).
The reference used a coarser 24-value grid on 0 .. 0.95 and silently set lambda = 1 when none passed; here the
value with the smallest |Spearman| is used instead and `report` says the threshold was not reached.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from scipy import stats

from ..errors import InvalidInputError

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.03
DEFAULT_GRID: tuple[float, ...] = tuple(float(x) for x in np.round(np.arange(0, 501) * 0.01, 2))
"""0.00, 0.01, ..., 5.00."""

# Grid values scanned per vectorized batch: the scan stops at the first passing value, so most attributes only
# rank a few hundred candidate columns; a chunk bounds the memory of (chunk, N) ranks.
_CHUNK = 64


def fit_verbosity_penalties(
    rewards: torch.Tensor | np.ndarray,
    verbosity_index: int,
    attributes: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
    grid: Sequence[float] | None = None,
) -> tuple[dict[str, float], torch.Tensor, dict[str, dict[str, float | bool]]]:
    """Penalties, transform and a per-attribute report from raw rewards r (N, K) of a reference set.

    Returns (lambdas, transform (K, K) float32, report) where report[name] = {"lambda", "spearman" (achieved, at
    that lambda), "spearman_at_zero", "reached" (whether spearman <= threshold)}. The verbosity attribute itself
    gets lambda 1 and is not in the report.
    """
    attributes = tuple(attributes)
    r = _rewards_matrix(rewards, len(attributes))  # (N, K)
    K = r.shape[1]
    if not 0 <= verbosity_index < K:
        raise InvalidInputError(f"verbosity_index {verbosity_index} is outside 0..{K - 1}", field="verbosity_index")
    values = np.asarray(sorted(DEFAULT_GRID if grid is None else grid), dtype=np.float64)  # (G,)
    if values.size == 0 or not np.all(np.isfinite(values)) or values[0] < 0:
        raise InvalidInputError("grid must be a non-empty list of finite values >= 0", field="grid")
    r_v = r[:, verbosity_index]  # (N,)
    verbosity_name = attributes[verbosity_index]
    if np.ptp(r_v) == 0:
        raise InvalidInputError(
            f"verbosity attribute {verbosity_name!r} is constant on the reference set; Spearman is undefined",
            field="verbosity_index",
        )
    rank_v = _centered_unit(stats.rankdata(r_v))  # (N,)

    lambdas: dict[str, float] = {}
    report: dict[str, dict[str, float | bool]] = {}
    for j, name in enumerate(attributes):
        if j == verbosity_index:
            lambdas[name] = 1.0
            continue
        lam, rho, rho0, reached = _smallest_passing(r[:, j], r_v, rank_v, values, threshold)
        lambdas[name] = lam
        report[name] = {"lambda": lam, "spearman": rho, "spearman_at_zero": rho0, "reached": reached}
        if not reached:
            logger.warning(
                "debias: attribute %r never reaches Spearman <= %g with %r on the grid [%g, %g]; using lambda %g "
                "(Spearman %.4f)", name, threshold, verbosity_name, values[0], values[-1], lam, rho,
            )
    return lambdas, verbosity_transform(lambdas, verbosity_index, attributes), report


def verbosity_transform(lambdas: dict[str, float], verbosity_index: int, attributes: Sequence[str]) -> torch.Tensor:
    """T (K, K) = I with row v set to -lambda_j (j != v) and T[v, v] = 0: r' = r T gives r'_j = r_j - lambda_j r_v
    and r'_v = 0."""
    attributes = tuple(attributes)
    transform = torch.eye(len(attributes), dtype=torch.float64)
    for j, name in enumerate(attributes):
        transform[verbosity_index, j] -= float(lambdas[name])
    transform[verbosity_index, verbosity_index] = 0.0  # lambda_v = 1 by definition, whatever the dict says
    return transform.to(torch.float32)  # (K, K)


def _smallest_passing(r_j, r_v, rank_v, values, threshold) -> tuple[float, float, float, bool]:
    """Scan the grid upward in vectorized chunks; stop at the first value whose Spearman <= threshold."""
    best_abs, best = np.inf, (float(values[0]), float("nan"))
    rho0 = float("nan")
    for start in range(0, values.size, _CHUNK):
        lam = values[start : start + _CHUNK]  # (C,)
        adjusted = r_j[None, :] - lam[:, None] * r_v[None, :]  # (C, N)
        ranks = _centered_unit(stats.rankdata(adjusted, axis=1))  # (C, N)
        rho = ranks @ rank_v  # (C,) Pearson of ranks = Spearman (average ranks on ties)
        if start == 0:
            rho0 = float(rho[0])
        passing = np.flatnonzero(rho <= threshold)
        if passing.size:
            i = int(passing[0])
            return float(lam[i]), float(rho[i]), rho0, True
        i = int(np.argmin(np.abs(rho)))
        if abs(rho[i]) < best_abs:
            best_abs, best = abs(rho[i]), (float(lam[i]), float(rho[i]))
    return best[0], best[1], rho0, False


def _centered_unit(x: np.ndarray) -> np.ndarray:
    """Center and L2-normalize along the last axis, so that a dot product of two rows is their Pearson."""
    x = x - x.mean(axis=-1, keepdims=True)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    # A constant row (r_j exactly proportional to r_v) has no rank correlation left: all zeros, Spearman 0.
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def _rewards_matrix(rewards, k: int) -> np.ndarray:
    r = rewards.detach().to("cpu", torch.float64).numpy() if isinstance(rewards, torch.Tensor) else rewards
    r = np.asarray(r, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] != k:
        raise InvalidInputError(f"rewards must be (N, {k}) for {k} attributes, got {tuple(r.shape)}", field="rewards")
    if r.shape[0] < 3:
        raise InvalidInputError(
            f"rewards needs at least 3 rows for a Spearman correlation, got {r.shape[0]}", field="rewards"
        )
    if not np.all(np.isfinite(r)):
        raise InvalidInputError("rewards has non-finite values", field="rewards")
    return r


# ---- score-level calibration: one common penalty added to every lambda_j, chosen on held-apart responses ----------

DEFAULT_OFFSET_GRID: tuple[float, ...] = tuple(float(x) for x in np.round(np.arange(-100, 101) * 0.01, 2))
"""-1.00, -0.99, ..., 1.00."""


def fit_length_offset(
    rewards: torch.Tensor,
    gating: torch.Tensor,
    transform: torch.Tensor,
    verbosity_index: int,
    lengths: Sequence[float] | np.ndarray,
    grid: Sequence[float] | None = None,
) -> tuple[float, float, float]:
    """delta (one value added to every lambda_j, j != v) such that the final score's Spearman with the response
    length is closest to 0 on a reference set: returns (delta, spearman at delta, spearman at 0).

    Why: the per-attribute lambdas are fit on the training responses and decorrelate each attribute from the
    verbosity head, but the mixed score's length dependence also comes from which attributes the gating picks,
    and it does not carry over to another mix (fit to 0.03 per attribute on the training responses, the previous
    default's score had Spearman -0.134 with length on the held-out mix). Raising every lambda_j by delta changes the score
    by -delta * r_v * sum_{j != v} g_j: a length penalty in the score itself, calibrated where the score is used,
    in the same format (only row v of T changes; `apply_length_offset`).

    rewards (N, K) raw, gating (N, K), transform (K, K), lengths (N,) of the same N responses.
    """
    r = _rewards_matrix(rewards, rewards.shape[1])
    g = gating.detach().to("cpu", torch.float64).numpy()
    t = transform.detach().to("cpu", torch.float64).numpy()
    length = np.asarray(lengths, dtype=np.float64)
    if g.shape != r.shape or length.shape != (r.shape[0],):
        raise InvalidInputError(
            f"gating {g.shape} and lengths {length.shape} must match rewards {r.shape}", field="lengths"
        )
    values = np.asarray(DEFAULT_OFFSET_GRID if grid is None else grid, dtype=np.float64)  # (G,)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise InvalidInputError("grid must be a non-empty list of finite values", field="grid")
    score = ((r @ t) * g).sum(axis=1)  # (N,) the score at delta = 0
    others = np.ones(r.shape[1], dtype=bool)
    others[verbosity_index] = False
    penalty = r[:, verbosity_index] * g[:, others].sum(axis=1)  # (N,) d score / d(-delta)
    rank_length = _centered_unit(stats.rankdata(length))
    rho = np.concatenate([
        _centered_unit(stats.rankdata(score[None, :] - values[start:start + _CHUNK, None] * penalty[None, :], axis=1))
        @ rank_length for start in range(0, values.size, _CHUNK)
    ])  # (G,)
    best = int(np.argmin(np.abs(rho) + 1e-9 * np.abs(values)))  # ties: the smallest |delta|
    rho_zero = float(_centered_unit(stats.rankdata(score)) @ rank_length)
    return float(values[best]), float(rho[best]), rho_zero


def apply_length_offset(transform: torch.Tensor, verbosity_index: int, delta: float) -> torch.Tensor:
    """T with every lambda_j (j != v) raised by delta: T[v, j] -= delta; T[v, v] stays 0."""
    out = transform.clone()
    others = torch.arange(out.shape[1]) != verbosity_index
    out[verbosity_index, others] -= float(delta)
    return out
