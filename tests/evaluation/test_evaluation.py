"""Pairwise metrics, attribute correlations and report plots against independent computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from matplotlib import image as mpimg
from scipy import stats

from rewardsvc.evaluation.report import attribute_correlations, evaluate_pairs, write_report

# (subset, category, chosen_score, rejected_score, chosen_length, rejected_length)
HAND = [
    ("a1", "chat", 2.0, 1.0, 10, 20),    # model right, longer wrong
    ("a1", "chat", 1.0, 1.0, 30, 30),    # both ties -> 0.5 / 0.5
    ("a2", "chat", 0.0, 3.0, 50, 5),     # model wrong, longer right
    ("b1", "safety", 5.0, -1.0, 7, 7),   # model right, length tie
    ("b1", "safety", -2.0, -1.0, 1, 100),  # model wrong, longer wrong
    ("c1", None, 4.0, 3.5, 90, 80),      # uncategorized: model right, longer right
]


def records():
    return [dict(subset=s, category=c, chosen_score=cs, rejected_score=rs, chosen_length=cl, rejected_length=rl)
            for s, c, cs, rs, cl, rl in HAND]


def test_accuracy_by_hand():
    result = evaluate_pairs(records())
    assert result["overall"] == {"accuracy": pytest.approx((1 + 0.5 + 0 + 1 + 0 + 1) / 6), "n": 6}
    assert result["categories"]["chat"] == {"accuracy": pytest.approx(1.5 / 3), "n": 3}
    assert result["categories"]["safety"] == {"accuracy": pytest.approx(0.5), "n": 2}
    assert result["categories"]["uncategorized"] == {"accuracy": 1.0, "n": 1}
    assert result["subsets"]["a1"] == {"accuracy": pytest.approx(0.75), "n": 2}
    assert result["subsets"]["a2"]["accuracy"] == 0.0
    base = result["length_baseline"]
    assert base["overall"] == {"accuracy": pytest.approx((0 + 0.5 + 1 + 0.5 + 0 + 1) / 6), "n": 6}
    assert base["categories"]["chat"]["accuracy"] == pytest.approx(1.5 / 3)
    assert base["categories"]["safety"]["accuracy"] == pytest.approx(0.25)
    assert base["subsets"]["b1"] == {"accuracy": pytest.approx(0.25), "n": 2}
    assert set(result) == {"overall", "categories", "subsets", "length_baseline", "verbosity_spearman",
                           "verbosity_spearman_by_category"}
    assert set(base) == {"overall", "categories", "subsets"}
    json.dumps(result)  # JSON-able


def test_against_an_independent_computation():
    rng = np.random.default_rng(0)
    n = 400
    cs, rs = rng.normal(size=n).round(1), rng.normal(size=n).round(1)  # rounding makes real ties
    cl, rl = rng.integers(1, 50, size=n), rng.integers(1, 50, size=n)
    cats = rng.choice(["x", "y", "z"], size=n)
    recs = [dict(subset=f"s-{c}", category=c, chosen_score=float(a), rejected_score=float(b),
                 chosen_length=int(la), rejected_length=int(lb)) for c, a, b, la, lb in zip(cats, cs, rs, cl, rl)]
    result = evaluate_pairs(recs)
    assert np.any(cs == rs) and np.any(cl == rl)
    expect = np.mean(np.where(cs > rs, 1.0, np.where(cs == rs, 0.5, 0.0)))
    assert result["overall"]["accuracy"] == pytest.approx(expect)
    for c in "xyz":
        m = cats == c
        assert result["categories"][c]["accuracy"] == pytest.approx(
            np.mean(np.where(cs[m] > rs[m], 1.0, np.where(cs[m] == rs[m], 0.5, 0.0))))
        assert result["categories"][c]["n"] == int(m.sum())
    base = np.mean(np.where(cl > rl, 1.0, np.where(cl == rl, 0.5, 0.0)))
    assert result["length_baseline"]["overall"]["accuracy"] == pytest.approx(base)
    rho = stats.spearmanr(np.concatenate([cs, rs]), np.concatenate([cl, rl])).statistic
    assert result["verbosity_spearman"] == pytest.approx(rho)
    for c in "xyz":  # within each category, over its chosen and rejected responses
        m = cats == c
        rho = stats.spearmanr(np.concatenate([cs[m], rs[m]]), np.concatenate([cl[m], rl[m]])).statistic
        assert result["verbosity_spearman_by_category"][c] == pytest.approx(rho)


def test_objects_and_errors():
    class Rec:
        subset, category = "s", "c"
        chosen_score, rejected_score, chosen_length, rejected_length = 1.0, 0.0, 3, 4

    assert evaluate_pairs([Rec()])["overall"] == {"accuracy": 1.0, "n": 1}
    assert evaluate_pairs([Rec()])["verbosity_spearman"] == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        evaluate_pairs([])
    with pytest.raises(ValueError):
        evaluate_pairs([dict(category="c", chosen_score=1.0, rejected_score=float("nan"), chosen_length=1, rejected_length=1)])
    constant = [dict(category="c", chosen_score=1.0, rejected_score=1.0, chosen_length=i, rejected_length=i + 1)
                for i in range(3)]
    assert evaluate_pairs(constant)["verbosity_spearman"] is None
    assert evaluate_pairs(constant)["verbosity_spearman_by_category"] == {"c": None}


def test_attribute_correlations():
    rng = np.random.default_rng(1)
    truth = rng.integers(1, 6, size=50).astype(float)
    pred = truth + rng.normal(scale=0.7, size=50)
    recs = [{"rewards": {"helpfulness": float(p), "safety": 0.0}, "labels": {"helpfulness": float(t), "safety": None}}
            for p, t in zip(pred, truth)]
    recs[3]["labels"]["helpfulness"] = None  # missing rating: skipped
    out = attribute_correlations(recs, ["helpfulness", "safety"])
    keep = np.arange(50) != 3
    assert out["helpfulness"]["n"] == 49
    assert out["helpfulness"]["pearson"] == pytest.approx(stats.pearsonr(pred[keep], truth[keep]).statistic)
    assert out["helpfulness"]["spearman"] == pytest.approx(stats.spearmanr(pred[keep], truth[keep]).statistic)
    assert out["helpfulness"]["mse"] == pytest.approx(np.mean((pred[keep] - truth[keep]) ** 2))
    assert out["safety"] == {"pearson": None, "spearman": None, "mse": None, "n": 0}
    # stage-1 row form: ratings as top-level columns, rewards as a sequence in attribute order
    rows = [{"id": str(i), "helpfulness": float(t), "rewards": [float(p), 9.0]} for i, (p, t) in enumerate(zip(pred, truth))]
    seq = attribute_correlations(rows, ["helpfulness", "safety"])
    assert seq["helpfulness"]["n"] == 50 and seq["safety"]["n"] == 0
    json.dumps(out)


def _assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def test_write_report_writes_pngs(tmp_path):
    recs = records()
    result = evaluate_pairs(recs)
    gating = {"chat": {"helpfulness": 0.6, "safety": 0.1}, "safety": {"helpfulness": 0.2, "safety": 0.7}}
    paths = write_report(result, recs, tmp_path / "report", gating)
    assert set(paths) == {"accuracy_by_category", "score_vs_length", "gating_heatmap"}
    for path in paths.values():
        _assert_png(path)
    no_gating = write_report(result, recs, tmp_path / "r2", None)
    assert set(no_gating) == {"accuracy_by_category", "score_vs_length"}
    assert not math.isnan(result["overall"]["accuracy"])
