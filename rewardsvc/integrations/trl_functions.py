"""The machinery of the TRL reward functions, apart from any client: TRL's (prompt, completion) -> a
conversation, one scoring call shared by every function of a batch, and the gating metrics.

`rewardsvc.integrations.trl` binds these to a client it makes from a target; `RewardClient.trl_reward_funcs`
binds them to itself. This module imports no client, so the client can offer that shortcut without an import
cycle (tests/test_import_rules.py). Client side: stdlib (and rewardsvc.wire through partial_batches).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import InvalidInputError
from ..types import AttributeWeights, ScoreResult
from .partial_batches import run_async, run_sync, score_tolerantly

log = logging.getLogger("rewardsvc.integrations.trl")


def trl_conversation(prompt: Any, completion: Any) -> list[dict[str, Any]]:
    """TRL's (prompt, completion) -> one conversation. Conversational: prompt = messages, completion =
    [{"role": "assistant", "content": ...}] (with tools: assistant turns with tool_calls, tool messages, and the
    final assistant turn); standard: both plain strings."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if isinstance(completion, str):
        return [*messages, {"role": "assistant", "content": completion}]
    if isinstance(completion, dict):
        completion = [completion]
    return [*messages, *[dict(m) for m in completion]]


def _batch(prompts: Sequence[Any], completions: Sequence[Any], weights) -> tuple[str, list[list[dict[str, str]]]]:
    """(fingerprint of the batch, its conversations)."""
    if len(prompts) != len(completions):
        raise InvalidInputError(f"got {len(prompts)} prompts and {len(completions)} completions", field="completions")
    conversations = [trl_conversation(p, c) for p, c in zip(prompts, completions)]
    key = hashlib.sha256(json.dumps([conversations, repr(weights)], sort_keys=True).encode()).hexdigest()
    return key, conversations


def _none_for_rejected(results: list[ScoreResult | InvalidInputError]) -> list[ScoreResult | None]:
    """A rejected sample gets None (TRL turns it into NaN) and a WARNING line with the server's reason."""
    out: list[ScoreResult | None] = []
    for i, result in enumerate(results):
        if isinstance(result, InvalidInputError):
            log.warning("rewardsvc: sample %d of the batch gets no reward (None): the server rejected it: %s", i, result)
            result = None
        out.append(result)
    return out


def _pick(attribute: str | None) -> Callable[[list[ScoreResult | None]], list[float | None]]:
    def values(results: list[ScoreResult | None]) -> list[float | None]:
        scored = [r for r in results if r is not None]
        # z-scores when the call was normalized (normalization=..., or the server's default), else raw values
        if attribute is None:
            return [None if r is None else r.value() for r in results]
        if scored and attribute not in scored[0].rewards:
            raise InvalidInputError(f"attribute {attribute!r} is not one of the model's {sorted(scored[0].rewards)}", field="attribute")
        return [None if r is None else r.value(attribute) for r in results]

    return values


_warned: list[bool] = []


def log_gating_metrics(results: Sequence[ScoreResult | None], kwargs: dict[str, Any]) -> None:
    """Mean gating weight and effective coefficient per attribute over the batch -> TRL's `log_metric`."""
    log_metric = kwargs.get("log_metric")
    if log_metric is None:
        if not _warned:
            _warned.append(True)
            warnings.warn("log_gating: this TRL passes no `log_metric` to reward functions; gating is not logged", stacklevel=3)
        return
    results = [r for r in results if r is not None]
    if not results:
        return
    for name in results[0].gating:
        log_metric(f"rewardsvc/gating/{name}", sum(r.gating[name] for r in results) / len(results))
        log_metric(f"rewardsvc/coefficient/{name}", sum(r.coefficients[name] for r in results) / len(results))


def shared_reward_funcs(client: Any, attributes: Sequence[str | None], weights: AttributeWeights | dict | None, *,
                        log_gating: bool, max_conversations_per_call: int,
                        normalization: Any = None) -> list[Callable[..., list[float]]]:  # fmt: skip
    """Synchronous reward functions over `client` (anything with `score(conversations, weights, normalization=)`,
    e.g. a RewardClient), one per attribute, sharing one scoring call per batch. normalization: True / a
    Normalization (z-scores against the model's calibration), False (raw), None (the server's default)."""
    weights = AttributeWeights.of(weights)
    last: list[tuple[str, list[ScoreResult]]] = []  # (fingerprint, results) of the last batch
    lock = threading.Lock()

    def score(prompts, completions, kwargs) -> list[ScoreResult | None]:
        key, conversations = _batch(prompts, completions, weights)
        with lock:  # TRL calls the functions one after another; the lock covers threaded callers too
            if last and last[0][0] == key:
                return last[0][1]
            results = _none_for_rejected(run_sync(score_tolerantly(conversations, max_conversations_per_call),
                                                  lambda batch: client.score(batch, weights, normalization=normalization)))  # fmt: skip
            last[:] = [(key, results)]
        if log_gating:  # once per batch: by the call that scored it
            log_gating_metrics(results, kwargs)
        return results

    def make(attribute: str | None):
        values = _pick(attribute)

        def reward_func(prompts, completions, **kwargs) -> list[float | None]:
            return values(score(prompts, completions, kwargs))

        reward_func.__name__ = reward_func.__qualname__ = f"rewardsvc_{attribute or 'score'}"  # TRL logs under it
        return reward_func

    return [make(a) for a in attributes]


def shared_async_reward_funcs(new_client: Callable[[], Any], attributes: Sequence[str | None],
                              weights: AttributeWeights | dict | None, *, log_gating: bool,
                              max_conversations_per_call: int, normalization: Any = None) -> list[Callable[..., Any]]:  # fmt: skip
    """Coroutine reward functions. A grpc.aio channel belongs to the event loop it was made on, so
    `new_client()` (an object with `async score(conversations, weights)`) is called once per running loop, on
    first use. The functions of one batch run concurrently: the first starts the scoring call as a task, the
    others await the same task."""
    weights = AttributeWeights.of(weights)
    # Keyed by the loop object itself (an id could be reused by a later loop).
    clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    tasks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # per loop: (fingerprint, task) of the last batch

    async def run(client, conversations, kwargs) -> list[ScoreResult | None]:
        results = _none_for_rejected(await run_async(score_tolerantly(conversations, max_conversations_per_call),
                                                     lambda batch: client.score(batch, weights, normalization=normalization)))  # fmt: skip
        if log_gating:
            log_gating_metrics(results, kwargs)
        return results

    async def score(prompts, completions, kwargs) -> list[ScoreResult | None]:
        loop = asyncio.get_running_loop()
        key, conversations = _batch(prompts, completions, weights)
        if loop not in clients:
            clients[loop] = new_client()
        held = tasks.get(loop)
        if held is None or held[0] != key or (held[1].done() and held[1].exception() is not None):
            held = (key, loop.create_task(run(clients[loop], conversations, kwargs)))
            tasks[loop] = held
        return await asyncio.shield(held[1])  # one caller's cancel must not cancel the shared RPC

    def make(attribute: str | None):
        values = _pick(attribute)

        async def reward_func(prompts, completions, **kwargs) -> list[float | None]:
            return values(await score(prompts, completions, kwargs))

        reward_func.__name__ = reward_func.__qualname__ = f"rewardsvc_{attribute or 'score'}"
        return reward_func

    return [make(a) for a in attributes]
