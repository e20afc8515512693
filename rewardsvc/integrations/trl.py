"""TRL reward functions (GRPOTrainer, RLOOTrainer): `reward_func(prompts, completions, **kwargs) -> list[float]`,
sync or async (TRL runs coroutine reward functions concurrently on its own event loop).

    from rewardsvc.integrations.trl import reward_funcs
    funcs = reward_funcs("localhost:50051", attributes=[None, "safety"], log_gating=True)
    GRPOTrainer(..., reward_funcs=funcs, args=GRPOConfig(..., reward_weights=funcs.reward_weights))

- One function per entry of `attributes` (None = the overall score, a name = that attribute's reward). TRL
  calls each with the same batch; they share one Score RPC per batch (the first call scores, the others reuse
  its answer), split only above `max_conversations_per_call`.
- `log_gating=True` adds one function per attribute, `rewardsvc_gating_<attribute>`, returning each sample's
  gating weight. TRL logs every reward function's mean (`rewards/rewardsvc_gating_safety/mean`), so the
  gating reaches the trainer's logs; give them weight 0 (`funcs.reward_weights` does) so they never change
  the reward.
- TRL names each function's log after `__name__`: `rewardsvc_score`, `rewardsvc_<attribute>`.

Client side: grpc and protobuf only (no torch).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import InvalidInputError
from ..types import AttributeWeights, ScoreResult


def trl_conversation(prompt: Any, completion: Any) -> list[dict[str, str]]:
    """TRL's (prompt, completion) -> one conversation. Conversational: prompt = messages, completion =
    [{"role": "assistant", "content": ...}]; standard: both plain strings."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if isinstance(completion, str):
        return [*messages, {"role": "assistant", "content": completion}]
    if isinstance(completion, dict):
        completion = [completion]
    return [*messages, *[dict(m) for m in completion]]


def _as_weights(weights: AttributeWeights | dict | None) -> AttributeWeights | None:
    if weights is None or isinstance(weights, AttributeWeights):
        return weights
    return AttributeWeights(mode=weights["mode"], values=weights.get("values") or {})


def _batch(prompts: Sequence[Any], completions: Sequence[Any], weights) -> tuple[str, list[list[dict[str, str]]]]:
    """(fingerprint of the batch, its conversations)."""
    if len(prompts) != len(completions):
        raise InvalidInputError(f"got {len(prompts)} prompts and {len(completions)} completions", field="completions")
    conversations = [trl_conversation(p, c) for p, c in zip(prompts, completions)]
    key = hashlib.sha256(json.dumps([conversations, repr(weights)], sort_keys=True).encode()).hexdigest()
    return key, conversations


class RewardFuncs(list):
    """The reward functions (a list, as TRL takes it) plus `reward_weights`: 1.0 for a score or attribute
    function, 0.0 for a gating-logging one (pass it as GRPOConfig(reward_weights=...))."""

    reward_weights: list[float]


def _pick(attribute: str | None, kind: str) -> Callable[[list[ScoreResult]], list[float]]:
    def values(results: list[ScoreResult]) -> list[float]:
        if attribute is None:
            return [r.score for r in results]
        table = (lambda r: r.rewards) if kind == "reward" else (lambda r: r.gating)
        if results and attribute not in table(results[0]):
            raise InvalidInputError(f"attribute {attribute!r} is not one of the model's {sorted(table(results[0]))}", field="attribute")
        return [table(r)[attribute] for r in results]

    return values


def _specs(attributes: Sequence[str | None], log_gating: bool, gating_names: Sequence[str]) -> list[tuple[str, Callable, float]]:
    specs = [(f"rewardsvc_{a or 'score'}", _pick(a, "reward"), 1.0) for a in attributes]
    if log_gating:
        specs += [(f"rewardsvc_gating_{a}", _pick(a, "gating"), 0.0) for a in gating_names]
    return specs


def _gating_names(client, log_gating: bool, gating_attributes: Sequence[str] | None) -> list[str]:
    if not log_gating:
        return []
    if gating_attributes is not None:
        return list(gating_attributes)
    return list(client.model_info()["attributes"])  # one RPC when the functions are made


