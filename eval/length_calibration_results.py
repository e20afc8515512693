"""Every length calibration of a training run, collected from its checkpoint's provenance into one results line.

    rewardsvc train --work-dir WORK --layers 16 --out DIR [--embed stored]   # fits and records every method
    python eval/length_calibration_results.py DIR [--out eval/results/length-calibration.jsonl]

A training run fits every method of `TrainConfig.length_calibration` on the chosen candidate's gating
(rewardsvc/training/candidates.py) and evaluates each on the held-out mix (rewardsvc/training/pipeline.py); this
writes, per method: delta, stage-2 validation accuracy (category-balanced and per category), Spearman(score,
length) on the validation responses (all and per category), and the held-out mix's accuracy and Spearman,
overall and per category. One JSON line per run, with machine, date, commit (of this repository, where the
script runs), the training run's own date and machine, and the data coverage. docs/TRAINING.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from _common import stamp  # noqa: E402  (machine, date, commit: the same stamp as every bench results line)


def run_row(directory: Path) -> dict:
    config = json.loads((directory / "rewardsvc.json").read_text())
    provenance = config["provenance"]
    metrics = provenance["metrics"]
    offset = metrics.get("length_offset") or {}
    alternatives = offset.get("alternatives")
    if not alternatives:
        raise SystemExit(f"{directory}: the run recorded no length-calibration alternatives (trained before they existed)")
    held_out = metrics.get("eval", {}).get("length_calibrations", {})
    baseline = metrics.get("eval", {}).get("after_debiasing", {}).get("length_baseline", {})
    methods = {}
    for name, a in alternatives.items():
        h = held_out.get(name, {})
        methods[name] = {
            "delta": a["delta"], "fit": {k: v for k, v in a.items() if not k.startswith("val_") and k != "delta"},
            "val_balanced_accuracy": a["val_balanced_accuracy"], "val_categories": a["val_categories"],
            "val_spearman": a["val_spearman"],
            "heldout_accuracy": h.get("overall", {}).get("accuracy"), "heldout_n": h.get("overall", {}).get("n"),
            "heldout_categories": {c: v["accuracy"] for c, v in h.get("categories", {}).items()},
            "heldout_spearman": h.get("verbosity_spearman"), "heldout_spearman_by_category": h.get("verbosity_spearman_by_category"),
        }  # fmt: skip
    return {
        "script": "eval/length_calibration_results.py", **stamp(), "run": str(directory),
        "trained": provenance.get("created"), "trained_on": provenance.get("machine"),
        "applied": offset.get("method"), "chosen": metrics.get("chosen"),
        "data": {k: v for k, v in provenance.get("data", {}).items() if k != "dropped"},
        "caps": provenance.get("recipe", {}).get("caps"),  # None: the default caps (every training source)
        "stage1_val_pearson": {a: m.get("pearson") for a, m in metrics.get("stage1_validation", {}).items()},
        "candidates": [{"layer": c.get("layer"), "preference_heads": c.get("preference_heads"),
                        "val_balanced": c.get("val_balanced_accuracy"), "heldout": (c.get("eval_accuracy") or {}).get("accuracy")}
                       for c in metrics.get("candidates", []) if "skipped" not in c],
        "length_baseline": {"overall": baseline.get("overall", {}).get("accuracy"),
                            "categories": {c: v["accuracy"] for c, v in baseline.get("categories", {}).items()}},
        "methods": methods, "timings_s": provenance.get("timings_s"),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="output directories of `rewardsvc train`")
    parser.add_argument("--out", type=Path, default=REPO / "eval" / "results" / "length-calibration.jsonl")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a", encoding="utf-8") as f:
        for directory in args.runs:
            row = run_row(directory)
            f.write(json.dumps(row) + "\n")
            for name, m in row["methods"].items():
                rho = m["heldout_spearman_by_category"] or {}
                print(f"{name:18} delta {m['delta']:+.3f}  val {m['val_balanced_accuracy']:.3f}  held-out {m['heldout_accuracy']}  "
                      f"rho {m['heldout_spearman']}  " + " ".join(f"{c} {v:+.3f}" for c, v in rho.items() if v is not None))


if __name__ == "__main__":
    main()
