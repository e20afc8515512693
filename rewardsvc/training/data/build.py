"""Assemble the default training and evaluation sets from every source.

Order of operations (each step is counted in `TrainingSets.dropped`):
1. load every adapter's rows and pairs;
2. split pairs (splits.pair_split); the eval prompt groups are fixed here, BEFORE any cap or
   length filter, so that a cap never moves a prompt from eval into training;
3. drop every stage-1 row and stage-2 pair whose prompt group is an eval group, or whose first
   user message is a near-duplicate of an eval prompt (neardup.py);
4. drop over-long rows: training rows whose prompt (all prompt messages together) or any
   response is longer than `max_tokens_chars` characters; eval pairs over `eval_max_chars`;
5. cap each (stage, source) by a deterministic round-robin over prompt groups (one row of
   every group before a second row of any), ranked by a hash salted with `seed`, after a
   per-group cap where DEFAULT_GROUP_CAPS sets one (arena-bench pairs per question); stage 2 is
   capped first and stage-1 caps take conversations stage 2 already embeds first (the
   UltraFeedback and XSTest responses), since embedding is the cost.

Training sources are not capped by default (issue 9: every row is used; the content-addressed feature store
makes a CPU run resumable instead), except arena-bench: 6 pairs per question, so that no question dominates,
and 2,400 stage-1 rows, so that it adds ~1.0 M tokens to embed rather than ~1.2 M. Evaluation caps keep the held-out mix at ~1,150 pairs with every category
represented; `caps` can still cap any '<stage>/<source>' for a quick run.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TypeVar

from ...errors import InvalidInputError
from .files import default_data_dir, resolve_data_dir  # noqa: F401  (default_data_dir re-exported)
from .grouping import first_user_text
from .neardup import NearDuplicateIndex
from .schema import PreferencePair, RatedConversation
from .sources import PAIR_SOURCES, RATED_SOURCES, load_preference_pairs, load_rated_conversations
from .splits import pair_split, train_or_val, unit_hash

DEFAULT_MAX_CHARS = 2000
"""Training rows: longest prompt (all messages) and longest response, in characters (~500 tokens)."""
DEFAULT_EVAL_MAX_CHARS = 4000
"""Eval pairs: looser, so that all 419 LLMBar chat-hard pairs stay (longest input 3,565, output 3,705)."""
STAGES = ("stage1", "stage2", "eval")

DEFAULT_CAPS: dict[str, int | None] = {
    # training: every row (None = no cap)
    "stage1/just-eval": None,
    "stage1/just-eval-safety": None,
    "stage1/prometheus-mt-bench": None,
    "stage1/prometheus-vicuna": None,
    "stage1/xstest": None,
    "stage1/ultrafeedback": None,
    # arena-bench: its 2,957 answers within the length limit are ~1.23 M new tokens to embed (code and maths: 3.4
    # characters per token). 2,400 keeps the new tokens at ~1.0 M: first the 1,846 answers the stage-2 pairs
    # embed anyway, then 554 more spread over the questions (scripts/new_data_budget.py, docs/DATA.md).
    "stage1/arena-bench": 2400,
    "stage2/ultrafeedback": None,
    "stage2/hh-harmless": None,
    "stage2/pandalm": None,
    "stage2/mt-bench-human": None,
    "stage2/faireval": None,
    "stage2/llmeval2": None,
    "stage2/xstest": None,
    "stage2/arena-bench": None,         # capped per question instead (DEFAULT_GROUP_CAPS)
    # eval: ~1,150 pairs; every category represented
    "eval/llmbar": None,                # chat-hard: all 419
    "eval/prometheus-hhh": None,        # honesty 61 / helpfulness 102 / safety 58: all 221
    "eval/ultrafeedback": None,         # chat: what is left of the 200 after ties and length
    "eval/pandalm": 200,                # chat
    "eval/mt-bench-human": None,        # chat
    "eval/xstest": 200,                 # safety
    "eval/hh-harmless": 200,            # safety
}

DEFAULT_GROUP_CAPS: dict[str, int] = {
    # 300 questions x 16 graded answers make up to 120 pairs per question: 7,472 within the length limit, over
    # 261 questions, 25 at the median and up to 79 for the questions the models split on (uncapped, the 30
    # most split questions would hold 26 % of the pairs). 6 per question: 221 of the 261 reach the cap, so
    # questions weigh about the same, and the 1,453 pairs still use 1,846 of the 2,796 pairable answers.
    "stage2/arena-bench": 6,
}
"""'<stage>/<source>' -> most rows of one prompt group, applied before the source's cap (same ranking)."""

T = TypeVar("T", RatedConversation, PreferencePair)


