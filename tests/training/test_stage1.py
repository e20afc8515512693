"""Stage 1 ridge heads, checked against sklearn's Ridge solved directly per alpha (an independent solver)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.linear_model import Ridge

from rewardsvc.errors import InvalidInputError
from rewardsvc.training.stage1 import fit_stage1

ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3)
ATTRS = ("a", "b", "c")


def _data(n_train: int, n_val: int, h: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    # Hidden states of LLMs are far from centered: a large common offset exercises the no-intercept choice.
    offset = rng.normal(size=h) * 3
    x_train = rng.normal(size=(n_train, h)) + offset
    x_val = rng.normal(size=(n_val, h)) + offset
    w_true = rng.normal(size=(3, h)) / np.sqrt(h)
    noise = (0.1, 1.0, 3.0)  # three regimes, so the chosen alphas differ
    y_train = 4.0 + 2.0 * (x_train - offset) @ w_true.T + rng.normal(size=(n_train, 3)) * noise
    y_val = 4.0 + 2.0 * (x_val - offset) @ w_true.T + rng.normal(size=(n_val, 3)) * noise
    # "a" and "c" share a missing pattern (one decomposition, out of attribute order), "b" has its own.
    shared = rng.random(n_train) < 0.2
    y_train[shared, 0] = np.nan
    y_train[shared, 2] = np.nan
    y_train[rng.random(n_train) < 0.35, 1] = np.nan
    y_val[rng.random(n_val) < 0.2, 1] = np.nan
    return x_train, y_train, x_val, y_val


@pytest.mark.parametrize("intercept", [True, False], ids=["intercept", "no intercept"])
@pytest.mark.parametrize("n_train,h", [(160, 24), (40, 64)], ids=["primal N>H", "dual N<H"])
def test_matches_sklearn_ridge_with_masks_and_minimal_val_mse_alpha(n_train, h, intercept):
    x_train, y_train, x_val, y_val = _data(n_train, 60, h)
    result = fit_stage1(
        torch.from_numpy(x_train).float(), torch.from_numpy(y_train).float(),
        torch.from_numpy(x_val).float(), torch.from_numpy(y_val).float(), ATTRS, alphas=ALPHAS,
        fit_intercept=intercept,
    )
    assert result.weight.shape == (3, h) and result.weight.dtype == torch.float32
    assert list(result.alphas) == list(result.metrics) == list(result.label_scales) == list(ATTRS)
    xt, xv = torch.from_numpy(x_train).float().double().numpy(), torch.from_numpy(x_val).float().double().numpy()
    yt, yv = torch.from_numpy(y_train).float().double().numpy(), torch.from_numpy(y_val).float().double().numpy()
    for k, name in enumerate(ATTRS):
        tm, vm = ~np.isnan(yt[:, k]), ~np.isnan(yv[:, k])
        mean, std = yt[tm, k].mean(), yt[tm, k].std()
        assert result.label_scales[name] == pytest.approx({"mean": mean, "std": std}, rel=1e-9)
        y_tr, y_va = (yt[tm, k] - mean) / std, (yv[vm, k] - mean) / std
        val_mse = {}
        for alpha in ALPHAS:
            ref = Ridge(alpha=alpha, fit_intercept=intercept, solver="cholesky").fit(xt[tm], y_tr)
            val_mse[alpha] = np.mean((ref.predict(xv[vm]) - y_va) ** 2)
        best = min(val_mse, key=val_mse.get)
        assert result.alphas[name] == best
        ref = Ridge(alpha=best, fit_intercept=intercept, solver="cholesky").fit(xt[tm], y_tr)
        torch.testing.assert_close(result.weight[k].double(), torch.from_numpy(ref.coef_), rtol=1e-4, atol=1e-5)
        assert float(result.bias[k]) == pytest.approx(float(ref.intercept_) if intercept else 0.0, abs=1e-4)
        pred = ref.predict(xv[vm])
        m = result.metrics[name]
        assert (m["n_train"], m["n_val"]) == (int(tm.sum()), int(vm.sum()))
        assert m["mse"] == pytest.approx(val_mse[best], rel=1e-6)
        assert m["pearson"] == pytest.approx(stats.pearsonr(pred, y_va)[0], abs=1e-6)
        assert m["spearman"] == pytest.approx(stats.spearmanr(pred, y_va)[0], abs=1e-6)
    # The noisier the attribute, the more regularisation validation asks for.
    assert result.alphas["a"] <= result.alphas["c"]


@pytest.mark.parametrize("intercept", [True, False], ids=["intercept", "no intercept"])
def test_served_heads_recover_uncentered_labels_in_original_units(intercept):
    """Labels with a large mean and raw (uncentered) embeddings: original = mean + std * (W h + b) must be right."""
    x_train, y_train, x_val, y_val = _data(400, 200, 16, seed=1)
    y_train, y_val = 100.0 + 10 * y_train, 100.0 + 10 * y_val  # far from 0: an unhandled intercept would show
    result = fit_stage1(x_train, y_train, x_val, y_val, ATTRS, alphas=ALPHAS, fit_intercept=intercept)
    k = 0
    scale = result.label_scales["a"]
    reward = x_val @ result.weight[k].double().numpy() + float(result.bias[k])  # what the served head outputs
    original = scale["mean"] + scale["std"] * reward
    vm = ~np.isnan(y_val[:, k])
    assert abs(original[vm].mean() - y_val[vm, k].mean()) < 0.05 * y_val[vm, k].std()
    assert np.sqrt(np.mean((original[vm] - y_val[vm, k]) ** 2)) < 0.2 * y_val[vm, k].std()
    assert result.metrics["a"]["pearson"] > 0.95


def test_too_few_labelled_rows_names_attribute_and_counts():
    x_train, y_train, x_val, y_val = _data(60, 20, 8)
    y_train[5:, 1] = np.nan  # 5 labelled train rows at most for "b"
    with pytest.raises(InvalidInputError, match=r"'b' has \d train rows|'b' has [0-5] labelled train rows") as info:
        fit_stage1(x_train, y_train, x_val, y_val, ATTRS, alphas=ALPHAS)
    assert info.value.field == "labels.b"
    x_train, y_train, x_val, y_val = _data(60, 20, 8)
    y_val[2:, 2] = np.nan
    with pytest.raises(InvalidInputError, match=r"'c' has \d+ labelled train rows and [0-2] labelled val rows"):
        fit_stage1(x_train, y_train, x_val, y_val, ATTRS, alphas=ALPHAS)


def test_constant_labels_and_shape_mismatches_are_named():
    x_train, y_train, x_val, y_val = _data(60, 20, 8)
    y_train[:, 0] = 3.0
    with pytest.raises(InvalidInputError, match="'a' has constant training labels"):
        fit_stage1(x_train, y_train, x_val, y_val, ATTRS)
    x_train, y_train, x_val, y_val = _data(60, 20, 8)
    with pytest.raises(InvalidInputError, match="3 columns but 2 attributes"):
        fit_stage1(x_train, y_train, x_val, y_val, ("a", "b"))
    with pytest.raises(InvalidInputError, match="60 rows but train_labels has 59"):
        fit_stage1(x_train, y_train[:59], x_val, y_val, ATTRS)
    with pytest.raises(InvalidInputError, match="alphas must be finite and > 0"):
        fit_stage1(x_train, y_train, x_val, y_val, ATTRS, alphas=(0.0, 1.0))
