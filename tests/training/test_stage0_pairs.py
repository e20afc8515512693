"""Which pairs stage 0 trains on: a seeded share of the prompt groups, whole groups (that stage 2 then fits on the
others is tested end to end in test_stage0.py)."""

from __future__ import annotations

import pytest

from rewardsvc.errors import InvalidInputError
from rewardsvc.training.data.schema import PreferencePair
from rewardsvc.training.stage0_pairs import stage0_share


def _pairs(n_groups: int, per_group: int = 3) -> list[PreferencePair]:
    return [
        PreferencePair(id=f"g{g}-{k}", source="toy", prompt=[{"role": "user", "content": f"question {g}"}], chosen="a",
                       rejected="b", subset="toy", category="chat", group=f"g{g}")
        for g in range(n_groups) for k in range(per_group)
    ]  # fmt: skip


def test_a_share_takes_whole_prompt_groups_and_about_that_share_of_them():
    pairs = _pairs(400)
    taken = stage0_share(pairs, 0.5, seed=0)
    groups, taken_ids = {p.group for p in taken}, {p.id for p in taken}
    assert all(p.id in taken_ids for p in pairs if p.group in groups)  # a group is taken whole or not at all
    assert 160 <= len(groups) <= 240  # binomial(400, 0.5): 5 standard deviations either side
    assert len({p.group for p in stage0_share(pairs, 0.25, seed=0)}) < len(groups)


def test_the_share_depends_on_the_seed_and_the_groups_not_on_the_order():
    pairs = _pairs(60)
    taken = stage0_share(pairs, 0.5, seed=0)
    assert [p.id for p in stage0_share(list(reversed(pairs)), 0.5, seed=0)] == [p.id for p in reversed(taken)]
    assert {p.id for p in stage0_share(pairs, 0.5, seed=1)} != {p.id for p in taken}
    assert stage0_share(pairs, 1.0, seed=3) == pairs


@pytest.mark.parametrize("share", [0, -0.5, 1.5, float("nan"), True, "half"])
def test_a_bad_share_names_the_flag_and_the_range(share):
    with pytest.raises(InvalidInputError, match=r"--stage0-share must be a number in \(0, 1\]"):
        stage0_share(_pairs(3), share, seed=0)
