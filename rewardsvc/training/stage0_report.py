"""What a stage-0 run did, from its saved state.json: per-epoch loss and validation, cost per epoch, probes.

A checkpoint fit on an adapted backbone (`rewardsvc train --adapter W/stage0.../adapter`) records this summary in
its provenance, so the model card can say how the adapter was made; eval/stage0_cached_record.py writes the same
epoch rows to a results file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .stage0 import STATE_FILE


def epoch_rows(state: dict[str, Any], pairs_per_step: int) -> list[dict[str, Any]]:
    """Per epoch of a run over `state["train_pairs"]` pairs: its steps, whether it is complete, the mean online
    loss, and the validation saved at its last step (and the last one saved inside it)."""
    steps_per_epoch = math.ceil(state["train_pairs"] / pairs_per_step)
    rows = []
    for epoch in range(math.ceil(state["step"] / steps_per_epoch)):
        # The schedule is epochs x pairs rounded up to whole steps, so the last epoch can be a step or two short
        # of steps_per_epoch and still hold every pair: it ends with the schedule.
        epoch_end = min((epoch + 1) * steps_per_epoch, state["total_steps"])
        lo, hi = epoch * steps_per_epoch, min(state["step"], epoch_end)
        losses = state["losses"][lo:hi]
        saved = [v for v in state["validation"] if lo < v["step"] <= hi]
        end = saved[-1] if saved and saved[-1]["step"] == hi else None
        rows.append({"epoch": epoch + 1, "steps": f"{lo + 1}-{hi}", "complete": hi == epoch_end,
                     "mean_loss": round(sum(losses) / len(losses), 4),
                     "val_accuracy_at_end": end["accuracy"] if end else None,
                     # saves every N steps need not fall on an epoch's end: the last one inside it
                     "last_val_in_epoch": {"step": saved[-1]["step"], "accuracy": saved[-1]["accuracy"]} if saved else None})  # fmt: skip
    return rows


def stage0_summary(adapter_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The summary of the stage-0 run that wrote `adapter_dir` (its state.json sits beside it), or None for an
    adapter made elsewhere. Full stage 0 (train-backbone without --top-blocks) records no pair count, so it
    gets no epoch rows."""
    state = _state(adapter_dir)
    if state is None:
        return None
    config, step = state["config"], state["step"]
    summary: dict[str, Any] = {
        "config": config, "backbone_id": state.get("backbone_id"), "step": step,
        "total_steps": state.get("total_steps") or config.get("total_steps"), "train_seconds": state["seconds"],
        "validation_last": state["validation"][-1] if state["validation"] else None,
        "trained_pairs_recorded": len(state.get("trained_pair_ids") or ()),
    }  # fmt: skip
    if state.get("train_pairs"):
        steps_per_epoch = math.ceil(state["train_pairs"] / config["pairs_per_step"])
        summary.update({
            "train_pairs": state["train_pairs"], "steps_per_epoch": steps_per_epoch,
            "seconds_per_epoch": round(state["seconds"] / step * steps_per_epoch, 1) if step else None,
            "epochs": epoch_rows(state, config["pairs_per_step"]),
            "frozen_probe": state.get("frozen_probe") or None, "adapted_probe": state.get("adapted_probe") or None,
        })  # fmt: skip
    return summary


def trained_pair_ids(adapter_dir: str | os.PathLike) -> set[str] | None:
    """The ids of the pairs the stage 0 that wrote `adapter_dir` trained on; None where its state has no record
    (an adapter made elsewhere, or by stage 0 before it recorded them)."""
    state = _state(adapter_dir)
    return set(state["trained_pair_ids"]) if state and state.get("trained_pair_ids") else None


def _state(adapter_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(adapter_dir).parent / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path} is not a stage-0 state: {exc}") from exc
