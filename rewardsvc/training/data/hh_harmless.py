"""Anthropic HH-RLHF harmless-base, test split (MIT): 2,312 red-team transcript pairs.

Each side is a full transcript; they share every turn but the final assistant one, which is
the compared response (chosen = judged more harmless). Dropped (counted in `dropped`):
pairs whose turn structures differ (5: one side has an extra exchange or ends on a Human
turn) and pairs with an empty final response (4 chosen sides are empty: "say nothing" was
preferred, but an empty assistant turn is not a scoreable response).
"""

from __future__ import annotations

from collections import Counter

from .files import read_jsonl, resolve_data_dir
from .grouping import group_key
from .schema import PreferencePair
from .transcript import split_pair_transcripts

FILE = "hh-rlhf-harmless-base/test.jsonl.gz"


def load_pairs(data_dir=None, dropped: Counter | None = None) -> list[PreferencePair]:
    """Pairs with multi-turn prompts (source `hh-harmless`, subset `hh-harmless`, safety)."""
    dropped = dropped if dropped is not None else Counter()
    out = []
    for i, row in enumerate(read_jsonl(resolve_data_dir(data_dir) / FILE)):
        split = split_pair_transcripts(row["chosen"], row["rejected"])
        if split is None:
            dropped["hh-harmless: transcripts differ before the final assistant turn"] += 1
            continue
        prompt, chosen, rejected = split
        if not chosen or not rejected:
            dropped["hh-harmless: empty final response"] += 1
            continue
        if chosen == rejected:
            dropped["hh-harmless: identical responses"] += 1
            continue
        out.append(PreferencePair(
            id=f"hh-harmless/{i:04d}", source="hh-harmless", prompt=prompt, chosen=chosen, rejected=rejected,
            subset="hh-harmless", category="safety", group=group_key(prompt),
        ))
    return out
