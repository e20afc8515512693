"""Plain data that crosses the package boundaries: what a call asks (AttributeWeights) and what it answers
(ScoreResult, InspectResult, GroupResult, CompareResult), with the maths that makes a group's statistics and a
pair's preference from scores (GroupResult.of, CompareResult.of): the server and the CLI both use these.

No torch and no protobuf: the model produces these, the data plane passes them on, `rewardsvc.wire`
converts them, and the client returns them to a process that never loads the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .errors import InvalidInputError

MODES = ("override", "mask")
MAX_WEIGHT = 1e6
"""Largest steering weight accepted. The heads run in float32 (largest finite value ~3.4e38): weights in
[0, MAX_WEIGHT] times rewards and transform entries of any trained head stay many orders of magnitude
inside that range, while 1e39 (or 1e308, a valid float64 on the wire) would overflow to inf / NaN."""


@dataclass(frozen=True)
class AttributeWeights:
    """`override`: the given weights replace the gating (attributes not named get weight 0).
    `mask`: the gating weight of each named attribute is multiplied by its value (e.g. {"safety": 0.0}
    removes safety); the others keep the gating's weight. Every value is a finite number in
    [0, MAX_WEIGHT]. Applied by `rewardsvc.model.steering.steer`."""

    mode: str
    values: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidInputError(f"weights.mode must be one of {MODES}, got {self.mode!r}", field="weights.mode")
        for name, value in self.values.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise InvalidInputError(f"weights.values[{name!r}] must be a finite number, got {value!r}", field="weights.values")
            if not 0 <= value <= MAX_WEIGHT:
                raise InvalidInputError(
                    f"weights.values[{name!r}] must be in [0, {MAX_WEIGHT:g}], got {value}", field="weights.values"
                )
        object.__setattr__(self, "values", dict(self.values))

    @classmethod
    def of(cls, value: AttributeWeights | Mapping | None) -> AttributeWeights | None:
        """The one coercion of what callers pass as weights: None, an AttributeWeights, or the dict form
        {"mode": "override"|"mask", "values": {name: number}} (JSON of `--weights`, trainer configs)."""
        if value is None or isinstance(value, AttributeWeights):
            return value
        if not isinstance(value, Mapping) or "mode" not in value:
            raise InvalidInputError('weights must be {"mode": "override"|"mask", "values": {name: number}}', field="weights")
        return cls(mode=value["mode"], values=value.get("values") or {})

    def check_attributes(self, attributes: tuple[str, ...]) -> None:
        unknown = sorted(set(self.values) - set(attributes))
        if unknown:
            raise InvalidInputError(
                f"weights.values names unknown attributes {unknown}; the model's attributes are {list(attributes)}",
                field="weights.values",
            )


def weights_source(weights: AttributeWeights | None) -> str:
    return "gating" if weights is None else weights.mode


@dataclass(frozen=True)
class NormalizedScores:
    """A result's score and rewards as z-scores against the model's calibration (rewardsvc.normalization),
    (raw - mean) / std, clipped to [-clip, clip] when clip is set."""

    score: float
    rewards: dict[str, float]
    calibration_id: str  # which statistics (`rewardsvc calibrate`) made these
    clip: float | None = None


@dataclass(frozen=True)
class ScoreResult:
    score: float
    rewards: dict[str, float]  # raw attribute rewards r (before debiasing), by name
    gating: dict[str, float]  # weights used: the gating's, or the steered ones
    coefficients: dict[str, float]  # c = g T^T, so that score = sum_k c_k r_k
    num_tokens: int  # tokens scored (after truncation)
    truncated: bool
    weights_source: str  # "gating", "override", "mask", or "fixed" (a model kind without gating)
    model_id: str
    normalized: NormalizedScores | None = None  # set when normalization was asked for; the raw fields stay

    @property
    def reward(self) -> float:
        """The score a trainer should use: the normalized one when normalization was asked for, else the raw."""
        return self.score if self.normalized is None else self.normalized.score

    def value(self, attribute: str | None = None) -> float:
        """The score (attribute None) or one attribute's reward, normalized when normalization applied."""
        if attribute is None:
            return self.reward
        return (self.rewards if self.normalized is None else self.normalized.rewards)[attribute]


@dataclass(frozen=True)
class InspectResult:
    gating: dict[str, float]
    coefficients: dict[str, float]
    num_tokens: int
    truncated: bool
    weights_source: str
    model_id: str


@dataclass(frozen=True)
class GroupResult:
    """Scores of N responses to one prompt (a GRPO / RLOO group) and the group's statistics."""

    results: list[ScoreResult]
    mean: float
    std: float  # sample standard deviation (ddof=1, as TRL's GRPO); 0 for a single response
    ranks: list[int]  # 1 = highest score; ties broken by request order

    @property
    def scores(self) -> list[float]:
        return [r.score for r in self.results]

    @classmethod
    def of(cls, results: Sequence[ScoreResult]) -> GroupResult:
        """The group's statistics from its results: mean, sample std (ddof=1; 0 for n=1), and ranks with
        1 = highest score, ties broken by position."""
        mean, std, ranks = group_statistics([r.score for r in results])
        return cls(results=list(results), mean=mean, std=std, ranks=ranks)


@dataclass(frozen=True)
class CompareResult:
    """One (prompt, chosen, rejected) pair: P(chosen preferred) = sigmoid(s_chosen - s_rejected)."""

    p_chosen: float
    score_chosen: float
    score_rejected: float
    chosen: ScoreResult
    rejected: ScoreResult

    @classmethod
    def of(cls, chosen: ScoreResult, rejected: ScoreResult) -> CompareResult:
        return cls(
            p_chosen=sigmoid(chosen.score - rejected.score),
            score_chosen=chosen.score,
            score_rejected=rejected.score,
            chosen=chosen,
            rejected=rejected,
        )


def sigmoid(x: float) -> float:
    """1 / (1 + e^-x), without overflow for margins of any size."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def group_statistics(scores: Sequence[float]) -> tuple[float, float, list[int]]:
    """(mean, sample std with ddof=1 (0 for n=1), ranks with 1 = highest, ties by position)."""
    n = len(scores)
    if n == 0:
        return 0.0, 0.0, []
    mean = math.fsum(scores) / n
    std = math.sqrt(math.fsum((s - mean) ** 2 for s in scores) / (n - 1)) if n > 1 else 0.0
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    ranks = [0] * n
    for rank, i in enumerate(order, start=1):
        ranks[i] = rank
    return mean, std, ranks
