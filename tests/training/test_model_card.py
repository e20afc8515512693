"""The model card's limitations are read from the provenance they describe."""

from __future__ import annotations

import copy
import json

from rewardsvc.model.scorer import DEFAULT_MODEL_DIR
from rewardsvc.training.model_card import render


def _packaged() -> dict:
    return json.loads((DEFAULT_MODEL_DIR / "rewardsvc.json").read_text())


def test_the_packaged_card_is_the_rendering_of_its_provenance():
    assert (DEFAULT_MODEL_DIR / "MODEL_CARD.md").read_text() == render(_packaged())


def test_limitations_name_every_category_below_the_length_baseline():
    config = _packaged()
    shipped = config["provenance"]["metrics"]["eval"]["after_debiasing"]
    base = shipped["length_baseline"]["categories"]
    below = sorted(c for c, r in shipped["categories"].items() if r["accuracy"] < base[c]["accuracy"])
    limitations = render(config).split("## Limitations")[1]
    line = next(x for x in limitations.splitlines() if x.startswith("- Below the length baseline"))
    assert below and all(f"{c} (" in line for c in below)
    assert all(f"{c} (" not in line for c in set(shipped["categories"]) - set(below))


def test_limitations_follow_coverage_and_stage0():
    config = copy.deepcopy(_packaged())
    features = config["provenance"]["data"]["features"]
    features["conversations_stored"] = features["conversations_wanted"] - 1
    assert "partial feature pass" in render(config)
    features["conversations_stored"] = features["conversations_wanted"]
    config["backbone"]["adapter"] = "adapter"
    text = render(config)
    assert "partial feature pass" not in text and "No stage 0" not in text


def test_limitations_state_a_length_correlation_over_the_bound():
    config = copy.deepcopy(_packaged())
    shipped = config["provenance"]["metrics"]["eval"]["after_debiasing"]
    shipped["verbosity_spearman"] = -0.25
    assert "Spearman(score, length) = -0.250" in render(config).split("## Limitations")[1]
    shipped["verbosity_spearman"] = 0.05
    assert "Spearman(score, length)" not in render(config).split("## Limitations")[1]


def test_the_card_states_the_length_offset_and_where_it_was_calibrated():
    config = _packaged()
    offset = config["provenance"]["metrics"]["length_offset"]
    text = render(config)
    assert f"raised by **{offset['delta']:+.3f}** (length calibration `{offset['method']}`" in text and offset["reference"] in text
    # A checkpoint from before the choice of method: one reference, Spearman as plain numbers.
    legacy = {"delta": offset["delta"], "spearman": offset["spearman"]["chat"], "spearman_at_zero": offset["spearman_at_zero"]["chat"],
              "responses": offset["responses"], "reference": offset["reference"]}  # fmt: skip
    config["provenance"]["metrics"]["length_offset"] = legacy
    assert f"raised by **{offset['delta']:+.2f}**, so that Spearman(score, length) is" in render(config)
    del config["provenance"]["metrics"]["length_offset"]
    assert "raised by" not in render(config)  # checkpoints fit before the calibration existed still render


def test_limitations_name_every_category_whose_length_correlation_is_over_the_bound():
    config = copy.deepcopy(_packaged())
    shipped = config["provenance"]["metrics"]["eval"]["after_debiasing"]
    shipped["verbosity_spearman_by_category"] = {"chat": 0.05, "honesty": 0.21, "safety": -0.228, "tiny": None}
    line = next(x for x in render(config).split("## Limitations")[1].splitlines() if x.startswith("- Within held-out"))
    assert "honesty (+0.210)" in line and "safety (-0.228)" in line and "chat (" not in line and "tiny" not in line
