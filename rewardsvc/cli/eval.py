"""`rewardsvc eval PAIRS.jsonl`: pairwise accuracy overall / per category / per subset, the "longer
response wins" baseline on the same pairs, and the Spearman correlation between score and length.

Rows: {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages, "subset"?, "category"?}.
Prints one JSON object; a row that cannot be scored is listed under "errors" (and the exit code is 1).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import RewardError
from .batch_io import read_jsonl

uses_model = True

INPUT_FORMAT = """\
input: JSONL, one preference pair per line (docs/DATA.md, "Pair row"):
  {"id", "prompt": messages ending with a user turn | str,
   "chosen": str | messages, "rejected": str | messages, "subset"?, "category"?}
output: one JSON object on stdout: accuracy overall / per category / per subset, the longer-response
  baseline, score-length correlation; rows that cannot be scored are listed under "errors" (exit code 1)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pairs", help="JSONL of preference pairs")
    parser.add_argument("--report", help="directory for PNG plots (accuracy vs length baseline, score vs length, gating)")
    parser.add_argument("--records", help="also write per-pair scores (JSONL) here")


def run(args: argparse.Namespace) -> int:
    from ..evaluation.report import evaluate_pairs, write_report
    from ..model.checkpoint import json_safe
    from ..training.data.schema import PreferencePair  # here: the training.data package costs --help 0.2 s
    from .main import load_scorer

    scorer = load_scorer(args)
    errors: list[dict[str, Any]] = []
    pairs, encoded = [], []
    for raw in read_jsonl(args.pairs):
        if raw.error is not None:
            errors.append({"line": raw.line, "id": None, "error": raw.error})
            continue
        try:
            pair = PreferencePair.from_json(raw.data)
            chosen = scorer.encoder.encode(pair.prompt + [{"role": "assistant", "content": pair.chosen}], f"line {raw.line} chosen")
            rejected = scorer.encoder.encode(pair.prompt + [{"role": "assistant", "content": pair.rejected}], f"line {raw.line} rejected")
        except (RewardError, KeyError, TypeError, ValueError) as exc:
            errors.append({"line": raw.line, "id": raw.id, "error": f"{type(exc).__name__}: {exc}"})
            continue
        pairs.append(pair)
        encoded += [chosen, rejected]
    if not pairs:
        print(json.dumps({"errors": errors, "overall": {"accuracy": None, "n": 0}}))
        return 1
    results = scorer.score_encoded(encoded)
    records = [
        {"id": p.id, "subset": p.subset, "category": p.category,
         "chosen_score": results[2 * i].score, "rejected_score": results[2 * i + 1].score,
         "chosen_length": len(p.chosen), "rejected_length": len(p.rejected), "gating": results[2 * i].gating}  # fmt: skip
        for i, p in enumerate(pairs)
    ]
    summary = evaluate_pairs(records)
    summary["model_id"] = scorer.model_id
    summary["length_unit"] = "characters"
    if errors:
        summary["errors"] = errors
    if args.report:
        paths = write_report(summary, records, args.report, summary.get("gating_by_category"))
        summary["report"] = {name: str(path) for name, path in paths.items()}
    if args.records:
        with open(args.records, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    print(json.dumps(json_safe(summary), indent=2))
    return 1 if errors else 0
