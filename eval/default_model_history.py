"""The held-out and validation figures of every packaged default, read from its committed rewardsvc.json.

    python eval/default_model_history.py [--out eval/results/default-model-history.jsonl]
    python eval/default_model_history.py --checkpoint DIR --out eval/results/lever-fits.jsonl --note TEXT

Each training run stores its results in the checkpoint's provenance (rewardsvc/training/pipeline.py); this
walks the git history of rewardsvc/default_model/rewardsvc.json and writes one JSON line per version: the
commit, the training run's date and machine, the chosen candidate, the held-out mix before and after debiasing
(overall and per category), the length baseline and every candidate's validation and held-out accuracy.
docs/TRAINING.md quotes the shipped default and the previous one from this file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = "rewardsvc/default_model/rewardsvc.json"


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout


def block(result: dict | None) -> dict | None:
    if not result:
        return None
    return {"overall": result["overall"]["accuracy"], "n": result["overall"]["n"],
            "categories": {k: v["accuracy"] for k, v in result.get("categories", {}).items()},
            "verbosity_spearman": result.get("verbosity_spearman"),
            "verbosity_spearman_by_category": result.get("verbosity_spearman_by_category"),
            "length_baseline": result.get("length_baseline", {}).get("overall", {}).get("accuracy"),
            "length_baseline_categories": {k: v["accuracy"] for k, v in result.get("length_baseline", {}).get("categories", {}).items()}}  # fmt: skip


def version_row(commit: str, date: str) -> dict | None:
    row = checkpoint_row(json.loads(git("show", f"{commit}:{CHECKPOINT}")))
    return None if row is None else {"script": "eval/default_model_history.py", "commit": commit, "committed": date, **row}


def checkpoint_row(data: dict) -> dict | None:
    """A checkpoint's own results (its rewardsvc.json), or None for one trained without evaluation."""
    provenance = data.get("provenance") or {}
    metrics = provenance.get("metrics") or {}
    evaluation = metrics.get("eval") or {}
    if not evaluation:
        return None
    # val_balanced: category-balanced, after the length calibration (how the candidate is chosen; None before
    # 2026-12-06). val_accuracy: stage 2's best epoch over all validation pairs, before the calibration.
    candidates = [{"layer": c.get("layer"), "preference_heads": c.get("preference_heads"),
                   "val_balanced": c.get("val_balanced_accuracy"),
                   "val_accuracy": (c.get("stage2") or {}).get("after_debiasing", {}).get("best_val_accuracy"),
                   "eval_accuracy": (c.get("eval_accuracy") or {}).get("accuracy")}
                  for c in metrics.get("candidates", []) if "skipped" not in c]  # fmt: skip
    offset = metrics.get("length_offset") or {}
    return {
        "date": provenance.get("created"), "machine": provenance.get("machine"), "model": data.get("name"),
        "chosen": metrics.get("chosen"), "data": {k: v for k, v in (provenance.get("data") or {}).items() if k != "dropped"},
        "before_debiasing": block(evaluation.get("before_debiasing")),
        "after_debiasing": block(evaluation.get("after_debiasing")), "candidates": candidates,
        "validation": {"balanced": offset.get("val_balanced_accuracy"), "categories": offset.get("val_categories"),
                       "length_calibration": offset.get("method"), "delta": offset.get("delta")},
        "stage0": provenance.get("stage0"), "backbone": data.get("backbone"),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "eval" / "results" / "default-model-history.jsonl"))
    parser.add_argument("--checkpoint", help="instead: append one row for this checkpoint directory (a lever's fit, "
                        "not committed) to --out, stamped with this machine, date and commit")  # fmt: skip
    parser.add_argument("--note", default="", help="with --checkpoint: how the checkpoint was made")
    args = parser.parse_args()
    if args.checkpoint:
        sys.path.insert(0, str(REPO / "bench"))
        from _common import stamp

        row = checkpoint_row(json.loads((Path(args.checkpoint) / "rewardsvc.json").read_text()))
        # date and machine are the training run's (from the checkpoint); "recorded" is this script's run
        line = json.dumps({"script": "eval/default_model_history.py --checkpoint", "recorded": stamp(), "note": args.note,
                           "checkpoint": str(args.checkpoint), **(row or {})})  # fmt: skip
        with open(args.out, "a", encoding="utf-8") as out:
            out.write(line + "\n")
        print(line)
        return
    rows = []
    for line in git("log", "--format=%H %cI", "--", CHECKPOINT).splitlines():
        commit, date = line.split()
        row = version_row(commit, date)
        if row is not None:
            rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)), encoding="utf-8")
    for r in reversed(rows):
        print(r["commit"][:7], r["date"], r["after_debiasing"]["overall"], r["after_debiasing"]["n"])


if __name__ == "__main__":
    main()
