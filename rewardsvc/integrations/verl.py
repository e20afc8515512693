"""verl custom reward functions that call the reward service.

verl's config names a file and a function (`custom_reward_function.path` / `.name`) and passes
`custom_reward_function.reward_kwargs` as keyword arguments:

- `compute_score(data_source, solution_str, ground_truth, extra_info=None, **reward_kwargs)` for the naive
  reward manager (one call per sample; one Score RPC each);
- `compute_score_batch(data_sources, solution_strs, ground_truths, extra_infos, **reward_kwargs)` for the
  batch reward manager (`reward_model.reward_manager=batch`): one Score RPC per batch.

`solution_str` is the response only; the prompt comes from `extra_info["prompt"]`: a list of chat messages
(verl's own `prompt` column, copied into extra_info when the parquet is made) or a plain string. A missing one
is an error naming extra_info["prompt"]. `data_source` and `ground_truth` are not used (a reward model needs no
reference answer).

reward_kwargs: `target` ("host:port", default $REWARDSVC_TARGET or localhost:50051), `token` (default
$REWARDSVC_AUTH_TOKEN), `attribute` (score one attribute's reward instead of the overall score), `weights`
(steering, as for the client), `return_dict` (True: a dict {"score", "reward/<attribute>", "gating/<attribute>",
"coefficient/<attribute>"}
that verl's reward managers put into reward_extra_info, so the parts reach its logs).

Client side: grpc and protobuf only (no torch). One client per (target, token) per process, thread-safe.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InvalidInputError
from ..types import ScoreResult

DEFAULT_TARGET = "localhost:50051"
PROMPT_KEY = "prompt"

_clients: dict[tuple[str, str | None], Any] = {}
_lock = threading.Lock()


def _client(target: str | None, token: str | None):
    from ..client import RewardClient

    key = (target or os.environ.get("REWARDSVC_TARGET") or DEFAULT_TARGET, token or os.environ.get("REWARDSVC_AUTH_TOKEN") or None)
    with _lock:
        if key not in _clients:
            _clients[key] = RewardClient(key[0], token=key[1])
        return _clients[key]


def _prompt(extra_info: Any, field: str) -> Any:
    """extra_info["prompt"] as messages or a string. Parquet hands lists back as numpy object arrays: any
    non-string sequence of mappings is taken."""
    if not isinstance(extra_info, Mapping) or extra_info.get(PROMPT_KEY) is None:
        raise InvalidInputError(
            f'{field}["{PROMPT_KEY}"]: missing; verl passes only the response as solution_str, so put the prompt '
            f'(chat messages or a string) into extra_info["{PROMPT_KEY}"] when building the data set', field=f"{field}.{PROMPT_KEY}"
        )
    prompt = extra_info[PROMPT_KEY]
    if isinstance(prompt, str):
        return prompt
    try:
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    except (TypeError, KeyError) as exc:
        raise InvalidInputError(f'{field}["{PROMPT_KEY}"]: must be a string or a list of {{"role", "content"}} messages', field=f"{field}.{PROMPT_KEY}") from exc


def _conversation(solution_str: Any, extra_info: Any, field: str) -> list[dict[str, str]]:
    if not isinstance(solution_str, str):
        raise InvalidInputError(f"solution_str: must be a string, got {type(solution_str).__name__}", field="solution_str")
    prompt = _prompt(extra_info, field)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return [*messages, {"role": "assistant", "content": solution_str}]


def _value(result: ScoreResult, attribute: str | None, return_dict: bool) -> float | dict[str, float]:
    if attribute is not None and attribute not in result.rewards:
        raise InvalidInputError(f"attribute {attribute!r} is not one of the model's {sorted(result.rewards)}", field="attribute")
    score = result.score if attribute is None else result.rewards[attribute]
    if not return_dict:
        return score
    out = {"score": score}
    out.update({f"reward/{k}": v for k, v in result.rewards.items()})
    out.update({f"gating/{k}": v for k, v in result.gating.items()})
    out.update({f"coefficient/{k}": v for k, v in result.coefficients.items()})
    return out


def compute_score(data_source: Any, solution_str: str, ground_truth: Any, extra_info: Mapping | None = None, *,
                  target: str | None = None, token: str | None = None, attribute: str | None = None,
                  weights: Any = None, return_dict: bool = False, **_ignored) -> float | dict[str, float]:  # fmt: skip
    """verl's per-sample reward function: the reward model's score of extra_info["prompt"] + solution_str."""
    [result] = _client(target, token).score([_conversation(solution_str, extra_info, "extra_info")], weights)
    return _value(result, attribute, return_dict)


def compute_score_batch(data_sources: Sequence[Any], solution_strs: Sequence[str], ground_truths: Sequence[Any],
                        extra_infos: Sequence[Mapping | None], *, target: str | None = None, token: str | None = None,
                        attribute: str | None = None, weights: Any = None, return_dict: bool = False,
                        max_conversations_per_call: int = 256, **_ignored) -> list[float | dict[str, float]]:  # fmt: skip
    """verl's batched reward function (BatchRewardManager): one Score RPC per batch (split above
    max_conversations_per_call)."""
    if len(solution_strs) != len(extra_infos):
        raise InvalidInputError(f"got {len(solution_strs)} solution_strs and {len(extra_infos)} extra_infos", field="extra_infos")
    conversations = [_conversation(s, e, f"extra_infos[{i}]") for i, (s, e) in enumerate(zip(solution_strs, extra_infos))]
    client = _client(target, token)
    results: list[ScoreResult] = []
    for start in range(0, len(conversations), max_conversations_per_call):
        results.extend(client.score(conversations[start : start + max_conversations_per_call], weights))
    return [_value(r, attribute, return_dict) for r in results]
