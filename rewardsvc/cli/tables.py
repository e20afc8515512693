"""Output for people: fixed-width text tables of score, inspect and compare results."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def render(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """Columns padded to their widest cell; `align` per column: 'l' or 'r' (default: numbers right)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    if align is None:
        align = "".join("r" if rows and isinstance(rows[0][i], (int, float)) else "l" for i in range(len(headers)))

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(values, widths, align)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    if isinstance(value, float):
        return f"{value:+.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def top_contributions(row: dict[str, Any], k: int = 3) -> str:
    """The attributes that move the score most: c_k * r_k, largest |term| first (score = sum of the terms)."""
    terms = {name: row["coefficients"][name] * row["rewards"][name] for name in row["rewards"]}
    best = sorted(terms.items(), key=lambda kv: -abs(kv[1]))[:k]
    return "  ".join(f"{name} {value:+.3f}" for name, value in best)


def score_table(rows: Sequence[dict[str, Any]]) -> str:
    """id, score, tokens and the top contributions of each row (an error row shows its error)."""
    body = []
    for r in rows:
        if "error" in r:
            body.append([str(r.get("id")), "error", "", r["error"]])
        else:
            body.append([str(r["id"]), f"{r['score']:+.4f}", str(r["num_tokens"]), top_contributions(r)])
    return render(["id", "score", "tokens", "top attributes (coefficient x reward)"], body, align="lrrl")


def weights_table(gating: dict[str, float], coefficients: dict[str, float]) -> str:
    """inspect: attribute, gating weight, effective coefficient; sorted by gating weight, largest first."""
    ranked = sorted(gating, key=lambda name: -gating[name])
    return render(["attribute", "gating weight", "coefficient"], [[n, gating[n], coefficients[n]] for n in ranked])
