"""PandaLM human test set (Apache-2.0): 999 pairs, three annotators each (0 tie, 1, 2).

Label = the majority (>= 2 of 3) vote; every row has one (no 0/1/2 three-way split occurs, but
it would be dropped). Majority ties (0) are dropped. Subset `pandalm-unanimous` when all three
agree, else `pandalm-majority`. Also dropped: pairs with an empty response (54; an empty output
is not a scoreable response). Six responses are JSON booleans (a model answered "True" and
the dump parsed it): they are turned back into the strings "True"/"False".
Prompt = instruction, then a blank line and the input when there is one.
"""

from __future__ import annotations

from collections import Counter

from .files import read_json, resolve_data_dir
from .grouping import group_key
from .schema import PreferencePair

FILE = "pandalm-testset/testset-v1.json"


def _text(value) -> str:
    return str(value) if isinstance(value, bool) else value


def majority(votes: list[int]) -> int | None:
    """The label chosen by at least 2 of the 3 annotators, or None."""
    label, count = Counter(votes).most_common(1)[0]
    return label if count >= 2 else None


def load_pairs(data_dir=None, dropped: Counter | None = None) -> list[PreferencePair]:
    """Majority-labelled, non-tie pairs (source `pandalm`, category chat)."""
    dropped = dropped if dropped is not None else Counter()
    out = []
    for row in read_json(resolve_data_dir(data_dir) / FILE):
        votes = [row["annotator1"], row["annotator2"], row["annotator3"]]
        label = majority(votes)
        if label is None:
            dropped["pandalm: no majority"] += 1
            continue
        if label == 0:
            dropped["pandalm: majority tie"] += 1
            continue
        responses = {1: _text(row["response1"]), 2: _text(row["response2"])}
        chosen, rejected = responses[label], responses[3 - label]
        if not chosen.strip() or not rejected.strip():
            dropped["pandalm: empty response"] += 1
            continue
        if chosen.strip() == rejected.strip():
            dropped["pandalm: identical responses"] += 1
            continue
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        prompt = [{"role": "user", "content": user}]
        out.append(PreferencePair(
            id=f"pandalm/{row['idx']}", source="pandalm", prompt=prompt, chosen=chosen, rejected=rejected,
            subset="pandalm-unanimous" if len(set(votes)) == 1 else "pandalm-majority",
            category="chat", group=group_key(prompt),
        ))
    return out
