"""Stage 1: one ridge regression per attribute, from response embeddings to absolute ratings.

Symbols: N rows (train), M rows (validation), H hidden size, K attributes, A alphas on the grid.

What is fitted is exactly what is served: r_k = W_k . h_r + b_k.

Intercept handling (the decision, and why):
- Each attribute's labels are standardized on its labelled *training* rows (mean 0, std 1, population std),
  recorded in `label_scales`, so that original = mean + std * reward. Rewards are in standardized units,
  which makes every attribute comparable for the verbosity penalties and for the gating.
- With `fit_intercept=True` (the default recipe) X is centered on the attribute's training rows (mean mu) and
  the head gets the bias b = -W . mu, so the served r = W h + b is exactly the fitted W (h - mu). Without a bias
  (heads format version 1, and the reference format) the ridge must produce the label mean through W . mean(h),
  pulling against the penalty; on SmolLM2-135M (|mean h| = 46 vs a spread of 21 at the last layer) that cost
  ~0.02 validation Pearson on log length. `fit_intercept=False` keeps the old, bias-free fit.

Alpha: chosen per attribute as the value of the grid with the lowest validation MSE (first one on ties).
Alphas are absolute (sklearn's convention: loss ||X w - y||^2 + alpha ||w||^2), so they scale with ||h||^2.

Refit set: the train rows only, with the chosen alpha. Then the validation metrics reported describe the very
weights that are served (refitting on train+val would make them in-sample), and the alpha chosen for n_train
rows is the one used with n_train rows. Validation therefore costs ~20 % of the labels; say so if it matters.

Efficiency: one eigendecomposition (fp64) per distinct training-row mask, shared by every attribute with that
mask (attributes of one source dataset usually share it), solving all alphas at once:
- N >= H: X^T X = V diag(s) V^T, w(alpha) = V diag(1 / (s + alpha)) V^T X^T y   (primal)
- N <  H: X X^T = U diag(s) U^T, w(alpha) = X^T U diag(1 / (s + alpha)) U^T y   (dual)
Both are w(alpha) = B (c / (s + alpha)) with a basis B (H, m) and coefficients c (m,).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from ..errors import InvalidInputError

logger = logging.getLogger(__name__)

DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-3, 6, 37))
"""1e-3 .. 1e6, four values per decade (the reference: 1e-4 .. 1e4, one per decade; here each alpha is free).
Alphas are absolute and the eigenvalues of X^T X grow with N |h|^2 (~2e3 per direction for 3,000 SmolLM2 rows),
so noisy attributes can want more than 1e4; a choice at either end of the grid is logged as a warning."""

MIN_TRAIN_ROWS = 10
MIN_VAL_ROWS = 3


@dataclass(frozen=True)
class Stage1Result:
    """Regression heads and their validation quality.

    `weight` is the `regression_layer.weight` (K, H) float32, in standardized label units; `bias` (K,) float32 is
    zero when fitted without an intercept.
    `metrics[name]` holds VALIDATION `pearson`, `spearman` and `mse` on the standardized scale (val labels
    standardized with the train mean/std), plus the row counts `n_val` and `n_train`.
    """

    attributes: tuple[str, ...]
    weight: torch.Tensor  # (K, H)
    bias: torch.Tensor  # (K,)
    alphas: dict[str, float]
    label_scales: dict[str, dict[str, float]]
    metrics: dict[str, dict[str, float]]


class RidgePath:
    """Ridge solutions w(alpha) = argmin ||X w - y||^2 + alpha ||w||^2 for many alphas and targets from one
    eigendecomposition of the Gram matrix of X (N, H). No intercept."""

    def __init__(self, x: np.ndarray):
        x = np.asarray(x, dtype=np.float64)  # (N, H)
        self._x = x
        n, h = x.shape
        self.dual = n < h
        if self.dual:
            s, u = np.linalg.eigh(x @ x.T)  # (N,), (N, N)
            self._u = u
            self.basis = x.T @ u  # (H, N)
        else:
            s, v = np.linalg.eigh(x.T @ x)  # (H,), (H, H)
            self._v = v
            self.basis = v  # (H, H)
        # The Gram matrix is PSD; eigh may return tiny negative round-off that 1/(s+alpha) would amplify.
        self.eigenvalues = np.clip(s, 0.0, None)  # (m,)

    def solve(self, y: np.ndarray, alphas: Sequence[float]) -> np.ndarray:
        """Coefficients (m, A) with w(alpha_a) = basis @ coef[:, a], for every alpha at once."""
        y = np.asarray(y, dtype=np.float64)  # (N,)
        c = self._u.T @ y if self.dual else self._v.T @ (self._x.T @ y)  # (m,)
        return c[:, None] / (self.eigenvalues[:, None] + np.asarray(alphas, dtype=np.float64)[None, :])  # (m, A)

    def weights(self, y: np.ndarray, alphas: Sequence[float]) -> np.ndarray:
        """w(alpha) for each alpha: (A, H)."""
        return (self.basis @ self.solve(y, alphas)).T  # (A, H)


def fit_stage1(
    train_embeddings: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    val_embeddings: torch.Tensor | np.ndarray,
    val_labels: torch.Tensor | np.ndarray,
    attributes: Sequence[str],
    *,
    alphas: Sequence[float] | None = None,
    fit_intercept: bool = True,
) -> Stage1Result:
    """Fit one ridge head per attribute (with a bias unless fit_intercept=False); alpha per attribute by validation MSE.

    train_embeddings (N, H), train_labels (N, K) with NaN = missing; val_embeddings (M, H), val_labels (M, K).
    Raises InvalidInputError naming the attribute when it has fewer than 10 labelled train rows or 3 val rows,
    or constant training labels.
    """
    attributes = tuple(attributes)
    alpha_grid = np.asarray(sorted(DEFAULT_ALPHAS if alphas is None else alphas), dtype=np.float64)  # (A,)
    if alpha_grid.size == 0 or not np.all(np.isfinite(alpha_grid)) or np.any(alpha_grid <= 0):
        raise InvalidInputError(f"alphas must be finite and > 0, got {alpha_grid.tolist()}", field="alphas")
    x_train = _float64_matrix("train_embeddings", train_embeddings)  # (N, H)
    x_val = _float64_matrix("val_embeddings", val_embeddings)  # (M, H)
    y_train = _float64_matrix("train_labels", train_labels, allow_nan=True)  # (N, K)
    y_val = _float64_matrix("val_labels", val_labels, allow_nan=True)  # (M, K)
    _check_shapes(x_train, y_train, x_val, y_val, attributes)

    train_masks = ~np.isnan(y_train)  # (N, K)
    val_masks = ~np.isnan(y_val)  # (M, K)
    scales = {name: _label_scale(name, y_train[train_masks[:, k], k], int(val_masks[:, k].sum()))
              for k, name in enumerate(attributes)}  # fmt: skip

    # Attributes of one source dataset share their row mask, hence one decomposition. Grouping by mask keeps a
    # single one alive at a time (at H = 4096 each is ~100-170 MB of fp64).
    groups: dict[bytes, list[int]] = {}
    for k in range(len(attributes)):
        groups.setdefault(np.packbits(train_masks[:, k]).tobytes(), []).append(k)

    weights = np.empty((len(attributes), x_train.shape[1]))  # (K, H)
    biases = np.zeros(len(attributes))  # (K,)
    chosen, metrics = {}, {}
    for columns in groups.values():
        rows = x_train[train_masks[:, columns[0]]]
        mu = rows.mean(axis=0) if fit_intercept else np.zeros(rows.shape[1])  # (H,)
        path = RidgePath(rows - mu)
        for k in columns:
            name, scale = attributes[k], scales[attributes[k]]
            tm, vm = train_masks[:, k], val_masks[:, k]
            y_tr = (y_train[tm, k] - scale["mean"]) / scale["std"]  # (n_train,)
            y_va = (y_val[vm, k] - scale["mean"]) / scale["std"]  # (n_val,)
            coef = path.solve(y_tr, alpha_grid)  # (m, A)
            val_pred = ((x_val[vm] - mu) @ path.basis) @ coef  # (n_val, A), without forming A weight vectors
            val_mse = ((val_pred - y_va[:, None]) ** 2).mean(axis=0)  # (A,)
            best = int(np.argmin(val_mse))
            if best in (0, alpha_grid.size - 1) and alpha_grid.size > 1:
                logger.warning(
                    "stage 1: attribute %r chose alpha %g at the edge of the grid [%g, %g]; consider widening it",
                    name, alpha_grid[best], alpha_grid[0], alpha_grid[-1],
                )
            weights[k] = path.basis @ coef[:, best]  # (H,)
            biases[k] = -weights[k] @ mu
            pred = val_pred[:, best]  # (n_val,)
            chosen[name] = float(alpha_grid[best])
            metrics[name] = {
                "pearson": _safe_corr(stats.pearsonr, pred, y_va),
                "spearman": _safe_corr(stats.spearmanr, pred, y_va),
                "mse": float(val_mse[best]),
                "n_val": int(vm.sum()),
                "n_train": int(tm.sum()),
            }
        del path
    weight = torch.from_numpy(weights).to(torch.float32)  # (K, H)
    bias = torch.from_numpy(biases).to(torch.float32)  # (K,)
    chosen = {name: chosen[name] for name in attributes}  # attribute order, not group order
    metrics = {name: metrics[name] for name in attributes}
    return Stage1Result(attributes=attributes, weight=weight, bias=bias, alphas=chosen, label_scales=scales, metrics=metrics)


def _label_scale(name: str, labels: np.ndarray, n_val: int) -> dict[str, float]:
    """Mean and population std of an attribute's labelled training rows; errors name the attribute."""
    n_train = labels.size
    if n_train < MIN_TRAIN_ROWS or n_val < MIN_VAL_ROWS:
        raise InvalidInputError(
            f"attribute {name!r} has {n_train} labelled train rows and {n_val} labelled val rows; "
            f"stage 1 needs at least {MIN_TRAIN_ROWS} and {MIN_VAL_ROWS}",
            field=f"labels.{name}",
        )
    mean, std = float(labels.mean()), float(labels.std())
    if not std > 0:
        raise InvalidInputError(
            f"attribute {name!r} has constant training labels ({mean}); nothing to regress", field=f"labels.{name}"
        )
    return {"mean": mean, "std": std}


