"""eval/stage0_cached_record.py's per-epoch rows: which steps an epoch covers, whether it is complete, its mean
online loss and the validation saved inside it, checked on a small state written out by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def record_module():
    spec = importlib.util.spec_from_file_location("stage0_cached_record", ROOT / "eval" / "stage0_cached_record.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_last_epoch_of_a_schedule_rounded_up_to_whole_steps_is_complete():
    # 10 pairs, 4 a step: an epoch is 3 steps (12 pair slots), and 3 epochs are ceil(30 / 4) = 8 steps, not 9.
    state = {
        "train_pairs": 10, "step": 8, "total_steps": 8,
        "losses": [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.3],
        "validation": [{"step": 2, "accuracy": 0.5}, {"step": 5, "accuracy": 0.6}, {"step": 8, "accuracy": 0.7}],
    }  # fmt: skip
    rows = record_module().epoch_rows(state, pairs_per_step=4)
    assert [r["steps"] for r in rows] == ["1-3", "4-6", "7-8"]
    assert [r["complete"] for r in rows] == [True, True, True]
    assert [r["mean_loss"] for r in rows] == [0.6, 0.3, 0.2]
    # no save fell on step 3 or 6; step 8 ends both the last epoch and the schedule
    assert [r["val_accuracy_at_end"] for r in rows] == [None, None, 0.7]
    assert [r["last_val_in_epoch"] for r in rows] == [
        {"step": 2, "accuracy": 0.5}, {"step": 5, "accuracy": 0.6}, {"step": 8, "accuracy": 0.7},
    ]  # fmt: skip


def test_an_epoch_cut_by_a_stopped_run_is_not_complete():
    state = {"train_pairs": 8, "step": 3, "total_steps": 6, "losses": [0.7, 0.5, 0.4], "validation": []}
    rows = record_module().epoch_rows(state, pairs_per_step=4)
    assert [(r["steps"], r["complete"], r["last_val_in_epoch"]) for r in rows] == [("1-2", True, None), ("3-3", False, None)]
