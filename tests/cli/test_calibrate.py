"""`rewardsvc calibrate` on the tiny random model: the stored statistics equal an independent numpy computation
over the same model's scores, load with the model, and stop matching when the heads change."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rewardsvc.cli import main as cli
from rewardsvc.cli.calibrate import PACKAGED_REFERENCE
from rewardsvc.cli.batch_io import conversation_of
from rewardsvc.config import ScorerConfig
from rewardsvc.model.calibration import CALIBRATION_FILE, read_calibration
from rewardsvc.model.scorer import Scorer
from tiny_models import TINY_ATTRIBUTES, save_tiny_heads

WORDS = ["Paris.", "Berlin is the capital.", "I cannot help with that.", "Sure, here is a long answer: " * 3,
         "42", "Use sorted(items).", "No.", "The sea folds into foam."]  # fmt: skip
ROWS = [{"id": f"r{i}", "prompt": f"Question {i % 3}?", "response": WORDS[i % len(WORDS)] + f" ({i})"} for i in range(14)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def heads_dir(tiny_llama_dir, tmp_path):
    return save_tiny_heads(tmp_path / "heads", tiny_llama_dir)


def test_calibrate_stores_the_numpy_mean_and_std_of_the_scores(heads_dir, tmp_path, capsys):
    reference = write_jsonl(tmp_path / "reference.jsonl", ROWS)
    assert cli.main(["calibrate", str(reference), "--model", str(heads_dir), "--chunk-size", "5"]) == 0
    out = capsys.readouterr().out
    calibration, fingerprint = read_calibration(heads_dir / CALIBRATION_FILE)
    assert calibration.calibration_id in out and calibration.count == len(ROWS)

    # Independent: another Scorer instance, one conversation per call, numpy statistics (ddof=0).
    scorer = Scorer.load(heads_dir, config=ScorerConfig())
    results = [scorer.score([conversation_of(r)])[0] for r in ROWS]
    scores = np.array([r.score for r in results], dtype=np.float64)
    np.testing.assert_allclose(calibration.score.mean, scores.mean(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(calibration.score.std, scores.std(ddof=0), rtol=1e-5, atol=1e-7)
    assert list(calibration.rewards) == list(TINY_ATTRIBUTES)
    for name in TINY_ATTRIBUTES:
        values = np.array([r.rewards[name] for r in results], dtype=np.float64)
        np.testing.assert_allclose(calibration.rewards[name].mean, values.mean(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(calibration.rewards[name].std, values.std(ddof=0), rtol=1e-5, atol=1e-7)

    # Stored with the model: loading the model loads it, bound to these heads.
    assert scorer.calibration is not None and scorer.calibration.calibration_id == calibration.calibration_id
    assert fingerprint.heads_sha256 and fingerprint.model_id == "tiny"
    info = scorer.model_info()["calibration"]
    assert info["available"] and info["calibration_id"] == calibration.calibration_id
    assert info["reference"] == {"path": str(reference), "sha256": info["reference"]["sha256"], "rows": len(ROWS)}


def test_a_calibration_of_other_heads_is_not_used(heads_dir, tiny_llama_dir, tmp_path):
    reference = write_jsonl(tmp_path / "reference.jsonl", ROWS)
    assert cli.main(["calibrate", str(reference), "--model", str(heads_dir)]) == 0
    save_tiny_heads(heads_dir, tiny_llama_dir, seed=7)  # retrained heads, the old calibration.json left behind
    scorer = Scorer.load(heads_dir, config=ScorerConfig())
    assert scorer.calibration is None
    assert "heads_sha256" in scorer.calibration_note and "rewardsvc calibrate" in scorer.calibration_note


def test_dry_run_writes_nothing_and_a_bad_row_stops_the_command(heads_dir, tmp_path, capsys):
    reference = write_jsonl(tmp_path / "reference.jsonl", ROWS)
    assert cli.main(["calibrate", str(reference), "--model", str(heads_dir), "--dry-run"]) == 0
    assert not (heads_dir / CALIBRATION_FILE).exists()
    bad = write_jsonl(tmp_path / "bad.jsonl", ROWS[:3] + [{"id": "x", "messages": [{"role": "user", "content": "hi"}]}])
    assert cli.main(["calibrate", str(bad), "--model", str(heads_dir)]) == 2
    assert "line 4" in capsys.readouterr().err
    assert not (heads_dir / CALIBRATION_FILE).exists()


def test_one_distinct_response_has_no_spread(heads_dir, tmp_path, capsys):
    same = write_jsonl(tmp_path / "same.jsonl", [ROWS[0], ROWS[0]])
    assert cli.main(["calibrate", str(same), "--model", str(heads_dir)]) == 2
    assert "needs spread" in capsys.readouterr().err


def test_the_packaged_reference_set_is_valid_rows():
    rows = [json.loads(line) for line in PACKAGED_REFERENCE.read_text().splitlines()]
    assert len(rows) == 256 and len({r["id"] for r in rows}) == 256
    assert {r["side"] for r in rows} == {"chosen", "rejected"}
    assert {r["category"] for r in rows} == {"chat", "safety"}
    for r in rows:
        conversation_of(r)


def test_a_sequence_classification_model_calibrates_and_normalizes(tmp_path):
    """The other model kind: its one score gets the same statistics, stored in its own directory."""
    from tiny_models import save_tiny_seqcls

    from rewardsvc.normalization import Normalization

    model_dir = save_tiny_seqcls(tmp_path / "seqcls")
    reference = write_jsonl(tmp_path / "reference.jsonl", ROWS)
    assert cli.main(["calibrate", str(reference), "--model", str(model_dir)]) == 0
    scorer = Scorer.load(model_dir, config=ScorerConfig())
    assert scorer.calibration is not None
    scores = np.array([scorer.score([conversation_of(r)])[0].score for r in ROWS], dtype=np.float64)
    np.testing.assert_allclose(scorer.calibration.score.mean, scores.mean(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(scorer.calibration.score.std, scores.std(ddof=0), rtol=1e-5, atol=1e-7)
    [result] = scorer.score([conversation_of(ROWS[0])])
    normalized = scorer.calibration.normalize(result, Normalization())
    assert normalized.normalized.score == pytest.approx((result.score - scores.mean()) / scores.std(), abs=1e-5)
