"""verl's reward function, per sample: the reward model's score of a prompt + verl's `solution_str`.

verl 0.9.1's Reward Loop (verl/experimental/reward_loop) calls
`compute_score(data_source=, solution_str=, ground_truth=, extra_info=, **reward_kwargs)` once per sample, and
awaits it when it is an `async def` (managers naive, dapo, gdpo, rate_limited; the `remote` manager refuses
coroutines and pickles the function to a Ray actor). Both forms are here:

- `compute_score`: blocking, over a RewardClient (one per (target, token) per process, thread-safe);
- `compute_score_async`: `async def`, over an AsyncRewardClient (grpc.aio: one per event loop).

`solution_str` is the response only; the prompt comes from `extra_info["prompt"]`: chat messages or a plain
string. (rewardsvc.integrations.verl_reward_loop's manager reads verl's own `raw_prompt` instead, so nothing
needs copying there.) `data_source` and `ground_truth` are not used: a reward model needs no reference answer.

reward_kwargs: `target` ("host:port", default $REWARDSVC_TARGET or localhost:50051), `token` (default
$REWARDSVC_AUTH_TOKEN), `attribute` (one attribute's reward instead of the overall score), `weights`
(steering, as for the client), `return_dict` (True: {"score", "reward/<attribute>", "gating/<attribute>",
"coefficient/<attribute>"}, which verl's managers put into reward_extra_info, so the parts reach its logs),
`normalize` (true: z-scores against the model's calibration, docs/SERVING.md, with "raw_score" in the dict;
false: raw; absent: the server's default).

These functions live in an importable module so that a Ray actor (the `remote` manager) unpickles them by
reference, even when verl loaded rewardsvc/integrations/verl.py by file path. Client side: no torch.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Mapping
from typing import Any

from ..errors import InvalidInputError
from ..messages import as_list
from ..types import ScoreResult

DEFAULT_TARGET = "localhost:50051"
PROMPT_KEY = "prompt"

_clients: dict[tuple[str, str | None], Any] = {}
_lock = threading.Lock()
_async_clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> {(target, token): client}


def endpoint(target: str | None, token: str | None) -> tuple[str, str | None]:
    """(target, token) with the environment's defaults."""
    return (target or os.environ.get("REWARDSVC_TARGET") or DEFAULT_TARGET,
            token or os.environ.get("REWARDSVC_AUTH_TOKEN") or None)  # fmt: skip


def client(target: str | None, token: str | None):
    from ..client import RewardClient

    key = endpoint(target, token)
    with _lock:
        if key not in _clients:
            _clients[key] = RewardClient(key[0], token=key[1])
        return _clients[key]


def async_client(target: str | None, token: str | None):
    """The AsyncRewardClient of the running event loop (a grpc.aio channel belongs to the loop it was made on)."""
    from ..client import AsyncRewardClient

    key = endpoint(target, token)
    per_loop = _async_clients.setdefault(asyncio.get_running_loop(), {})
    if key not in per_loop:
        per_loop[key] = AsyncRewardClient(key[0], token=key[1])
    return per_loop[key]


def prompt_messages(prompt: Any, field: str) -> list[dict[str, Any]]:
    """A prompt given as a string (one user turn) or as chat messages (a list, or the numpy object array that
    parquet-backed data hands back), as a list of message dicts."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    prompt = as_list(prompt)
    if not isinstance(prompt, list) or not all(isinstance(m, Mapping) for m in prompt):
        raise InvalidInputError(f"{field}: must be a string or a list of chat messages", field=field)
    return [dict(m) for m in prompt]


def conversation(solution_str: Any, extra_info: Any, field: str = "extra_info") -> list[dict[str, Any]]:
    if not isinstance(solution_str, str):
        raise InvalidInputError(f"solution_str: must be a string, got {type(solution_str).__name__}", field="solution_str")
    if not isinstance(extra_info, Mapping) or extra_info.get(PROMPT_KEY) is None:
        raise InvalidInputError(
            f'{field}["{PROMPT_KEY}"]: missing; verl passes only the response as solution_str, so put the prompt '
            f'(chat messages or a string) into extra_info["{PROMPT_KEY}"] when building the data set, or use the '
            "reward-loop manager (rewardsvc.integrations.verl_reward_loop), which reads verl's raw_prompt",
            field=f"{field}.{PROMPT_KEY}",
        )
    messages = prompt_messages(extra_info[PROMPT_KEY], f'{field}["{PROMPT_KEY}"]')
    return [*messages, {"role": "assistant", "content": solution_str}]


def reward_value(result: ScoreResult, attribute: str | None, return_dict: bool) -> float | dict[str, float]:
    if attribute is not None and attribute not in result.rewards:
        raise InvalidInputError(f"attribute {attribute!r} is not one of the model's {sorted(result.rewards)}", field="attribute")
    score = result.value(attribute)  # the z-score when the call was normalized, else the raw value
    if not return_dict:
        return score
    out = {"score": score}
    if result.normalized is not None:
        out["raw_score"] = result.score
    out.update({f"reward/{k}": v for k, v in result.rewards.items()})
    out.update({f"gating/{k}": v for k, v in result.gating.items()})
    out.update({f"coefficient/{k}": v for k, v in result.coefficients.items()})
    return out


def compute_score(data_source: Any, solution_str: str, ground_truth: Any, extra_info: Mapping | None = None, *,
                  target: str | None = None, token: str | None = None, attribute: str | None = None,
                  weights: Any = None, return_dict: bool = False, normalize: bool | None = None,
                  **_ignored) -> float | dict[str, float]:  # fmt: skip
    """verl's per-sample reward function (blocking): the score of extra_info["prompt"] + solution_str."""
    [result] = client(target, token).score([conversation(solution_str, extra_info)], weights, normalization=normalize)
    return reward_value(result, attribute, return_dict)


async def compute_score_async(data_source: Any, solution_str: str, ground_truth: Any, extra_info: Mapping | None = None,
                              *, target: str | None = None, token: str | None = None, attribute: str | None = None,
                              weights: Any = None, return_dict: bool = False, normalize: bool | None = None,
                              **_ignored) -> float | dict[str, float]:  # fmt: skip
    """The same as compute_score, as a coroutine on the async client (verl awaits it on its worker's loop,
    so the samples of a batch are in flight together instead of taking an executor thread each)."""
    [result] = await async_client(target, token).score([conversation(solution_str, extra_info)], weights,
                                                       normalization=normalize)  # fmt: skip
    return reward_value(result, attribute, return_dict)
