"""UltraFeedback-binarized, a seeded 1,000 + 200 sample (MIT upstream).

Pairs (source `ultrafeedback`): ids `ultrafeedback/<train|eval>/<source_index>`; the upstream
study repo's own split is kept (its `eval_clean` file is our eval set). Pairs whose two GPT-4
overall scores are equal (136 of 1,200: binarized from ties) carry no preference and are
dropped, as are identical or empty responses.
Stage 1 (attribute `ultrafeedback_overall`, 1-10): both responses of every pair, ties included
(an absolute rating is valid whatever the other response got).
"""

from __future__ import annotations

from collections import Counter

from .attributes import make_labels
from .files import read_jsonl, resolve_data_dir
from .grouping import group_key
from .schema import PreferencePair, RatedConversation

FILES = (("train", "ultrafeedback-binarized-sample/data/processed/train_clean.jsonl"),
         ("eval", "ultrafeedback-binarized-sample/data/processed/eval_clean.jsonl"))


def _rows(data_dir):
    root = resolve_data_dir(data_dir)
    for part, rel in FILES:
        for row in read_jsonl(root / rel):
            yield part, row


def load_pairs(data_dir=None, dropped: Counter | None = None) -> list[PreferencePair]:
    """Pairs with a strict score preference (source `ultrafeedback`, subset `ultrafeedback`, chat)."""
    dropped = dropped if dropped is not None else Counter()
    out = []
    for part, row in _rows(data_dir):
        meta = row["metadata"]
        if meta["score_chosen"] == meta["score_rejected"]:
            dropped["ultrafeedback pairs: tied scores"] += 1
            continue
        if row["chosen"].strip() == row["rejected"].strip() or not row["chosen"].strip() or not row["rejected"].strip():
            dropped["ultrafeedback pairs: identical or empty responses"] += 1
            continue
        # Binarization always puts the higher score in `chosen`; checked rather than trusted.
        chosen, rejected = (row["chosen"], row["rejected"])
        if meta["score_chosen"] < meta["score_rejected"]:
            chosen, rejected = rejected, chosen
        prompt = [{"role": "user", "content": row["prompt"]}]
        out.append(PreferencePair(
            id=f"ultrafeedback/{part}/{row['source_index']}", source="ultrafeedback", prompt=prompt,
            chosen=chosen, rejected=rejected, subset="ultrafeedback", category="chat", group=group_key(prompt),
        ))
    return out


def load_rated(data_dir=None, dropped: Counter | None = None) -> list[RatedConversation]:
    """Both responses of every pair with their overall score (source `ultrafeedback`)."""
    dropped = dropped if dropped is not None else Counter()
    out = []
    for part, row in _rows(data_dir):
        prompt = [{"role": "user", "content": row["prompt"]}]
        seen = set()
        for side in ("chosen", "rejected"):
            response = row[side]
            if not response.strip() or response in seen:
                dropped["ultrafeedback rated: empty or duplicate response"] += 1
                continue
            seen.add(response)
            out.append(RatedConversation(
                id=f"ultrafeedback/{part}/{row['source_index']}/{side}", source="ultrafeedback",
                messages=prompt + [{"role": "assistant", "content": response}],
                labels=make_labels(response, ultrafeedback_overall=row["metadata"][f"score_{side}"]),
                group=group_key(prompt),
            ))
    return out
