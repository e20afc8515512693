"""Per-call steering: the gating weights replaced (override) or scaled (mask) by AttributeWeights."""

from __future__ import annotations

import torch

from ..types import AttributeWeights


def steer(gating: torch.Tensor, weights: AttributeWeights, attributes: tuple[str, ...]) -> torch.Tensor:
    """gating (B, K) -> the weights actually used (B, K)."""
    weights.check_attributes(attributes)
    vector = torch.tensor([weights.values.get(a, 0.0 if weights.mode == "override" else 1.0) for a in attributes])
    if weights.mode == "override":
        return vector.to(gating).expand_as(gating).clone()
    return gating * vector.to(gating)
