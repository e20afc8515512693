"""Length calibration after stage 2: one common offset on the verbosity penalties so that the score's Spearman
with response length is ~0 on the stage-2 responses of the reference categories (TrainConfig.length_reference)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import InvalidInputError
from ..model.heads import ArmoHeads
from .debias import apply_length_offset, fit_length_offset
from .pair_split import PairSplit


def calibrate_length(heads: ArmoHeads, splits: Sequence[PairSplit], i: int, categories: Sequence[str],
                      verbosity_index: int) -> dict[str, Any]:  # fmt: skip
    """Apply the common lambda offset fit on the splits' responses of `categories` (in place); its report."""
    prompt, responses, lengths = [], [], []
    for split in splits:
        keep = [p.category in categories for p in split.pairs]
        mine = torch.tensor(keep, dtype=torch.bool)
        pairs = [p for p, kept in zip(split.pairs, keep) if kept]
        prompt += [split.prompt[mine, i], split.prompt[mine, i]]
        responses += [split.chosen[mine, i], split.rejected[mine, i]]
        lengths += [len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs]
    if len(lengths) < 3:
        raise InvalidInputError(f"length_reference {tuple(categories)} matches fewer than 2 stage-2 pairs",
                                field="length_reference")  # fmt: skip
    with torch.inference_mode():
        gating, rewards = heads.gate(torch.cat(prompt)), heads.rewards(torch.cat(responses))
    transform = heads.reward_transform_matrix
    delta, rho, rho_zero = fit_length_offset(rewards, gating, transform, verbosity_index, lengths)
    heads.reward_transform_matrix.copy_(apply_length_offset(transform, verbosity_index, delta))
    return {"delta": delta, "spearman": rho, "spearman_at_zero": rho_zero, "responses": len(lengths),
            "reference": f"stage-2 training and validation responses of {', '.join(categories)}"}  # fmt: skip
