"""Which stage-2 training pairs stage 0 trains on, and which ones the heads are then fit on.

A stage-0 adapter memorises its training pairs (train accuracy 90 % against 64 % on validation, docs/TRAINING.md).
Preference heads and the gating fit on those same pairs then learn from separations validation never sees:
the refit on an adapter trained on every short pair lost 2.5 points of validation in the candidate with
preference heads. So stage 0 can train on a share of the prompt groups only (`--stage0-share`), its state records
the ids of the pairs it trained on (stage0_report.trained_pair_ids), and `rewardsvc train --adapter` fits stage 2
on the others.

Whole prompt groups go to one side, by a seeded hash of the group: pairs sharing a prompt never straddle it.

Measured on 2026-12-06 (docs/TRAINING.md): stage 2 on unseen pairs did not win the validation back (65.9 % with
the whole adapter and the long pairs, 66.1 % with half the prompt groups each way, against 66.4 % on all pairs).
It stays the default with an adapter because it is the fit without leakage, not because it scored higher.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InvalidInputError
from .data.schema import PreferencePair
from .data.splits import unit_hash


def check_share(share: float) -> float:
    if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0.0 < float(share) <= 1.0:
        raise InvalidInputError(f"--stage0-share must be a number in (0, 1], got {share!r}", field="stage0_share")
    return float(share)


def stage0_share(pairs: Sequence[PreferencePair], share: float, seed: int) -> list[PreferencePair]:
    """The pairs whose prompt group falls in the first `share` of a seeded hash (all of them at share 1)."""
    share = check_share(share)
    if share == 1.0:
        return list(pairs)
    return [p for p in pairs if unit_hash(p.group, f"stage0-share/{seed}") < share]
