"""Evaluate a model on the held-out evaluation mix built from ../shared/data, with plots.

    python eval/evaluate_default.py [--model DIR] [--report artifacts/eval-report]

Builds the eval pairs exactly as training does (rewardsvc.training.data.build: fixed split, eval prompt groups never
in training), writes them to artifacts/eval/eval.jsonl and runs `rewardsvc eval` on them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rewardsvc.cli.main import main
from rewardsvc.training.data.build import build_training_sets, write_jsonl

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir")
    parser.add_argument("--report", default=str(REPO / "artifacts" / "eval-report"))
    args, rest = parser.parse_known_args()
    sets = build_training_sets(args.data_dir)
    pairs_path = write_jsonl(sets.eval_rows(), REPO / "artifacts" / "eval" / "eval.jsonl")
    sys.exit(main(["eval", str(pairs_path), "--report", args.report, "--max-tokens", "2048", *rest]))
