"""MODEL_CARD.md for a heads checkpoint, rendered from its own rewardsvc.json (so the card can never
disagree with the provenance it describes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..model.checkpoint import CONFIG_FILE

REPRODUCE = "python training/train_default.py   # = rewardsvc train --out rewardsvc/default_model --work-dir artifacts/train"


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
        f"- Backbone: `{p.get('backbone', config['backbone'].get('model'))}` "
        + ("(frozen); heads only in this directory." if not config["backbone"].get("adapter") else
           f"with the stage-0 LoRA adapter in `{config['backbone']['adapter']}/` (merged at load), heads in this directory."),
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
        + _coverage(data.get("features"), p.get("recipe", {}).get("embed")),
        "",
        *_chosen(config, m),
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
    lines += _length_offset(m.get("length_offset"), m.get("eval", {}).get("length_calibrations"))
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
    spearman_rows = [(v, evaluation[v]["verbosity_spearman_by_category"]) for v in variants
                     if "verbosity_spearman_by_category" in evaluation[v]]  # fmt: skip
    if spearman_rows:
        categories = sorted(spearman_rows[-1][1])
        lines += ["", "Spearman(score, response length in characters) per held-out category:", "",
                  "| | " + " | ".join(categories) + " |", "|---" * (len(categories) + 1) + "|"]  # fmt: skip
        lines += [f"| {v.replace('_', ' ')} | " + " | ".join(_num(rho.get(c)) for c in categories) + " |" for v, rho in spearman_rows]
    gating = evaluation.get("after_debiasing", {}).get("gating_by_category")
    if gating:
        lines += ["", "## Gating: mean weight per held-out category (the three largest)", "",
                  "| category | attribute weights |", "|---|---|"]  # fmt: skip
        for category, weights in gating.items():
            top = sorted(weights.items(), key=lambda kv: -kv[1])[:3]
            lines.append(f"| {category} | " + ", ".join(f"{a} {w:.2f}" for a, w in top) + " |")
    lines += _correctness(m, data)
    lines += _stage0(p.get("stage0"), config["backbone"].get("adapter"), data)
    lines += ["", "## Limitations", "", *_limitations(config, evaluation), ""]
    return "\n".join(lines)


def _correctness(m: dict[str, Any], data: dict[str, Any]) -> list[str]:
    """What the correctness data (arena-bench) gave this run, from its provenance; its effect against a run
    without it takes a second run, so the card says how to make one instead of quoting another run's figures."""
    pearson = (m.get("stage1_validation", {}).get("correctness") or {}).get("pearson")
    head = m.get("preference_heads", {}).get("preference_reasoning", {}).get("val_accuracy")
    reasoning = (m.get("length_offset") or {}).get("val_categories", {}).get("reasoning")
    if "correctness" in data.get("attributes_left_out", []) or (pearson is None and head is None):
        return ["", "## Correctness data", "", "Not in this run (no `correctness` attribute, no `reasoning` pairs)."]
    parts = []
    if pearson is not None:
        parts.append(f"`correctness` validation Pearson {_num(pearson)}")
    if head is not None:
        parts.append(f"`preference_reasoning` alone {_pct(head)} on the reasoning validation pairs")
    if reasoning is not None:
        parts.append(f"the served score {_pct(reasoning)} there")
    return ["", "## Correctness data", "",
            "arena-bench-v1 (GPT-4 reference-guided grades; docs/DATA.md): " + "; ".join(parts) + ". Its effect on each "
            "category is a comparison with a run without it (`--cap stage1/arena-bench=0 --cap stage2/arena-bench=0`); "
            "docs/TRAINING.md records it for the packaged default, with every length calibration and stage 0's cost per "
            "epoch."]  # fmt: skip


STAGE0_PAIRS_DROPPED = "stage2 train pair: trained the stage-0 adapter"  # pipeline's count in provenance.data.dropped


