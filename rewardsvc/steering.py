"""Per-call attribute weights: steer the score by overriding or masking the gating."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

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
    [0, MAX_WEIGHT]."""

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

    def check_attributes(self, attributes: tuple[str, ...]) -> None:
        unknown = sorted(set(self.values) - set(attributes))
        if unknown:
            raise InvalidInputError(
                f"weights.values names unknown attributes {unknown}; the model's attributes are {list(attributes)}",
                field="weights.values",
            )

    def apply(self, gating: torch.Tensor, attributes: tuple[str, ...]) -> torch.Tensor:
        """gating (B, K) -> the weights actually used (B, K)."""
        self.check_attributes(attributes)
        vector = torch.tensor([self.values.get(a, 0.0 if self.mode == "override" else 1.0) for a in attributes])
        if self.mode == "override":
            return vector.to(gating).expand_as(gating).clone()
        return gating * vector.to(gating)


def weights_source(weights: AttributeWeights | None) -> str:
    return "gating" if weights is None else weights.mode
