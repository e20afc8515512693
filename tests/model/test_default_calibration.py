"""The packaged default model ships a calibration that matches it, so normalization works out of the box; its
z-scores over the packaged reference set are centred and scaled as calibrated."""

from __future__ import annotations

import json
import math

import pytest

from rewardsvc.cli.calibrate import PACKAGED_REFERENCE
from rewardsvc.cli.batch_io import conversation_of
from rewardsvc.model.calibration import CALIBRATION_FILE, fingerprint_of, read_calibration
from rewardsvc.model.scorer import DEFAULT_MODEL_DIR
from rewardsvc.normalization import Normalization

pytestmark = pytest.mark.slow

EVERY = 8  # 32 of the 256 reference conversations: a deterministic, evenly spread subset


def test_the_shipped_calibration_matches_the_default_model(embedded_scorer):
    calibration, measured = read_calibration(DEFAULT_MODEL_DIR / CALIBRATION_FILE)
    assert measured.mismatch(fingerprint_of(embedded_scorer)) is None
    assert embedded_scorer.calibration is not None
    assert embedded_scorer.calibration.calibration_id == calibration.calibration_id
    assert calibration.count == 256 and calibration.info["reference"]["path"] == f"packaged:{PACKAGED_REFERENCE.name}"
    assert list(calibration.rewards) == list(embedded_scorer.attributes)


def test_default_model_z_scores_on_the_reference_set(embedded_scorer):
    rows = [json.loads(line) for line in PACKAGED_REFERENCE.read_text().splitlines()][::EVERY]
    results = embedded_scorer.score([conversation_of(r) for r in rows])
    calibration = embedded_scorer.calibration
    normalized = [calibration.normalize(r, Normalization()) for r in results]
    z = [n.normalized.score for n in normalized]
    for n in normalized:
        assert n.normalized.score == pytest.approx((n.score - calibration.score.mean) / calibration.score.std, abs=1e-12)
    # A subset of the calibration set: its z-scores have mean ~0 and std ~1 (standard error of the mean
    # 1/sqrt(32) = 0.18; deterministic, so this either holds for the shipped statistics or never does).
    mean = sum(z) / len(z)
    std = math.sqrt(sum((v - mean) ** 2 for v in z) / len(z))
    assert abs(mean) < 0.5 and 0.6 < std < 1.4, (mean, std)
