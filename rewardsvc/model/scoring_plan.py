"""Which scoring plan (batch plan x precision) `auto` picks on a CPU, as a pure function of measurements.

The measurements come from model/plan_measurement.py (a short timed run at model load, cached on disk by
model/plan_cache.py); here is only the decision, so that tests check it with injected figures and no timing.

Rules (docs/PERFORMANCE.md, "auto on CPU"):
- a candidate whose scores moved too far from the reference (the float32 default plan) is not admissible:
  it must keep >= 99 % of the pair preferences and its max score deviation must be <= 5 % of the reference
  score std on the measurement set;
- among the admissible candidates the fastest wins, but it replaces the default plan only when it is at least
  `min_speedup` times faster (a short measurement on a shared machine is noisy: a tie keeps the default, and
  so keeps the default's scores).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import InvalidInputError

PLAN_BATCH_PLANS = ("padded", "packed", "one-per-forward")
PLAN_PRECISIONS = ("float32", "bfloat16", "mixed")


@dataclass(frozen=True)
class ScoringPlan:
    """How conversations share forward passes, and the backbone's precision."""

    batch_plan: str
    precision: str

    def __post_init__(self) -> None:
        if self.batch_plan not in PLAN_BATCH_PLANS:
            raise InvalidInputError(f"plan.batch_plan must be one of {PLAN_BATCH_PLANS}, got {self.batch_plan!r}",
                                    field="plan.batch_plan")  # fmt: skip
        if self.precision not in PLAN_PRECISIONS:
            raise InvalidInputError(f"plan.precision must be one of {PLAN_PRECISIONS}, got {self.precision!r}",
                                    field="plan.precision")  # fmt: skip

    @property
    def name(self) -> str:
        return f"{self.precision}/{self.batch_plan}"


DEVICE_DEFAULT_CPU = ScoringPlan("padded", "float32")


@dataclass(frozen=True)
class CandidateMeasurement:
    """One candidate on the measurement set: its time, and how far its scores are from the reference's."""

    plan: ScoringPlan
    seconds: float
    """Wall time to score the set (the best of the rounds); inf when the candidate failed to run."""
    preferences_unchanged: float
    """Share of the set's pairs whose preferred side (sign of chosen - rejected) is the reference's."""
    deviation_over_std: float
    """Max |score - reference score| over the set, divided by the reference scores' std."""
    error: str | None = None
    stage: int = 1
    """1: batch plans at the loaded precision; 2: precisions at stage 1's plan (model/plan_measurement.py)."""

    def as_dict(self) -> dict:
        return {"plan": self.plan.name, "stage": self.stage, "seconds": _finite_or_none(self.seconds),
                "preferences_unchanged": self.preferences_unchanged,
                "deviation_over_std": _finite_or_none(self.deviation_over_std), "error": self.error}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> "CandidateMeasurement":
        precision, batch_plan = str(data["plan"]).split("/", 1)
        seconds, deviation = data.get("seconds"), data.get("deviation_over_std")
        return cls(ScoringPlan(batch_plan, precision), math.inf if seconds is None else float(seconds),
                   float(data["preferences_unchanged"]), math.inf if deviation is None else float(deviation),
                   data.get("error"), int(data.get("stage", 1)))  # fmt: skip


def _finite_or_none(x: float) -> float | None:
    return round(x, 6) if math.isfinite(x) else None


@dataclass(frozen=True)
class PlanCriteria:
    min_preferences_unchanged: float = 0.99
    max_deviation_over_std: float = 0.05
    min_speedup: float = 1.10

    def admits(self, m: CandidateMeasurement) -> bool:
        return (m.error is None and math.isfinite(m.seconds) and m.seconds > 0
                and m.preferences_unchanged >= self.min_preferences_unchanged
                and m.deviation_over_std <= self.max_deviation_over_std)  # fmt: skip

    def why_not(self, m: CandidateMeasurement) -> str:
        if m.error is not None or not math.isfinite(m.seconds) or m.seconds <= 0:
            return f"{m.plan.name} did not run ({m.error or 'no time'})"
        if m.preferences_unchanged < self.min_preferences_unchanged:
            return f"{m.plan.name} kept {m.preferences_unchanged:.1%} of preferences (< {self.min_preferences_unchanged:.0%})"
        return f"{m.plan.name} moved scores by {m.deviation_over_std:.3g} std (> {self.max_deviation_over_std:g})"


@dataclass(frozen=True)
class PlanDecision:
    """The plan a scorer runs, and why: `measured` now, read from the `cache`, `explicit` flags, or the
    `device default` (no measurement: not a CPU, measurement switched off, or nothing to choose)."""

    plan: ScoringPlan
    source: str
    reason: str
    measurements: tuple[CandidateMeasurement, ...] = field(default=())
    measure_seconds: float | None = None

    def as_dict(self) -> dict:
        out = {"batch_plan": self.plan.batch_plan, "precision": self.plan.precision, "source": self.source,
               "reason": self.reason}  # fmt: skip
        if self.measurements:
            out["measurements"] = [m.as_dict() for m in self.measurements]
        if self.measure_seconds is not None:
            out["measure_seconds"] = round(self.measure_seconds, 3)
        return out

    def summary(self) -> str:
        """One line for logs: `float32/padded (measured: ...)`."""
        return f"{self.plan.name} ({self.source}: {self.reason})"


def choose_plan(
    measurements: Sequence[CandidateMeasurement], default: ScoringPlan, criteria: PlanCriteria = PlanCriteria()
) -> tuple[ScoringPlan, str]:
    """(plan, reason): the fastest admissible candidate if it beats the default by criteria.min_speedup,
    else the default. The default must have been measured to be replaced (no time to compare with: keep it)."""
    base = next((m for m in measurements if m.plan == default), None)
    if base is None or not criteria.admits(base):
        return default, f"the default {default.name} has no valid measurement; kept"
    admissible = [m for m in measurements if criteria.admits(m)]
    best = min(admissible, key=lambda m: (m.seconds, m.plan != default))
    rejected = [criteria.why_not(m) for m in measurements if not criteria.admits(m)]
    note = f"; not admissible: {'; '.join(rejected)}" if rejected else ""
    if best.plan == default:
        return default, f"{default.name} was the fastest{note}"
    speedup = base.seconds / best.seconds
    if speedup < criteria.min_speedup:
        return default, f"{best.plan.name} was only {speedup:.2f}x {default.name} (< {criteria.min_speedup:g}x); kept the default{note}"
    return best.plan, f"{speedup:.2f}x {default.name}{note}"

