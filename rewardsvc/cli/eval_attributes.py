"""`rewardsvc eval-attributes RATINGS.jsonl`: per-attribute Pearson, Spearman and MSE between the model's
attribute rewards and ratings.

Rows: the stage-1 form {"messages": [...], <attribute>: rating or null, ...} (or "prompt" + "response").
Rewards are mapped back to each attribute's original scale with the checkpoint's label scales before the
MSE (correlations do not depend on it).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import InvalidInputError, RewardError
from .batch_io import conversation_of, read_jsonl

uses_model = True

INPUT_FORMAT = """\
input: JSONL, one rated conversation per line (docs/DATA.md, "Stage-1 row"):
  {"id", "messages": [...ending with the rated assistant response], <attribute>: rating | null, ...}
  ("prompt" + "response" instead of "messages" also works); attribute names as in the model's heads
output: one JSON object on stdout: per attribute n, Pearson, Spearman, MSE on the original scale
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ratings", help="JSONL of rated conversations (one column per attribute)")


def original_scale(rewards: dict[str, float], label_scales: dict[str, dict[str, float]]) -> dict[str, float]:
    out = {}
    for name, value in rewards.items():
        scale = label_scales.get(name)
        out[name] = value if not scale else scale["mean"] + scale["std"] * value
    return out


def run(args: argparse.Namespace) -> int:
    from ..evaluation.report import attribute_correlations
    from ..model.checkpoint import json_safe
    from .main import load_scorer

    scorer = load_scorer(args)
    if not scorer.attributes:
        raise InvalidInputError(
            f"{scorer.model_id} is a single-score model with no named attributes to correlate with ratings; "
            "`rewardsvc eval` measures its pairwise accuracy",
            field="model",
        )
    rows, encoded, errors = [], [], []
    for raw in read_jsonl(args.ratings):
        if raw.error is not None:
            errors.append({"line": raw.line, "id": None, "error": raw.error})
            continue
        try:
            encoded.append(scorer.encoder.encode(conversation_of(raw.data), f"line {raw.line}"))
        except RewardError as exc:
            errors.append({"line": raw.line, "id": raw.id, "error": str(exc)})
            continue
        rows.append(raw.data)
    results = scorer.score_encoded(encoded)
    records: list[dict[str, Any]] = [
        {**row, "rewards": original_scale(r.rewards, scorer.label_scales)} for row, r in zip(rows, results)
    ]
    rated = [a for a in scorer.attributes if any(r.get(a) is not None for r in rows)]
    out = {"model_id": scorer.model_id, "n": len(records), "attributes": attribute_correlations(records, rated)}
    if errors:
        out["errors"] = errors
    print(json.dumps(json_safe(out), indent=2))
    return 1 if errors or not records else 0
