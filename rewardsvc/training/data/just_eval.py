"""Just-Eval (Re-Align/AI2, MIT): LLM-judge absolute ratings -> stage-1 rated conversations.

Two parts (see just-eval/SOURCE.md):
- `just-eval`: 800 gpt-3.5-turbo-0301 answers rated by gpt-4-1106-preview on helpfulness,
  clarity, factuality, depth, engagement (1-5; "N/A" -> null).
- `just-eval-safety`: 200 red-team prompts x 15 generators rated on safety (1-5).
  gpt-3.5-turbo-0301 appears in three files (the same answers; gpt-4-1106 judged twice,
  gpt-3.5-turbo-0613 once): one row per (generator, id), keeping the gpt-4-1106 judgement
  because it is the stronger judge and the one that rated the multi-aspect set.
`example_data/example_data.json` carries no ratings and is not used.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

from .attributes import make_labels
from .files import read_json, resolve_data_dir
from .grouping import group_key
from .schema import RatedConversation

MULTI_GLOB = "just-eval/leaderboard/eval_results/gpt-4-turbo/gpt-3.5-turbo-0301/gpt-3.5-turbo-0301.general.*.json"
# gpt-4-1106-judged files first so that they win the (generator, id) de-duplication.
SAFETY_GLOBS = (
    "just-eval/leaderboard/eval_results/gpt-4-turbo/*.score_safety.json",
    "just-eval/leaderboard/eval_results/gpt-4-turbo/gpt-3.5-turbo-0301/gpt-3.5-turbo-0301.safety.*.json",
    "just-eval/leaderboard/eval_results/gpt-4/*.score_safety.chatgpt.json",
)
MULTI_ASPECTS = ("helpfulness", "clarity", "factuality", "depth", "engagement")


def _parsed(row: dict) -> dict:
    result = row["parsed_result"]
    # Some dumps store the judge's dict as its Python repr.
    return ast.literal_eval(result) if isinstance(result, str) else result


def _score(value) -> float | None:
    score = value.get("score") if isinstance(value, dict) else value
    try:
        return float(score)
    except (TypeError, ValueError):  # "N/A"
        return None


def _generator(path: Path) -> str:
    """Generator name from the file name (the rows' own `generator_cand` strings are inconsistent)."""
    name = path.name
    for suffix in (".score_safety.chatgpt.json", ".score_safety.json"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.parent.name  # gpt-3.5-turbo-0301/gpt-3.5-turbo-0301.safety.800-900.json


def _conversation(row: dict) -> list[dict]:
    return [{"role": "user", "content": row["input"]}, {"role": "assistant", "content": row["output_cand"]}]


def load_multi_aspect(data_dir=None, dropped: Counter | None = None) -> list[RatedConversation]:
    """The 800 multi-aspect rated conversations (source `just-eval`)."""
    root = resolve_data_dir(data_dir)
    out = []
    for path in sorted(root.glob(MULTI_GLOB)):
        for row in read_json(path):
            parsed = _parsed(row)
            ratings = {aspect: _score(parsed.get(aspect)) for aspect in MULTI_ASPECTS}
            messages = _conversation(row)
            out.append(RatedConversation(
                id=f"just-eval/{row['id']}", source="just-eval", messages=messages,
                labels=make_labels(row["output_cand"], **ratings), group=group_key(messages[:-1]),
            ))
    return out


def load_safety(data_dir=None, dropped: Counter | None = None) -> list[RatedConversation]:
    """The safety-rated conversations, one per (generator, prompt id) (source `just-eval-safety`)."""
    root = resolve_data_dir(data_dir)
    seen: set[tuple[str, str]] = set()
    out = []
    for pattern in SAFETY_GLOBS:
        for path in sorted(root.glob(pattern)):
            generator = _generator(path)
            for row in read_json(path):
                key = (generator, str(row["id"]))
                if key in seen:
                    if dropped is not None:
                        dropped["just-eval-safety: duplicate (generator, id), other judge"] += 1
                    continue
                seen.add(key)
                messages = _conversation(row)
                out.append(RatedConversation(
                    id=f"just-eval-safety/{generator}/{row['id']}", source="just-eval-safety", messages=messages,
                    labels=make_labels(row["output_cand"], safety=_score(_parsed(row).get("safety"))),
                    group=group_key(messages[:-1]),
                ))
    return out


def load_rated(data_dir=None, dropped: Counter | None = None) -> list[RatedConversation]:
    """All just-eval stage-1 rows: multi-aspect then safety."""
    return load_multi_aspect(data_dir, dropped) + load_safety(data_dir, dropped)
