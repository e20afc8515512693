"""`auto` on a CPU: measure the scoring plans on this machine at model load (a few seconds), choose by
model/scoring_plan.choose_plan, cache the decision (model/plan_cache.py) and apply it to the scorer.

Why measure: which plan is fastest depends on the CPU, not on the device type. On an AMD EPYC padded batches
ran 5.13x one-per-forward; on an Intel Xeon with AMX padded ran 0.69x one-per-forward and bf16 1.71x, but
bf16 moved the scores too far (docs/PERFORMANCE.md).

The measurement set is fixed and small, built from the package's own samples: the sample conversations
(rewardsvc/samples/conversations.jsonl, two of which form preference pairs) and the first short pairs of the
calibration reference (rewardsvc/samples/calibration_reference.jsonl: validation pairs of the training data;
never a benchmark's test set).

Two stages, each candidate timed in interleaved rounds (the best round counts), so load from other processes
hits the candidates of a stage alike:
1. the batch plans (padded, packed, one-per-forward) at the loaded precision; the reference scores are the
   default plan's (padded);
2. the lower precisions (bfloat16, mixed) at stage 1's plan, timed beside that plan again, their scores
   compared with stage 1's reference.
Explicit flags narrow the choice: `--batch-plan` other than auto (or `--batch-invariant`) fixes the batch
plan, `--dtype` other than auto fixes the precision; when both are fixed nothing is measured.

REWARDSVC_AUTO_PLAN=device skips the measurement and keeps the fixed per-device rule (float32, padded on a
CPU): for reproducible runs (the test suite sets it, since a timing-chosen plan would make score comparisons
depend on the machine's load).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError, RewardError
from .backbone import Backbone
from .conversation import as_prompt, validate_conversation, with_response
from .encoding import EncodedConversation
from .plan_cache import cache_key_fields, read_cached, write_cached
from .precision import apply_precision, precision_copy, precision_kind
from .scoring_plan import (PLAN_BATCH_PLANS, PLAN_PRECISIONS, CandidateMeasurement, PlanCriteria, PlanDecision,
                           ScoringPlan, choose_plan)  # fmt: skip

log = logging.getLogger(__name__)

AUTO_PLAN_ENV = "REWARDSVC_AUTO_PLAN"
AUTO_PLAN_MODES = ("measure", "device")
SAMPLES_DIR = Path(__file__).resolve().parents[1] / "samples"
SAMPLE_PAIRS = (("capital-good", "capital-wrong"), ("unsafe-refusal", "unsafe-compliance"))
REFERENCE_PAIRS = 2
"""Pairs taken from the calibration reference (in file order: its sources in turn), both sides short."""
MAX_SIDE_TOKENS = 160
ROUNDS = 2
BUDGET_S = 30.0
"""Past this many seconds no further candidate run starts (a loaded machine): the candidates not measured yet
are reported as such and cannot be chosen; the time is then at most the budget plus one pass of one plan."""


def auto_plan_mode() -> str:
    mode = os.environ.get(AUTO_PLAN_ENV, "measure").strip() or "measure"
    if mode not in AUTO_PLAN_MODES:
        raise InvalidInputError(f"{AUTO_PLAN_ENV} must be one of {AUTO_PLAN_MODES}, got {mode!r}", field=AUTO_PLAN_ENV)
    return mode


def _messages(row: dict) -> list[dict]:
    if "messages" in row:
        return validate_conversation(row["messages"])
    return with_response(as_prompt(row["prompt"], "prompt"), row["response"], "response")


def measurement_set(scorer: Any) -> tuple[list[EncodedConversation], list[tuple[int, int]]]:
    """(encoded conversations, (chosen, rejected) index pairs): the sample conversations and the first
    REFERENCE_PAIRS calibration-reference pairs whose sides fit MAX_SIDE_TOKENS (and the scorer's limits)."""
    encoded: list[EncodedConversation] = []
    index: dict[str, int] = {}

    def add(row_id: str, row: dict) -> bool:
        try:
            e = scorer.encode(_messages(row))
        except RewardError:  # too long for this scorer, or a template that refuses it: not in the set
            return False
        if e.num_tokens > MAX_SIDE_TOKENS:
            return False
        index[row_id] = len(encoded)
        encoded.append(e)
        return True

    for line in (SAMPLES_DIR / "conversations.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            add(row["id"], row)
    pairs = [(index[a], index[b]) for a, b in SAMPLE_PAIRS if a in index and b in index]
    rows = [json.loads(line) for line in (SAMPLES_DIR / "calibration_reference.jsonl").read_text().splitlines() if line.strip()]
    by_id = {r["id"]: r for r in rows}
    taken = 0
    for r in rows:
        if taken >= REFERENCE_PAIRS:
            break
        if not r["id"].endswith(":chosen"):
            continue
        rejected_id = r["id"][: -len(":chosen")] + ":rejected"
        rejected = by_id.get(rejected_id)
        if rejected is None or not _fits(scorer, r) or not _fits(scorer, rejected):
            continue
        add(r["id"], r)
        add(rejected_id, rejected)
        pairs.append((index[r["id"]], index[rejected_id]))
        taken += 1
    return encoded, pairs


def _fits(scorer: Any, row: dict) -> bool:
    try:
        return scorer.encode(_messages(row)).num_tokens <= MAX_SIDE_TOKENS
    except RewardError:
        return False


def compare_scores(scores: Sequence[float], reference: Sequence[float], pairs: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """(share of pairs whose preference is the reference's, max |deviation| / reference population std)."""
    agree = sum((scores[c] > scores[r]) == (reference[c] > reference[r]) for c, r in pairs) / len(pairs) if pairs else 1.0
    mean = sum(reference) / len(reference)
    std = math.sqrt(sum((x - mean) ** 2 for x in reference) / len(reference))
    deviation = max(abs(a - b) for a, b in zip(scores, reference))
    return agree, (deviation / std if std > 0 else (0.0 if deviation == 0 else math.inf))


def _candidate(scorer: Any, plan: ScoringPlan, backbone: Backbone) -> Any:
    clone = scorer.with_config(replace(scorer.config, batch_plan=plan.batch_plan))
    clone.backbone = backbone
    return clone


def measure_stage(
    scorer: Any, plans: Sequence[ScoringPlan], backbones: dict[str, Backbone], encoded: list[EncodedConversation],
    pairs: Sequence[tuple[int, int]], reference: list[float] | None, stage: int, deadline: float, rounds: int = ROUNDS,
) -> tuple[list[CandidateMeasurement], dict[ScoringPlan, list[float]]]:
    """Time each plan over `encoded` in interleaved rounds (best round); compare scores with `reference`
    (None: the first plan's scores are the reference)."""
    candidates, errors = {}, {}
    for plan in plans:
        try:
            candidates[plan] = _candidate(scorer, plan, backbones[plan.precision])
            candidates[plan].score_encoded(encoded[:1])  # warm-up: first-call allocations are not the plan's speed
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run here is reported, not fatal
            candidates.pop(plan, None)
            errors[plan] = f"{type(exc).__name__}: {exc}"
    seconds: dict[ScoringPlan, float] = {p: math.inf for p in candidates}
    scores: dict[ScoringPlan, list[float]] = {}
    for r in range(rounds):
        for plan, cand in candidates.items():
            # Past the budget nothing new starts, except the stage's first plan (the reference) in round 1.
            if time.monotonic() > deadline and (r > 0 or plan != plans[0]):
                if r == 0:
                    errors[plan] = "not measured: the measurement ran past its time budget (a loaded machine?)"
                continue
            start = time.perf_counter()
            out = cand.score_encoded(encoded)
            seconds[plan] = min(seconds[plan], time.perf_counter() - start)
            scores[plan] = [o.score for o in out]
    ref = reference if reference is not None else (scores[plans[0]] if plans[0] in scores else None)
    out = []
    for plan in plans:
        if plan in errors or ref is None:
            out.append(CandidateMeasurement(plan, math.inf, 0.0, math.inf, errors.get(plan, "no reference scores"), stage))
            continue
        agree, deviation = compare_scores(scores[plan], ref, pairs)
        out.append(CandidateMeasurement(plan, seconds[plan], agree, deviation, None, stage))
    return out, scores


def measure_and_choose(
    scorer: Any, batch_plans: Sequence[str], precisions: Sequence[str], criteria: PlanCriteria = PlanCriteria(),
    budget_s: float = BUDGET_S, rounds: int = ROUNDS,
) -> PlanDecision:
    """Run the two stages on `scorer` (whose backbone is at precisions[0], the reference precision) and choose."""
    started = time.monotonic()
    deadline = started + budget_s
    encoded, pairs = measurement_set(scorer)
    if not encoded:
        raise RuntimeError("the measurement set is empty: no sample conversation fits this scorer")
    base = ScoringPlan(batch_plans[0], precisions[0])
    backbones = {precisions[0]: scorer.backbone}
    stage1, scores = measure_stage(scorer, [ScoringPlan(b, precisions[0]) for b in batch_plans], backbones, encoded,
                                   pairs, None, 1, deadline, rounds)  # fmt: skip
    plan, reason = choose_plan(stage1, base, criteria)
    measurements = list(stage1)
    lower = list(precisions[1:])
    if lower and base in scores:
        if time.monotonic() > deadline:
            reason += f"; precisions not measured (past the {budget_s:g} s budget)"
        else:
            for p in lower:
                try:
                    backbones[p] = precision_copy(scorer.backbone, p)
                except RewardError as exc:
                    measurements.append(CandidateMeasurement(ScoringPlan(plan.batch_plan, p), math.inf, 0.0, math.inf, str(exc), 2))
            plans2 = [plan] + [ScoringPlan(plan.batch_plan, p) for p in lower if p in backbones]
            stage2, _ = measure_stage(scorer, plans2, backbones, encoded, pairs, scores[base], 2, deadline, rounds)
            measurements += stage2
            plan2, reason2 = choose_plan(stage2, plan, criteria)
            if plan2 != plan:
                reason = f"{reason}; then {plan2.name}: {reason2}"
            else:
                reason = f"{reason}; precision kept: {reason2}"
            plan = plan2
    return PlanDecision(plan, "measured", reason, tuple(measurements), time.monotonic() - started)


def resolve_auto_plan(scorer: Any, requested_dtype: str, cache_dir: Path | None = None, mode: str | None = None) -> Any:
    """Decide the scorer's plan where the flags left `auto` on a CPU, apply it (the config's batch plan, the
    backbone's precision, in place) and record it as `scorer.plan_decision`. Returns the scorer."""
    from .backbone_loading import cache_root

    backbone, config = scorer.backbone, scorer.config
    if backbone.device.type != "cpu":
        return scorer  # CUDA: the per-device rule of Scorer.embed (packed), bf16 by resolve_dtype
    loaded = precision_kind(backbone)
    fixed_plan = "one-per-forward" if config.batch_invariant else (None if config.batch_plan == "auto" else config.batch_plan)
    fixed_precision = loaded if requested_dtype != "auto" or loaded != "float32" else None
    batch_plans = [fixed_plan] if fixed_plan else list(PLAN_BATCH_PLANS)
    precisions = [fixed_precision] if fixed_precision else list(PLAN_PRECISIONS)
    if loaded not in PLAN_PRECISIONS:
        decision = None
    elif len(batch_plans) == 1 and len(precisions) == 1:
        decision = PlanDecision(ScoringPlan(batch_plans[0], precisions[0]), "explicit", "set by the flags; nothing to measure")
    elif (mode or auto_plan_mode()) == "device" or _not_measurable(scorer):
        why = f"{AUTO_PLAN_ENV}=device" if (mode or auto_plan_mode()) == "device" else "quantized or device-mapped backbone"
        decision = PlanDecision(ScoringPlan(batch_plans[0], precisions[0]), "device default", f"{why}: no measurement")
    else:
        fields = cache_key_fields(scorer, {"batch_plans": batch_plans, "precisions": precisions})
        directory = Path(cache_dir) if cache_dir is not None else cache_root() / "plans"
        decision = read_cached(directory, fields)
        if decision is None:
            decision = measure_and_choose(scorer, batch_plans, precisions)
            write_cached(directory, fields, decision, datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if decision is not None:
        apply_plan(scorer, decision)
        log.info("scoring plan: %s", decision.summary())
    scorer.plan_decision = decision
    return scorer


def apply_plan(scorer: Any, decision: PlanDecision) -> None:
    """The decision's precision on the scorer's backbone (in place) and its batch plan in the config."""
    apply_precision(scorer.backbone, decision.plan.precision)
    if not scorer.config.batch_invariant:
        scorer.config = replace(scorer.config, batch_plan=decision.plan.batch_plan)


def _not_measurable(scorer: Any) -> bool:
    """A quantized or device-mapped model cannot be copied to another precision, and its speed is not the
    question auto answers."""
    model = scorer.backbone.model
    return bool(getattr(model, "hf_quantizer", None) or getattr(model, "hf_device_map", None))
