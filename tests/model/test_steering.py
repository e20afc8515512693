"""Steering: override replaces the gating, mask scales it; weights are validated before any model work."""

from __future__ import annotations

import pytest
import torch

from rewardsvc.errors import InvalidInputError
from rewardsvc.model.steering import steer
from rewardsvc.types import AttributeWeights, weights_source

ATTRS = ("helpful", "safe", "verbose")
GATING = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])  # (B=2, K=3)


def test_override_replaces_the_gating_row_by_row():
    used = steer(GATING, AttributeWeights("override", {"safe": 2.0, "helpful": 0.5}), ATTRS)
    torch.testing.assert_close(used, torch.tensor([[0.5, 2.0, 0.0], [0.5, 2.0, 0.0]]))
    used[0, 0] = 9.0  # a fresh tensor, not a view shared between rows
    assert used[1, 0] == 0.5


def test_mask_scales_the_named_attributes_only():
    used = steer(GATING, AttributeWeights("mask", {"verbose": 0.0, "safe": 0.5}), ATTRS)
    torch.testing.assert_close(used, torch.tensor([[0.5, 0.15, 0.0], [0.1, 0.05, 0.0]]))


def test_dtype_and_device_follow_the_gating():
    used = steer(GATING.double(), AttributeWeights("mask", {}), ATTRS)
    assert used.dtype == torch.float64
    torch.testing.assert_close(used, GATING.double())


def test_unknown_attribute_names_are_refused():
    with pytest.raises(InvalidInputError, match="unknown attributes") as info:
        steer(GATING, AttributeWeights("override", {"nope": 1.0}), ATTRS)
    assert info.value.field == "weights.values"


@pytest.mark.parametrize(
    "mode, values, match",
    [
        ("boost", {}, "weights.mode"),
        ("mask", {"safe": float("nan")}, "finite"),
        ("mask", {"safe": True}, "finite"),
        ("override", {"safe": "1"}, "finite"),
        ("override", {"safe": -1.0}, r"in \[0, 1e\+06\]"),
        ("mask", {"safe": 2e6}, r"in \[0, 1e\+06\]"),  # types.MAX_WEIGHT: larger would overflow float32 heads
    ],
)
def test_weights_are_validated(mode, values, match):
    with pytest.raises(InvalidInputError, match=match):
        AttributeWeights(mode, values)


def test_weights_source():
    assert weights_source(None) == "gating"
    assert weights_source(AttributeWeights("mask", {})) == "mask"
    assert weights_source(AttributeWeights("override", {"safe": 1})) == "override"
