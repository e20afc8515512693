"""MODEL_CARD.md for a heads checkpoint, rendered from its own rewardsvc.json (so the card can never
disagree with the provenance it describes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..model.checkpoint import CONFIG_FILE

REPRODUCE = "python training/train_default.py   # = rewardsvc train --out rewardsvc/default_model --caps-scale 0.5 --max-chars 1500"


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _num(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _alpha(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def render(config: dict[str, Any]) -> str:
    p = config.get("provenance", {})
    m = p.get("metrics", {})
    data = p.get("data", {})
    lines = [
        f"# Model card: {config['name']}",
        "",
        f"- Backbone: `{p.get('backbone', config['backbone'].get('model'))}` (frozen); heads only in this directory.",
        f"- Attributes ({len(config['heads']['attributes'])}): {', '.join(config['heads']['attributes'])}; "
        f"verbosity attribute: `{config['heads'].get('verbosity_attribute')}`.",
        f"- Gating: {config['heads']['gating_n_hidden']} hidden ReLU layers of {config['heads']['gating_hidden_dim']}, "
        f"temperature {config['heads']['gating_temperature']}.",
        f"- Trained: {p.get('created', 'unknown')} on {p.get('machine', 'unknown')}, rewardsvc {p.get('rewardsvc_version', '?')}; "
        f"wall time {p.get('timings_s', {})}.",
        f"- Reproduce from ../shared/data: `{REPRODUCE}`",
        "",
        "## Data (see docs/DATA.md for sources, licenses and the fixed split)",
        "",
        f"Stage 1: {data.get('stage1_train')} train / {data.get('stage1_val')} validation rated conversations. "
        f"Stage 2: {data.get('stage2_train')} train / {data.get('stage2_val')} validation preference pairs. "
        f"Evaluation: {data.get('eval_pairs')} held-out pairs (their prompt groups never enter training). "
        f"Unique training conversations embedded: {data.get('unique_training_conversations')}.",
        "",
        "## Stage 1: validation quality per attribute (standardized labels)",
        "",
        "| attribute | Pearson | Spearman | MSE | n val | alpha |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in m.get("stage1_validation", {}).items():
        lines.append(f"| {name} | {_num(s.get('pearson'))} | {_num(s.get('spearman'))} | {_num(s.get('mse'))} | "
                     f"{s.get('n_val')} | {_alpha(m.get('stage1_alphas', {}).get(name))} |")  # fmt: skip
    debias = m.get("debiasing", {})
    lines += ["", f"## Verbosity debiasing (threshold {debias.get('threshold')})", "",
              "| attribute | lambda | Spearman with verbosity before | after |", "|---|---|---|---|"]  # fmt: skip
    for name, r in debias.get("report", {}).items():
        lines.append(f"| {name} | {r.get('lambda')} | {_num(r.get('spearman_at_zero'))} | {_num(r.get('spearman'))} |")
    lines += ["", "## Stage 2 (gating, Bradley-Terry) and evaluation on the held-out mix", ""]
    evaluation = m.get("eval", {})
    variants = [v for v in ("before_debiasing", "after_debiasing") if v in evaluation]
    if variants:
        categories = sorted(evaluation[variants[-1]]["categories"])
        lines += ["| | " + " | ".join(["overall", *categories, "verbosity Spearman", "stage-2 val acc"]) + " |",
                  "|---" * (len(categories) + 4) + "|"]  # fmt: skip
        for v in variants:
            e = evaluation[v]
            row = [_pct(e["overall"]["accuracy"])] + [
                f"{_pct(e['categories'][c]['accuracy'])} (n={e['categories'][c]['n']})" for c in categories
            ]
            row += [_num(e.get("verbosity_spearman")), _pct(m.get("stage2", {}).get(v, {}).get("best_val_accuracy"))]
            lines.append(f"| {v.replace('_', ' ')} | " + " | ".join(row) + " |")
        base = evaluation[variants[-1]]["length_baseline"]
        lines.append("| length baseline (longer wins) | " + " | ".join(
            [_pct(base["overall"]["accuracy"])] + [_pct(base["categories"][c]["accuracy"]) for c in categories] + ["", ""]) + " |")
    lines += ["", "## Limitations", "",
              "A 135M-parameter backbone on a few thousand labelled examples: the rewards are a small, fast, honest "
              "baseline, not a frontier reward model. Check the per-category numbers above before relying on a category.", ""]  # fmt: skip
    return "\n".join(lines)


def write_model_card(directory: str | Path) -> Path:
    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    path = directory / "MODEL_CARD.md"
    path.write_text(render(config))
    return path
