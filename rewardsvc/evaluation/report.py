"""Metrics and plots for evaluating a reward model on preference pairs and rated responses.

Pure functions over already-scored records: no model, no I/O except `write_report`.

Pairwise record (one per pair): `subset`, `category`, `chosen_score`, `rejected_score`,
`chosen_length`, `rejected_length` (tokens or characters: the caller's choice). Records are
mappings or objects with those attributes.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

UNCATEGORIZED = "uncategorized"


def _get(record: Any, name: str, default: Any = None) -> Any:
    if isinstance(record, Mapping):
        return record.get(name, default)
    return getattr(record, name, default)


def _number(record: Any, name: str) -> float:
    value = _get(record, name)
    if value is None:
        raise ValueError(f"record is missing {name!r}: {record!r:.200}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"record has a non-finite {name}={value}")
    return value


def pair_outcome(preferred: float, other: float) -> float:
    """1 if `preferred` is higher, 0.5 on a tie, 0 otherwise."""
    return 1.0 if preferred > other else 0.5 if preferred == other else 0.0


def pair_outcomes(margins) -> np.ndarray:
    """`pair_outcome` of many pairs at once, from their margins (preferred - other; any array shape): 1 where the
    margin is positive, 0.5 where it is 0, 0 otherwise."""
    m = np.asarray(margins, dtype=np.float64)
    return (m > 0) + 0.5 * (m == 0)


def _group_accuracy(outcomes: Sequence[float], keys: Sequence[str]) -> dict[str, dict[str, float | int]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for key, outcome in zip(keys, outcomes):
        groups[key].append(outcome)
    return {key: {"accuracy": float(np.mean(v)), "n": len(v)} for key, v in sorted(groups.items())}


def _accuracy_block(outcomes: Sequence[float], categories: Sequence[str], subsets: Sequence[str]) -> dict:
    return {
        "overall": {"accuracy": float(np.mean(outcomes)), "n": len(outcomes)},
        "categories": _group_accuracy(outcomes, categories),
        "subsets": _group_accuracy(outcomes, subsets),
    }


def _spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho, or None where it is undefined (fewer than 2 points, or a constant side)."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(stats.spearmanr(x, y).statistic)


def _pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(stats.pearsonr(x, y).statistic)


def evaluate_pairs(records: Iterable[Any]) -> dict:
    """Pairwise accuracy overall / per category / per subset, the same for the "longer response
    wins" baseline, and the Spearman correlation between score and length.

    Returns (JSON-able):
        {"overall": {"accuracy", "n"}, "categories": {name: {"accuracy", "n"}},
         "subsets": {name: {"accuracy", "n"}},
         "length_baseline": {"overall", "categories", "subsets"}  (same shapes),
         "verbosity_spearman": float,
         "verbosity_spearman_by_category": {category: float | None},
         "gating_by_category": {category: {attribute: mean weight}}  (only when every record has `gating`)}
    Ties count 0.5 (scores and lengths alike). "overall" is the mean over pairs (micro).
    Missing category/subset -> "uncategorized". verbosity_spearman pools every scored response
    (chosen and rejected); it is None only when undefined (a constant score or length). Per category the same
    over that category's responses: a mix can be flat in length while each category is not.
    Raises ValueError on no records or a missing / non-finite score or length.
    """
    records = list(records)
    if not records:
        raise ValueError("evaluate_pairs needs at least one record")
    categories = [str(_get(r, "category") or UNCATEGORIZED) for r in records]
    subsets = [str(_get(r, "subset") or UNCATEGORIZED) for r in records]
    chosen = [_number(r, "chosen_score") for r in records]
    rejected = [_number(r, "rejected_score") for r in records]
    chosen_len = [_number(r, "chosen_length") for r in records]
    rejected_len = [_number(r, "rejected_length") for r in records]

    model = [pair_outcome(c, r) for c, r in zip(chosen, rejected)]
    longer = [pair_outcome(c, r) for c, r in zip(chosen_len, rejected_len)]
    result = _accuracy_block(model, categories, subsets)
    result["length_baseline"] = _accuracy_block(longer, categories, subsets)
    result["verbosity_spearman"] = _spearman(chosen + rejected, chosen_len + rejected_len)
    result["verbosity_spearman_by_category"] = {
        c: _spearman([chosen[i] for i in idx] + [rejected[i] for i in idx], [chosen_len[i] for i in idx] + [rejected_len[i] for i in idx])
        for c, idx in sorted(_indices_by(categories).items())
    }  # fmt: skip
    if all(_get(r, "gating") for r in records):
        result["gating_by_category"] = mean_gating_by_category(records, categories)
    return result


def _indices_by(keys: Sequence[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    return groups


def mean_gating_by_category(records: Sequence[Any], categories: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean gating weight of every attribute over the records of each category (records carry `gating`)."""
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, int] = defaultdict(int)
    for record, category in zip(records, categories):
        counts[category] += 1
        for name, value in _get(record, "gating").items():
            sums[category][name] += float(value)
    return {c: {n: v / counts[c] for n, v in attrs.items()} for c, attrs in sorted(sums.items())}


def _rating(record: Any, name: str) -> float | None:
    labels = _get(record, "labels")
    value = labels.get(name) if isinstance(labels, Mapping) else _get(record, name)
    return None if value is None else float(value)


def _predicted(record: Any, name: str, index: int) -> float | None:
    rewards = _get(record, "rewards")
    if rewards is None:
        raise ValueError(f"record has no 'rewards': {record!r:.200}")
    if isinstance(rewards, Mapping):
        value = rewards.get(name)
    else:
        value = rewards[index] if index < len(rewards) else None
    return None if value is None else float(value)


