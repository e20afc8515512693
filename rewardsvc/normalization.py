"""Reward normalization that every replica agrees on: a z-score against statistics measured once on a reference
set (`rewardsvc calibrate`) and stored with the model, so that every server of one model normalizes alike,
whatever batch or replica a sample lands on.

    normalized = (raw - mean) / std            then, with a clip c, limited to [-c, c]

for the score and for each attribute's reward, each with its own mean and std. The raw values are never
replaced: a normalized result carries both (ScoreResult.normalized beside ScoreResult.score / .rewards).

Plain Python (no torch, no protobuf): the client, the data plane and the CLI share it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from .errors import InvalidInputError
from .types import NormalizedScores, ScoreResult

MODES = ("zscore", "none")
FIELD = "normalization"


@dataclass(frozen=True)
class Normalization:
    """What a call asks for. `zscore`: normalize against the model's calibration, optionally clipped to
    [-clip, clip]; `none`: raw values only (overrides a server default). A call that names no Normalization
    gets the server's default."""

    mode: str = "zscore"
    clip: float | None = None  # None = no clip

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidInputError(f"{FIELD}.mode must be one of {MODES}, got {self.mode!r}", field=f"{FIELD}.mode")
        if self.clip is not None:
            if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)) or not math.isfinite(self.clip) or self.clip <= 0:
                raise InvalidInputError(
                    f"{FIELD}.clip must be a finite number > 0 (or absent for no clip), got {self.clip!r}", field=f"{FIELD}.clip"
                )
            if self.mode != "zscore":
                raise InvalidInputError(f"{FIELD}.clip needs mode 'zscore', got mode {self.mode!r}", field=f"{FIELD}.clip")
            object.__setattr__(self, "clip", float(self.clip))

    @property
    def enabled(self) -> bool:
        return self.mode == "zscore"


RAW = Normalization(mode="none")


@dataclass(frozen=True)
class Stats:
    """Mean and standard deviation (population, ddof=0) of one value over the reference set."""

    mean: float
    std: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and math.isfinite(self.std)) or self.std <= 0:
            raise InvalidInputError(
                f"calibration stats need a finite mean and a finite std > 0, got mean={self.mean} std={self.std}",
                field="calibration",
            )

    def z(self, value: float, clip: float | None) -> float:
        z = (value - self.mean) / self.std
        return z if clip is None else min(clip, max(-clip, z))


@dataclass(frozen=True)
class Calibration:
    """Statistics of one model's raw outputs on a reference set. `calibration_id` names them (a content hash,
    see model/calibration.py), so a normalized result says which statistics made it."""

    calibration_id: str
    score: Stats
    rewards: Mapping[str, Stats]
    count: int  # conversations measured
    info: Mapping[str, object] = field(default_factory=dict)  # reference set, model fingerprint, when, ...

    def check_attributes(self, attributes: tuple[str, ...]) -> None:
        if tuple(self.rewards) != tuple(attributes):
            raise InvalidInputError(
                f"calibration {self.calibration_id} has attributes {list(self.rewards)}, the model {list(attributes)}",
                field="calibration",
            )

    def normalize(self, result: ScoreResult, normalization: Normalization) -> ScoreResult:
        """`result` with `normalized` set (raw fields unchanged)."""
        clip = normalization.clip
        normalized = NormalizedScores(
            score=self.score.z(result.score, clip),
            rewards={name: self.rewards[name].z(value, clip) for name, value in result.rewards.items()},
            calibration_id=self.calibration_id,
            clip=clip,
        )
        return replace(result, normalized=normalized)


def steering_conflict(normalization: Normalization, weights) -> None:
    """A steered score (override / mask weights) is a different quantity from the unsteered score the
    calibration measured: its mean and spread are not the calibrated ones. Refuse rather than return a
    number that looks normalized and is not. `weights`: the call's AttributeWeights, or None."""
    if normalization.enabled and weights is not None:
        raise InvalidInputError(
            f"{FIELD}: z-score normalization uses statistics of the model's own (unsteered) score; a call with "
            f"weights.mode={weights.mode} scores something else. Ask for normalization.mode=NONE (raw values) with "
            "steering weights, or drop the weights",
            field=FIELD,
        )


def as_normalization(value: "Normalization | bool | None") -> Normalization | None:
    """What callers may pass: a Normalization, True (z-score, no clip), False (raw only, overriding the server's
    default) or None (the server's default)."""
    if value is None or isinstance(value, Normalization):
        return value
    if isinstance(value, bool):
        return Normalization() if value else RAW
    raise InvalidInputError(f"{FIELD} must be a Normalization, True, False or None, got {value!r}", field=FIELD)
