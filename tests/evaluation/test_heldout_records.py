"""The committed per-pair records of the held-out evaluation (eval/results/, written by eval/evaluate_default.py)
are what the shipped model computes: a fixed sample of 8 pairs is rebuilt from the data, re-scored with the
packaged default under the training run's recipe, and must match the committed scores to 1e-4."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECORDS = ROOT / "eval" / "results" / "heldout-rewardsvc-default-smollm2-135m.records.jsonl"
SUMMARY = ROOT / "eval" / "results" / "heldout-rewardsvc-default-smollm2-135m.jsonl"
TOL = 1e-4



def evaluate_default():
    spec = importlib.util.spec_from_file_location("evaluate_default", ROOT / "eval" / "evaluate_default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_records_file_is_the_one_its_summary_describes():
    text = RECORDS.read_text(encoding="utf-8")
    last = json.loads(SUMMARY.read_text(encoding="utf-8").splitlines()[-1])
    assert last["records_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert last["n"] == len(text.splitlines()) and {"machine", "date", "commit"} <= set(last)
    assert last["recipe"]["max_tokens"] == 1024


def test_the_complete_records_give_the_model_cards_headline():
    """The records cover every held-out pair, and counting wins in them (a tie is half a win, as in
    rewardsvc.evaluation.report) gives the accuracy the shipped model's own provenance states."""
    records = [json.loads(line) for line in RECORDS.read_text(encoding="utf-8").splitlines()]
    card = json.loads((ROOT / "rewardsvc" / "default_model" / "rewardsvc.json").read_text())
    overall = card["provenance"]["metrics"]["eval"]["after_debiasing"]["overall"]
    assert json.loads(SUMMARY.read_text(encoding="utf-8").splitlines()[-1])["complete"] is True
    assert len(records) == len({r["id"] for r in records}) == overall["n"] == 1492
    wins = sum(1.0 if r["chosen_score"] > r["rejected_score"] else 0.5 if r["chosen_score"] == r["rejected_score"]
               else 0.0 for r in records)  # fmt: skip
    assert wins / len(records) == pytest.approx(overall["accuracy"], abs=1e-12)


@pytest.mark.slow
@pytest.mark.needs_data
def test_a_fixed_sample_of_the_committed_records_rescores_to_1e_4():
    records = [json.loads(line) for line in RECORDS.read_text(encoding="utf-8").splitlines()]
    sample = sorted(records, key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())[:8]  # fixed by the ids
    assert len(sample) == 8
    ev = evaluate_default()
    scorer, recipe = ev.load_recipe_scorer(None)
    pairs = {p.id: p for p in ev.held_out_pairs(None, recipe)}
    kept, encoded, dropped = ev.encode_pairs(scorer, [pairs[r["id"]] for r in sample])
    assert len(kept) == 8 and not dropped
    results = scorer.score_encoded(encoded)
    for i, (pair, want) in enumerate(zip(kept, sample)):
        got = ev.pair_record(pair, results[2 * i].score, results[2 * i + 1].score)
        assert {k: got[k] for k in ("id", "category", "subset", "chosen_length", "rejected_length")} == \
               {k: want[k] for k in ("id", "category", "subset", "chosen_length", "rejected_length")}  # fmt: skip
        assert got["chosen_score"] == pytest.approx(want["chosen_score"], abs=TOL), pair.id
        assert got["rejected_score"] == pytest.approx(want["rejected_score"], abs=TOL), pair.id