@dataclass(frozen=True)
class TrainingSets:
    """Stage-1 rows, stage-2 pairs and eval pairs, with what was dropped and why."""

    stage1_train: list[RatedConversation]
    stage1_val: list[RatedConversation]
    stage2_train: list[PreferencePair]
    stage2_val: list[PreferencePair]
    eval_pairs: list[PreferencePair]
    dropped: dict[str, int] = field(default_factory=dict)
    """'<what>: <reason>' -> number of rows dropped."""

    def stage1_rows(self) -> list[dict]:
        """Stage-1 JSONL rows (train then val) with their `split`."""
        return [r.to_json("train") for r in self.stage1_train] + [r.to_json("val") for r in self.stage1_val]

    def stage2_rows(self) -> list[dict]:
        """Stage-2 pair JSONL rows (train then val) with their `split`."""
        return [p.to_json("train") for p in self.stage2_train] + [p.to_json("val") for p in self.stage2_val]

    def eval_rows(self) -> list[dict]:
        """Eval pair JSONL rows (`rewardsvc eval` input)."""
        return [p.to_json("eval") for p in self.eval_pairs]

    def write(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write stage1.jsonl, stage2.jsonl and eval.jsonl into `out_dir`; return their paths."""
        out = Path(out_dir)
        paths = {"stage1": out / "stage1.jsonl", "stage2": out / "stage2.jsonl", "eval": out / "eval.jsonl"}
        write_jsonl(self.stage1_rows(), paths["stage1"])
        write_jsonl(self.stage2_rows(), paths["stage2"])
        write_jsonl(self.eval_rows(), paths["eval"])
        return paths


def write_jsonl(rows: Iterable[Mapping[str, Any] | RatedConversation | PreferencePair], path: str | os.PathLike) -> Path:
    """Write rows (dicts, or schema objects via `to_json()`) as UTF-8 JSON lines; gzip if `.gz`.

    Written to a temporary name then renamed, so a reader never sees half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(tmp, "wt", encoding="utf-8") as f:
        for row in rows:
            obj = row.to_json() if hasattr(row, "to_json") else row
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def resolve_caps(caps: Mapping[str, int | None] | None) -> dict[str, int | None]:
    """DEFAULT_CAPS updated by `caps` (keys '<stage>/<source>'; None = no cap, 0 = leave out)."""
    known = {f"stage1/{s}" for s in RATED_SOURCES} | {f"{st}/{s}" for st in ("stage2", "eval") for s in PAIR_SOURCES}
    merged = dict(DEFAULT_CAPS)
    for key, value in (caps or {}).items():
        if key not in known:
            raise InvalidInputError(f"unknown cap key {key!r}; expected '<stage>/<source>', one of {sorted(known)}",
                                    field="caps")
        if value is not None and int(value) < 0:
            raise InvalidInputError(f"cap {key}={value} must be >= 0 or None", field="caps")
        merged[key] = value
    return merged


def conversation_key(prompt: Sequence[dict], response: str) -> str:
    """Identity of one conversation to embed (the unit of CPU cost)."""
    return json.dumps([prompt, response], ensure_ascii=False, sort_keys=True)


def _conversation_keys(item: RatedConversation | PreferencePair) -> list[str]:
    if isinstance(item, RatedConversation):
        return [conversation_key(item.prompt, item.response)]
    return [conversation_key(item.prompt, item.chosen), conversation_key(item.prompt, item.rejected)]


def round_robin(items: Sequence[T], seed: int, prefer: frozenset[str] = frozenset(),
                per_group: int | None = None) -> list[T]:
    """Items ordered for capping: the first item of every group, then the second, ...

    Groups are ordered by a seeded hash, items within a group by a seeded hash of their id, so
    a cap spreads over as many prompts as possible. Items whose conversations are all in
    `prefer` (already embedded for another stage) come first: they cost nothing more. With
    `per_group`, only the first `per_group` items of each group (in that within-group order) are returned.
    """
    salt = f"rewardsvc-subsample-{seed}"
    by_group: dict[str, list[T]] = defaultdict(list)
    for item in items:
        by_group[item.group].append(item)
    keyed = []
    for group, members in by_group.items():
        members.sort(key=lambda it: (unit_hash(it.id, salt), it.id))
        group_rank = unit_hash(group, salt)
        for k, it in enumerate(members[:per_group]):
            costs_extra = not all(c in prefer for c in _conversation_keys(it))
            keyed.append(((costs_extra, k, group_rank, it.id), it))
    keyed.sort(key=lambda kv: kv[0])
    return [it for _, it in keyed]


def _prompt_chars(messages: Sequence[dict]) -> int:
    return sum(len(m["content"]) for m in messages)


def _cap_by_source(items: list[T], stage: str, caps: Mapping[str, int | None], seed: int,
                   dropped: Counter, prefer: frozenset[str] = frozenset()) -> list[T]:
    by_source: dict[str, list[T]] = defaultdict(list)
    for item in items:
        by_source[item.source].append(item)
    kept: list[T] = []
    for source in sorted(by_source):
        per_group = DEFAULT_GROUP_CAPS.get(f"{stage}/{source}")
        ranked = round_robin(by_source[source], seed, prefer, per_group)
        if len(ranked) < len(by_source[source]):
            dropped[f"{stage}/{source}: over the cap of {per_group} per prompt group"] += len(by_source[source]) - len(ranked)
        cap = caps.get(f"{stage}/{source}")
        if cap is not None and len(ranked) > cap:
            dropped[f"{stage}/{source}: over the cap of {cap}"] += len(ranked) - cap
            ranked = ranked[:cap]
        kept.extend(ranked)
    return sorted(kept, key=lambda it: (it.source, it.id))


def build_training_sets(
    data_dir: str | os.PathLike | None = None,
    *,
    max_tokens_chars: int = DEFAULT_MAX_CHARS,
    caps: Mapping[str, int | None] | None = None,
    seed: int = 0,
    eval_max_chars: int = DEFAULT_EVAL_MAX_CHARS,
) -> TrainingSets:
    """Build stage-1 train/val rows, stage-2 train/val pairs and the eval pairs (see module doc).

    `max_tokens_chars` bounds training prompts and responses in characters, `eval_max_chars`
    eval ones; `caps` override DEFAULT_CAPS per '<stage>/<source>'; `seed` picks which rows a
    cap keeps (the train/val/eval split itself never depends on it).
    """
    if max_tokens_chars < 1 or eval_max_chars < 1:
        raise InvalidInputError("max_tokens_chars and eval_max_chars must be >= 1", field="max_tokens_chars")
    root = resolve_data_dir(data_dir)
    caps = resolve_caps(caps)
    dropped: Counter = Counter()
    rated = load_rated_conversations(root, dropped)
    pairs = load_preference_pairs(root, dropped)

    split_of: dict[str, str] = {}
    for pair in pairs:
        s = pair_split(pair)
        if s is None:
            dropped[f"{pair.source}: non-eval subset in an eval prompt group"] += 1
        else:
            split_of[pair.id] = s
    eval_pool = [p for p in pairs if split_of.get(p.id) == "eval"]
    eval_groups = {p.group for p in eval_pool}
    near_eval = NearDuplicateIndex(first_user_text(p.prompt) for p in eval_pool)

    def leaks(item, stage: str) -> bool:
        if item.group in eval_groups:
            dropped[f"{stage}/{item.source}: prompt group is an eval group"] += 1
            return True
        if near_eval.contains_near_duplicate_of(first_user_text(item.prompt)):
            dropped[f"{stage}/{item.source}: near-duplicate of an eval prompt"] += 1
            return True
        return False

    def fits(item, stage: str, limit: int) -> bool:
        responses = [item.response] if isinstance(item, RatedConversation) else [item.chosen, item.rejected]
        if _prompt_chars(item.prompt) > limit or max(len(r) for r in responses) > limit:
            dropped[f"{stage}/{item.source}: longer than {limit} characters"] += 1
            return False
        return True

    stage1 = [r for r in rated if not leaks(r, "stage1") and fits(r, "stage1", max_tokens_chars)]
    stage2 = [p for p in pairs if split_of.get(p.id) in ("train", "val")]
    stage2 = [p for p in stage2 if not leaks(p, "stage2") and fits(p, "stage2", max_tokens_chars)]
    evals = [p for p in eval_pool if fits(p, "eval", eval_max_chars)]

    # Stage 2 first: stage-1 caps then prefer conversations stage 2 already embeds.
    stage2 = _cap_by_source(stage2, "stage2", caps, seed, dropped)
    shared = frozenset(c for p in stage2 for c in _conversation_keys(p))
    stage1 = _cap_by_source(stage1, "stage1", caps, seed, dropped, prefer=shared)
    evals = _cap_by_source(evals, "eval", caps, seed, dropped)
    return TrainingSets(
        stage1_train=[r for r in stage1 if train_or_val(r.group) == "train"],
        stage1_val=[r for r in stage1 if train_or_val(r.group) == "val"],
        stage2_train=[p for p in stage2 if split_of[p.id] == "train"],
        stage2_val=[p for p in stage2 if split_of[p.id] == "val"],
        eval_pairs=evals,
        dropped=dict(sorted(dropped.items())),
    )