def _safe_corr(fn, a: np.ndarray, b: np.ndarray) -> float:
    # A constant prediction (alpha huge) has no correlation: report NaN rather than let scipy warn or raise.
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(fn(a, b)[0])


def _float64_matrix(name: str, value, *, allow_nan: bool = False) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 2:
        raise InvalidInputError(f"{name} must be 2-D, got shape {tuple(array.shape)}", field=name)
    bad = np.isinf(array) if allow_nan else ~np.isfinite(array)
    if bad.any():
        raise InvalidInputError(f"{name} has {int(bad.sum())} non-finite values", field=name)
    return array


def _check_shapes(x_train, y_train, x_val, y_val, attributes) -> None:
    if x_train.shape[0] != y_train.shape[0]:
        raise InvalidInputError(
            f"train_embeddings has {x_train.shape[0]} rows but train_labels has {y_train.shape[0]}",
            field="train_labels",
        )
    if x_val.shape[0] != y_val.shape[0]:
        raise InvalidInputError(
            f"val_embeddings has {x_val.shape[0]} rows but val_labels has {y_val.shape[0]}", field="val_labels"
        )
    if x_train.shape[1] != x_val.shape[1]:
        raise InvalidInputError(
            f"train_embeddings has H={x_train.shape[1]} but val_embeddings has H={x_val.shape[1]}",
            field="val_embeddings",
        )
    for name, labels in (("train_labels", y_train), ("val_labels", y_val)):
        if labels.shape[1] != len(attributes):
            raise InvalidInputError(
                f"{name} has {labels.shape[1]} columns but {len(attributes)} attributes were named", field=name
            )
    if len(set(attributes)) != len(attributes):
        raise InvalidInputError(f"attributes has duplicates: {attributes}", field="attributes")
