"""Score a batch in which some samples may be rejected, without failing the others.

The server rejects a Score request as a whole when one conversation in it is invalid (too long, refused by
the template, malformed), naming it in the error's field (`conversations[i]...`). score_tolerantly plans the
calls that score the rest: that conversation's place gets the InvalidInputError and the remaining ones are
sent again. It is a generator, so one plan serves blocking and asyncio clients alike (run_sync, run_async).
Used by the TRL reward functions (a rejected sample -> None) and verl's reward-loop manager (-> that sample's
error). Client side: stdlib and rewardsvc.wire.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any

from ..errors import InvalidInputError
from ..types import ScoreResult
from ..wire import messages_to_pb

Outcome = ScoreResult | InvalidInputError
Plan = Generator[list[Any], list[ScoreResult], list[Outcome]]

_CONVERSATION_INDEX = re.compile(r"^conversations\[(\d+)\]")


def score_tolerantly(conversations: Sequence[Any], max_per_call: int) -> Plan:
    """Yields each batch of conversations to score and is sent its results, or thrown the InvalidInputError
    that rejected it; returns one outcome per conversation. An error about the request as a whole (the
    weights, a limit on the count) is raised: no sample could be scored. Conversations that cannot even be put
    on the wire are rejected before any call."""
    out: list[Outcome | None] = [None] * len(conversations)
    pending: list[int] = []
    for i, conversation in enumerate(conversations):
        try:
            messages_to_pb(conversation, f"conversations[{i}]")
            pending.append(i)
        except InvalidInputError as exc:
            out[i] = exc
    while pending:
        batch, pending = pending[:max_per_call], pending[max_per_call:]
        try:
            results = yield [conversations[i] for i in batch]
            for i, result in zip(batch, results, strict=True):
                out[i] = result
        except InvalidInputError as exc:
            match = _CONVERSATION_INDEX.match(getattr(exc, "field", None) or "")
            if match is None or int(match.group(1)) >= len(batch):
                raise
            j = int(match.group(1))
            out[batch[j]] = exc
            pending = batch[:j] + batch[j + 1 :] + pending
    return out  # type: ignore[return-value]  (every place is filled)


def run_sync(plan: Plan, call: Callable[[list[Any]], list[ScoreResult]]) -> list[Outcome]:
    """Carry out a plan with a blocking score call."""
    try:
        batch = next(plan)
        while True:
            try:
                results = call(batch)
            except InvalidInputError as exc:
                batch = plan.throw(exc)
                continue
            batch = plan.send(results)
    except StopIteration as stop:
        return stop.value


async def run_async(plan: Plan, call: Callable[[list[Any]], Awaitable[list[ScoreResult]]]) -> list[Outcome]:
    """Carry out a plan with an awaited score call."""
    try:
        batch = next(plan)
        while True:
            try:
                results = await call(batch)
            except InvalidInputError as exc:
                batch = plan.throw(exc)
                continue
            batch = plan.send(results)
    except StopIteration as stop:
        return stop.value