def reward_funcs(client_or_target: Any, attributes: Sequence[str | None] = (None,), weights: AttributeWeights | dict | None = None,
                 *, log_gating: bool = False, gating_attributes: Sequence[str] | None = None,
                 max_conversations_per_call: int = 256, **client_kwargs) -> RewardFuncs:  # fmt: skip
    """Synchronous TRL reward functions. `client_or_target`: a RewardClient, or a target ("host:port") for
    which one is made with `client_kwargs` (token=..., tls=..., timeout=...)."""
    from ..client import RewardClient

    client = client_or_target if isinstance(client_or_target, RewardClient) else RewardClient(client_or_target, **client_kwargs)
    weights = _as_weights(weights)
    last: list[tuple[str, list[ScoreResult]]] = []  # (fingerprint, results) of the last batch
    lock = threading.Lock()

    def score(prompts, completions) -> list[ScoreResult]:
        key, conversations = _batch(prompts, completions, weights)
        with lock:  # TRL calls the functions one after another; the lock covers threaded callers too
            if last and last[0][0] == key:
                return last[0][1]
            results: list[ScoreResult] = []
            for start in range(0, len(conversations), max_conversations_per_call):
                results.extend(client.score(conversations[start : start + max_conversations_per_call], weights))
            last[:] = [(key, results)]
            return results

    def make(name: str, values: Callable, _weight: float):
        def reward_func(prompts, completions, **kwargs) -> list[float]:
            return values(score(prompts, completions))

        reward_func.__name__ = reward_func.__qualname__ = name  # TRL logs rewards under this name
        return reward_func

    specs = _specs(attributes, log_gating, _gating_names(client, log_gating, gating_attributes))
    funcs = RewardFuncs(make(*spec) for spec in specs)
    funcs.reward_weights = [w for _, _, w in specs]
    funcs.client = client
    return funcs


def async_reward_funcs(target: str, attributes: Sequence[str | None] = (None,), weights: AttributeWeights | dict | None = None,
                       *, log_gating: bool = False, gating_attributes: Sequence[str] | None = None,
                       max_conversations_per_call: int = 256, **client_kwargs) -> RewardFuncs:  # fmt: skip
    """Coroutine TRL reward functions over grpc.aio. A grpc.aio channel belongs to the event loop it was made
    on, so one AsyncRewardClient is made per running loop, on first use. The functions of one batch run
    concurrently: the first starts the Score RPC as a task, the others await the same task.

    With log_gating and no `gating_attributes`, the attribute names are read once now with a sync client."""
    from ..client import AsyncRewardClient, RewardClient

    weights = _as_weights(weights)
    if log_gating and gating_attributes is None:
        with RewardClient(target, **client_kwargs) as probe:
            gating_attributes = list(probe.model_info()["attributes"])
    # Keyed by the loop object itself (an id could be reused by a later loop).
    clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    tasks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # per loop: (fingerprint, task) of the last batch

    async def run(client, conversations) -> list[ScoreResult]:
        results: list[ScoreResult] = []
        for start in range(0, len(conversations), max_conversations_per_call):
            results.extend(await client.score(conversations[start : start + max_conversations_per_call], weights))
        return results

    async def score(prompts, completions) -> list[ScoreResult]:
        loop = asyncio.get_running_loop()
        key, conversations = _batch(prompts, completions, weights)
        if loop not in clients:
            clients[loop] = AsyncRewardClient(target, **client_kwargs)
        held = tasks.get(loop)
        if held is None or held[0] != key or (held[1].done() and held[1].exception() is not None):
            held = (key, loop.create_task(run(clients[loop], conversations)))
            tasks[loop] = held
        return await asyncio.shield(held[1])  # one caller's cancel must not cancel the shared RPC

    def make(name: str, values: Callable, _weight: float):
        async def reward_func(prompts, completions, **kwargs) -> list[float]:
            return values(await score(prompts, completions))

        reward_func.__name__ = reward_func.__qualname__ = name
        return reward_func

    specs = _specs(attributes, log_gating, list(gating_attributes or ()))
    funcs = RewardFuncs(make(*spec) for spec in specs)
    funcs.reward_weights = [w for _, _, w in specs]
    return funcs