def _stage0(summary: dict[str, Any] | None, adapter: str | None, data: dict[str, Any]) -> list[str]:
    """How the shipped adapter was trained (train-backbone's state, recorded in the provenance by the fit), and
    which pairs stage 2 then saw."""
    if not adapter:
        return []
    lines = ["", "## Stage 0: the backbone fine-tuned as a Bradley-Terry reward model", ""]
    if not summary:
        return lines + [f"The adapter in `{adapter}/` was not made by this run's stage 0 here: its training is not recorded."]
    c = summary["config"]
    layer, k = c["feature_layer"], c.get("top_blocks")
    where = (f"the top {k} of the {layer} blocks the heads read (blocks {layer - k + 1}-{layer}), trained from a state cache"
             if k else f"all {layer} blocks the heads read")  # fmt: skip
    text = (f"LoRA rank {c['rank']} (alpha {c['alpha']}) on {where}; learning rate {c['learning_rate']:g}, "
            f"{c['pairs_per_step']} pairs a step, pairs of at most {c['max_tokens']} tokens. "
            f"{summary['step']} of {summary['total_steps']} steps in {summary['train_seconds']:,.0f} s of training")
    if summary.get("train_pairs"):
        text += (f" over {summary['train_pairs']} stage-2 training pairs: {summary['seconds_per_epoch']:,.1f} s an epoch "
                 f"on the training machine")  # fmt: skip
    lines.append(text + ".")
    epochs = summary.get("epochs") or []
    if epochs:
        lines += ["", "| epoch | mean training loss | stage-0 head validation accuracy (at step) |", "|---|---|---|"]
        for e in epochs:
            val = e.get("last_val_in_epoch")
            shown = f"{_pct(val['accuracy'])} ({val['step']})" if val else "-"
            lines.append(f"| {e['epoch']} | {e['mean_loss']} | {shown} |")
    frozen, adapted = summary.get("frozen_probe"), summary.get("adapted_probe")
    if frozen and adapted:
        lines += ["", f"A logistic Bradley-Terry probe on the block-{layer} states of the same pairs, validation accuracy on "
                  f"{frozen['val_pairs']} pairs: {_pct(frozen['val_accuracy'])} on the frozen backbone, "
                  f"{_pct(adapted['val_accuracy'])} on the adapted one."]  # fmt: skip
    left_out = data.get("dropped", {}).get(STAGE0_PAIRS_DROPPED)
    lines += ["", f"Stage 2 was fit on the {data.get('stage2_train')} training pairs stage 0 did not train on ({left_out} it "
              "trained on were left out: the adapter has memorised them)." if left_out else
              "Stage 2 was fit on every training pair, those stage 0 trained on included."]  # fmt: skip
    return lines


LENGTH_SPEARMAN_LIMIT = 0.1  # issue 9's bound on |Spearman(score, response length)| on held-out pairs


def _limitations(config: dict[str, Any], evaluation: dict[str, Any]) -> list[str]:
    """Known weaknesses, read from the provenance: where the model loses to 'the longer answer wins', how much
    of the data the fit saw, and what the recipe left out."""
    items = ["- A small backbone on a few thousand labelled examples: a fast, honest baseline, not a frontier reward model."]
    shipped = evaluation.get("after_debiasing")
    if shipped:
        base = shipped["length_baseline"]["categories"]
        below = [f"{c} ({_pct(r['accuracy'])} vs {_pct(base[c]['accuracy'])})" for c, r in sorted(shipped["categories"].items())
                 if c in base and r["accuracy"] < base[c]["accuracy"]]  # fmt: skip
        if below:
            items.append("- Below the length baseline (longer answer wins) on the held-out mix in: " + ", ".join(below) + ".")
        near_chance = [c for c, r in sorted(shipped["categories"].items()) if r["accuracy"] < 0.55]
        if near_chance:
            items.append("- At or near chance (< 55 %) on the held-out mix in: " + ", ".join(near_chance) + ".")
        rho = shipped.get("verbosity_spearman")
        if rho is not None and abs(rho) > LENGTH_SPEARMAN_LIMIT:
            items.append(f"- The score still correlates with response length on the held-out mix: Spearman(score, length) = {rho:.3f} "
                         f"(|rho| > {LENGTH_SPEARMAN_LIMIT}); the debiasing is calibrated on the training responses, not on this mix.")  # fmt: skip
        by_category = shipped.get("verbosity_spearman_by_category") or {}
        over = [f"{c} ({rho:+.3f})" for c, rho in sorted(by_category.items()) if rho is not None and abs(rho) > LENGTH_SPEARMAN_LIMIT]
        if over:
            items.append(f"- Within held-out categories the score correlates with length beyond |rho| {LENGTH_SPEARMAN_LIMIT}: "
                         + ", ".join(over) + ".")  # fmt: skip
    features = config.get("provenance", {}).get("data", {}).get("features") or {}
    stored, wanted = features.get("conversations_stored"), features.get("conversations_wanted")
    if stored is not None and wanted and stored < wanted:
        items.append(f"- Fit on a partial feature pass: {stored} of {wanted} conversations ({stored / wanted:.0%}); the "
                     "held-out figures cover only the pairs whose conversations are stored.")  # fmt: skip
    if not config.get("backbone", {}).get("adapter"):
        items.append("- No stage 0: the backbone is the frozen chat model, not fine-tuned as a Bradley-Terry reward model "
                     "(`rewardsvc train-backbone`).")  # fmt: skip
    return items


def _coverage(features: dict[str, Any] | None, embed: str | None) -> str:
    if not features:
        return ""
    stored, wanted = features.get("conversations_stored"), features.get("conversations_wanted")
    text = f" Conversations with stored backbone features: {stored} of {wanted}"
    if embed == "stored" and stored != wanted:
        text += (" (a partial, resumable CPU pass: rows whose conversations were not embedded yet are left out and "
                 "counted under provenance.data.dropped)")  # fmt: skip
    return text + "."


