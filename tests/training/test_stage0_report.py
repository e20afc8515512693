"""rewardsvc.training.stage0_report: the per-epoch rows (which steps an epoch covers, whether it is complete, its
mean online loss, the validation saved inside it) on states written out by hand, and the summary a checkpoint
records of a real (tiny) stage-0 run."""

from __future__ import annotations

from rewardsvc.training.stage0_report import epoch_rows, stage0_summary
from test_stage0_cached import causal_dir  # noqa: F401  (the tiny 4-block Llama fixture)


def test_the_last_epoch_of_a_schedule_rounded_up_to_whole_steps_is_complete():
    # 10 pairs, 4 a step: an epoch is 3 steps (12 pair slots), and 3 epochs are ceil(30 / 4) = 8 steps, not 9.
    state = {
        "train_pairs": 10, "step": 8, "total_steps": 8,
        "losses": [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.3],
        "validation": [{"step": 2, "accuracy": 0.5}, {"step": 5, "accuracy": 0.6}, {"step": 8, "accuracy": 0.7}],
    }  # fmt: skip
    rows = epoch_rows(state, pairs_per_step=4)
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
    rows = epoch_rows(state, pairs_per_step=4)
    assert [(r["steps"], r["complete"], r["last_val_in_epoch"]) for r in rows] == [("1-2", True, None), ("3-3", False, None)]


def test_the_summary_of_a_real_run_and_the_model_card_section_it_renders(tmp_path, causal_dir):
    """A tiny stage 0 from a cache, summarised from its state.json; the card section quotes the summary."""
    from test_stage0_cached import _config
    from test_stage0 import _pairs

    from rewardsvc.config import BackboneConfig
    from rewardsvc.training.model_card import STAGE0_PAIRS_DROPPED, _stage0
    from rewardsvc.training.stage0_cached import fill_cache, stage0_dir, train_stage0_cached

    backbone, config = BackboneConfig(model=str(causal_dir)), _config(k=2, epochs=2)
    fill_cache(tmp_path / "cache", backbone, [*_pairs(6), *_pairs(3)], [config.cache_block], 512)
    state = train_stage0_cached(tmp_path / "work", tmp_path / "cache", backbone, config, _pairs(6), _pairs(3), save_every=2)
    summary = stage0_summary(stage0_dir(tmp_path / "work", 2) / "adapter")
    assert (summary["train_pairs"], summary["steps_per_epoch"], summary["step"], summary["total_steps"]) == (6, 2, 4, 4)
    assert summary["train_seconds"] == state.seconds and summary["seconds_per_epoch"] == round(state.seconds / 4 * 2, 1)
    assert [e["mean_loss"] for e in summary["epochs"]] == [round(sum(state.losses[i : i + 2]) / 2, 4) for i in (0, 2)]
    assert summary["frozen_probe"] == state.frozen_probe and summary["adapted_probe"] == state.adapted_probe
    assert summary["validation_last"] == state.validation[-1]
    assert summary["trained_pairs_recorded"] == 6
    card = "\n".join(_stage0(summary, "adapter", {"stage2_train": 10, "dropped": {STAGE0_PAIRS_DROPPED: 6}}))
    assert "top 2 of the 3 blocks the heads read (blocks 2-3)" in card and "4 of 4 steps" in card
    assert f"{100 * state.adapted_probe['val_accuracy']:.1f} % on the adapted one" in card
    assert "Stage 2 was fit on the 10 training pairs stage 0 did not train on (6 it trained on were left out" in card
    assert "Stage 2 was fit on every training pair" in "\n".join(_stage0(summary, "adapter", {"stage2_train": 16}))
    assert stage0_summary(tmp_path / "elsewhere" / "adapter") is None  # an adapter made elsewhere: nothing recorded
    assert "not recorded" in "\n".join(_stage0(None, "adapter", {})) and _stage0(None, None, {}) == []
