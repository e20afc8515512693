"""The coalescing of rewardsvc.integrations.verl_reward_loop, without Ray: samples submitted together go out in
one call (split at max_batch), each gets its own outcome, and the settings are validated."""

from __future__ import annotations

import asyncio

import pytest

from rewardsvc.errors import InvalidInputError
from rewardsvc.integrations.verl_reward_loop import Coalescer, ManagerSettings


def test_samples_submitted_together_share_calls_of_at_most_max_batch():
    calls: list[list[str]] = []

    async def score_many(conversations):
        calls.append(list(conversations))
        return [InvalidInputError(f"{c}: rejected", field="conversations[0]") if c == "bad" else f"scored {c}"
                for c in conversations]  # fmt: skip

    async def chunk():
        coalescer = Coalescer(score_many, window_s=0.005, max_batch=2)
        return await asyncio.gather(*(coalescer.submit(c) for c in ["a", "b", "bad", "d", "e"]), return_exceptions=True)

    outcomes = asyncio.run(chunk())
    assert calls == [["a", "b"], ["bad", "d"], ["e"]]  # full batches at once, the rest after the window
    assert outcomes[:2] == ["scored a", "scored b"] and outcomes[3:] == ["scored d", "scored e"]
    assert isinstance(outcomes[2], InvalidInputError)  # only the rejected sample fails


def test_a_failed_call_fails_each_of_its_samples():
    async def score_many(conversations):
        raise ConnectionError("server gone")

    async def chunk():
        coalescer = Coalescer(score_many, window_s=0.001, max_batch=8)
        return await asyncio.gather(coalescer.submit("a"), coalescer.submit("b"), return_exceptions=True)

    assert all(isinstance(o, ConnectionError) for o in asyncio.run(chunk()))


@pytest.mark.parametrize("kwargs, field", [({"window_ms": 0}, "window_ms"), ({"window_ms": 5000}, "window_ms"),
                                           ({"max_batch": 0}, "max_batch"), ({"traget": "x"}, "reward_kwargs")])  # fmt: skip
def test_settings_name_the_bad_key(kwargs, field):
    with pytest.raises(InvalidInputError) as info:
        ManagerSettings.of(kwargs)
    assert info.value.field == field and field in str(info.value)