def _stage2_lr(m: dict[str, Any]) -> str:
    stage2 = m.get("stage2", {}).get("after_debiasing", {})
    if "lr" not in stage2:
        return ""  # checkpoints trained before the learning-rate choice
    tried = ", ".join(f"{t['lr']:g}" for t in stage2.get("lrs_tried", []))
    return f", stage-2 learning rate {stage2['lr']:g} (best on validation of {tried})"


def _chosen(config: dict[str, Any], m: dict[str, Any]) -> list[str]:
    chosen, candidates = m.get("chosen"), m.get("candidates")
    if not chosen or not candidates:
        return []
    lines = ["## Candidates (chosen by category-balanced stage-2 validation accuracy)", "",
             f"Served: features after block {chosen['layer']} of {chosen['backbone_blocks']} (the backbone stops there: "
             f"early exit), preference heads: {'yes' if chosen['preference_heads'] else 'no'}{_stage2_lr(m)}.", "",
             "| layer | preference heads | stage-1 mean val Pearson | stage-2 val acc (balanced) | held-out acc (for the record) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for c in candidates:
        if "skipped" in c:
            lines.append(f"| {c['layer']} | {'yes' if c['preference_heads'] else 'no'} | skipped: {c['skipped']} | | |")
            continue
        val = c.get("val_balanced_accuracy")
        held = c.get("eval_accuracy", {}).get("accuracy")
        lines.append(f"| {c['layer']} | {'yes' if c['preference_heads'] else 'no'} | {_num(c.get('stage1_mean_val_pearson'))} "
                     f"| {_pct(val)} | {_pct(held)} |")  # fmt: skip
    return lines + [""]


def _length_offset(offset: dict[str, Any] | None, held_out: dict[str, Any] | None) -> list[str]:
    """The length calibration: what was applied, and every method fit on the same gating (validation and held-out)."""
    if not offset:
        return []  # checkpoints fit before the calibration existed
    if "method" not in offset:  # checkpoints before the choice of method (chat responses only)
        return ["", f"After stage 2 every lambda was raised by **{offset['delta']:+.2f}**, so that Spearman(score, length) "
                f"is {_num(offset['spearman'])} (from {_num(offset['spearman_at_zero'])}) on the "
                f"{offset['responses']} {offset['reference']}."]  # fmt: skip
    method = offset["method"]
    text = f"After stage 2 every lambda was raised by **{offset['delta']:+.3f}** (length calibration `{method}`"
    if "a" in offset:
        text += (f": Bradley-Terry on {offset['pairs']} {offset.get('reference', 'pairs')} gives the score difference the "
                 f"weight a = {_num(offset['a'])} and the length-penalty difference b = {_num(offset['b'])}; delta = -b / a)")  # fmt: skip
    elif isinstance(offset.get("spearman"), dict):
        where = ", ".join(f"{k} {_num(v)}" for k, v in offset["spearman"].items())
        per = offset.get("category_offsets")
        if per:  # per-category: delta is the mean over the training prompts of each prompt's gating-weighted offset
            text += ": offsets " + ", ".join(f"{k} {v:+.2f}" for k, v in per.items()) + ", mean effective offset"
        text += f": Spearman(score, length) {where} on the {offset['responses']} {offset['reference']})"
    else:
        text += ")"
    lines = ["", text + "."]
    alternatives = offset.get("alternatives")
    if not alternatives:
        return lines
    categories = sorted({c for a in alternatives.values() for c in a.get("val_spearman", {}) if c != "all"})
    held_categories = sorted({c for h in (held_out or {}).values() for c in h.get("verbosity_spearman_by_category", {})})
    lines += ["", "Every calibration method on this gating (val: stage-2 validation; Spearman = Spearman(score, length)):", "",
              "| method | delta | val balanced acc | " + " | ".join(f"val Spearman {c}" for c in ["all", *categories])
              + (" | held-out acc | " + " | ".join(f"held-out Spearman {c}" for c in ["all", *held_categories]) if held_out else "")
              + " |", "|---" * (3 + len(categories) + 1 + ((2 + len(held_categories)) if held_out else 0)) + "|"]  # fmt: skip
    for name, a in alternatives.items():
        row = [f"{a['delta']:+.3f}", _pct(a.get("val_balanced_accuracy"))]
        row += [_num(a.get("val_spearman", {}).get(c)) for c in ["all", *categories]]
        if held_out:
            h = held_out.get(name, {})
            rho = h.get("verbosity_spearman_by_category", {})
            row += [_pct(h.get("overall", {}).get("accuracy")), _num(h.get("verbosity_spearman"))]
            row += [_num(rho.get(c)) for c in held_categories]
        lines.append(f"| {name}{' (applied)' if name == method else ''} | " + " | ".join(row) + " |")
    return lines


def write_model_card(directory: str | Path) -> Path:
    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    path = directory / "MODEL_CARD.md"
    path.write_text(render(config))
    return path
