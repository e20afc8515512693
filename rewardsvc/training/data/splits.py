"""The fixed, recorded split of prompt groups into train / val / eval.

Deterministic without RNG state: a group's place is a function of sha256(salt + group key).
Changing a salt or a fraction changes the split: bump the salt's version suffix when you do,
and record it in docs/DATA.md.

- eval: a pair is eval when its source's rule says so (a fixed fraction of the source's
  prompt groups, or the upstream's own eval file). Pair sources only; stage-1 rows are never eval.
- val: among non-eval groups, a second, independent hash puts VAL_FRACTION of the groups in
  val, the same way for every source and stage, so a prompt is val everywhere or nowhere.
- Leakage: `build.py` drops every training row (stage 1 or 2) whose prompt group is the group
  of ANY eval pair of ANY source (the group is the normalized first user message, so the
  same question in two datasets is caught), and near-duplicates of those prompts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ...errors import InvalidInputError
from .schema import PreferencePair

EVAL_SALT = "rewardsvc-eval-v1"
VAL_SALT = "rewardsvc-val-v1"
VAL_FRACTION = 0.15
"""Of the non-eval groups: enough rows to pick the ridge alpha and stop stage 2, from ~2.5k rows."""


def unit_hash(key: str, salt: str) -> float:
    """A uniform number in [0, 1) from sha256(salt + '\\0' + key)."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass(frozen=True)
class PairSplitRule:
    """How one pair source is divided between evaluation and training."""

    eval_fraction: float
    """Fraction of the source's prompt groups held out for eval."""
    reason: str
    eval_subsets: frozenset[str] | None = None
    """If set, only pairs of these subsets are kept in eval groups; the others are dropped (not trained on)."""
    eval_id_prefix: str | None = None
    """Pairs whose id starts with this are eval whatever their hash (an upstream split kept as is)."""


PAIR_SPLIT_RULES: dict[str, PairSplitRule] = {
    "llmbar": PairSplitRule(1.0, "the 419 RewardBench chat-hard pairs: a benchmark, never trained on"),
    "prometheus-hhh": PairSplitRule(
        1.0, "only 221 pairs (102 prompts) and the only honesty/helpfulness pairs: all kept for eval"),
    "ultrafeedback": PairSplitRule(
        0.0, "the study repo's own seeded split: eval_clean (200) is eval, train_clean is training",
        eval_id_prefix="ultrafeedback/eval/"),
    "pandalm": PairSplitRule(
        0.5, "half of the 153 instructions are eval (unanimous pairs only: the cleanest human labels); "
             "the other half's majority pairs are stage-2 training",
        eval_subsets=frozenset({"pandalm-unanimous"})),
    "mt-bench-human": PairSplitRule(
        0.5, "75 MT-Bench questions shared with Prometheus MT-Bench and just-eval: half are eval so that "
             "the other half's rubric scores stay usable for stage 1"),
    "hh-harmless": PairSplitRule(
        0.4, "2,303 pairs: 40% of prompt groups give far more eval pairs than the cap needs, "
             "60% leave ~1,300 for stage 2, which wants a few hundred"),
    "xstest": PairSplitRule(
        0.5, "half of the 244 prompts that have both an appropriate and an inappropriate completion are eval; "
             "their completions leave stage 1. The 206 prompts without such a pair are always training"),
    "faireval": PairSplitRule(0.0, "66 pairs, not in the eval mix: stage-2 training"),
    "llmeval2": PairSplitRule(0.0, "199 pairs, not in the eval mix: stage-2 training"),
    "arena-bench": PairSplitRule(
        0.0, "300 questions, not in the eval mix: stage-2 training. Every pair and stage-1 row of a question has "
             "the question's prompt group, so the whole question is train or val, never both"),
}


def group_is_val(group: str) -> bool:
    """Whether a non-eval group is in the validation split (same answer for every source and stage)."""
    return unit_hash(group, VAL_SALT) < VAL_FRACTION


def train_or_val(group: str) -> str:
    """'val' or 'train' for a group that is not eval."""
    return "val" if group_is_val(group) else "train"


def pair_split(pair: PreferencePair) -> str | None:
    """'eval', 'val', 'train', or None when the pair is dropped (a non-eval subset in an eval group)."""
    try:
        rule = PAIR_SPLIT_RULES[pair.source]
    except KeyError:
        raise InvalidInputError(f"no split rule for pair source {pair.source!r}", field="source") from None
    if rule.eval_id_prefix is not None and pair.id.startswith(rule.eval_id_prefix):
        return "eval"
    if unit_hash(pair.group, EVAL_SALT) < rule.eval_fraction:
        if rule.eval_subsets is not None and pair.subset not in rule.eval_subsets:
            return None
        return "eval"
    return train_or_val(pair.group)