def attribute_correlations(records: Iterable[Any], attribute_names: Sequence[str]) -> dict:
    """Per attribute: Pearson, Spearman and MSE between predicted reward and rating, and n.

    Each record holds `rewards` (attribute -> predicted reward, or a sequence in
    `attribute_names` order) and ratings, either under `labels` (attribute -> rating) or as
    top-level columns (the stage-1 JSONL row form). Records whose rating (or prediction) is
    missing/None are skipped for that attribute. Correlations are None when undefined (n < 2
    or a constant side); MSE is None when n == 0.
    Returns {name: {"pearson", "spearman", "mse", "n"}}.
    """
    records = list(records)
    out = {}
    for index, name in enumerate(attribute_names):
        pred, true = [], []
        for record in records:
            rating, reward = _rating(record, name), _predicted(record, name, index)
            if rating is None or reward is None or not (math.isfinite(rating) and math.isfinite(reward)):
                continue
            pred.append(reward)
            true.append(rating)
        out[name] = {
            "pearson": _pearson(pred, true),
            "spearman": _spearman(pred, true),
            "mse": float(np.mean((np.asarray(pred) - np.asarray(true)) ** 2)) if pred else None,
            "n": len(pred),
        }
    return out


# ---------------------------------------------------------------- plots
# Figure + FigureCanvasAgg directly (not pyplot): no global backend switch, no shared state,
# safe to call from any thread or from a process that already uses another backend.

def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _plot_accuracy(result: dict, path: Path) -> Path:
    from matplotlib.figure import Figure

    names = list(result["categories"]) + ["overall"]
    model = [result["categories"][n]["accuracy"] for n in names[:-1]] + [result["overall"]["accuracy"]]
    base = result["length_baseline"]
    longer = [base["categories"][n]["accuracy"] for n in names[:-1]] + [base["overall"]["accuracy"]]
    counts = [result["categories"][n]["n"] for n in names[:-1]] + [result["overall"]["n"]]
    fig = Figure(figsize=(max(6.0, 1.2 * len(names)), 4.0))
    ax = fig.add_subplot()
    x = np.arange(len(names))
    ax.bar(x - 0.2, model, 0.4, label="reward model")
    ax.bar(x + 0.2, longer, 0.4, label="longer wins (baseline)", color="tab:gray")
    ax.axhline(0.5, color="black", linewidth=0.8, linestyle=":")
    ax.set_xticks(x, [f"{n}\n(n={c})" for n, c in zip(names, counts)])
    ax.set_ylim(0, 1)
    ax.set_ylabel("pairwise accuracy")
    ax.set_title("Accuracy per category vs the length baseline")
    ax.legend(loc="lower right")
    return _save(fig, path)


def _plot_score_vs_length(records: Sequence[Any], result: dict, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.5))
    ax = fig.add_subplot()
    lengths = []
    for side, color in (("chosen", "tab:green"), ("rejected", "tab:red")):
        side_lengths = [_number(r, f"{side}_length") for r in records]
        lengths += side_lengths
        ax.scatter(side_lengths, [_number(r, f"{side}_score") for r in records], s=6, alpha=0.4, color=color,
                   label=side)
    rho = result.get("verbosity_spearman")
    if lengths and min(lengths) > 0:  # lengths span orders of magnitude
        ax.set_xscale("log")
    ax.set_xlabel("response length")
    ax.set_ylabel("score")
    ax.set_title("Score vs response length" + (f" (Spearman {rho:.3f})" if rho is not None else ""))
    ax.legend()
    return _save(fig, path)


def _plot_gating(gating_by_category: Mapping[str, Mapping[str, float]], path: Path) -> Path:
    from matplotlib.figure import Figure

    categories = list(gating_by_category)
    attributes = list(dict.fromkeys(a for c in categories for a in gating_by_category[c]))
    grid = np.array([[float(gating_by_category[c].get(a, np.nan)) for a in attributes] for c in categories])
    fig = Figure(figsize=(max(6.0, 0.6 * len(attributes) + 2), max(3.0, 0.5 * len(categories) + 1.5)))
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(attributes)), attributes, rotation=45, ha="right")
    ax.set_yticks(range(len(categories)), categories)
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(len(categories)):
        for j in range(len(attributes)):
            if np.isfinite(grid[i, j]):  # dark text on the bright half of viridis
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if grid[i, j] > middle else "white")
    fig.colorbar(image, ax=ax, label="mean gating weight")
    ax.set_title("Mean gating weight per attribute and category")
    return _save(fig, path)


def write_report(
    result: dict,
    records: Iterable[Any],
    report_dir: str | os.PathLike,
    gating_by_category: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, Path]:
    """Write the PNG plots of an `evaluate_pairs` result into `report_dir` (created if needed).

    - accuracy_by_category.png: accuracy per category (and overall) next to the length baseline;
    - score_vs_length.png: every chosen and rejected response, score against length;
    - gating_heatmap.png (only when `gating_by_category` = {category: {attribute: mean weight}}).
    Returns {plot name: path}.
    """
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = list(records)
    paths = {
        "accuracy_by_category": _plot_accuracy(result, out / "accuracy_by_category.png"),
        "score_vs_length": _plot_score_vs_length(records, result, out / "score_vs_length.png"),
    }
    if gating_by_category:
        paths["gating_heatmap"] = _plot_gating(gating_by_category, out / "gating_heatmap.png")
    return paths
