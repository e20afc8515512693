"""TRL reward functions (GRPOTrainer, RLOOTrainer): `reward_func(prompts, completions, **kwargs) -> list[float]`,
sync or async (TRL awaits coroutine reward functions concurrently, with asyncio.gather on its own event loop).

    from rewardsvc.integrations.trl import reward_funcs
    GRPOTrainer(..., reward_funcs=reward_funcs("localhost:50051", attributes=[None, "safety"], log_gating=True))

- One function per entry of `attributes` (None = the overall score, a name = that attribute's reward). TRL
  calls each with the same batch; they share one Score RPC per batch (the first call scores, the others reuse
  its answer), split only above `max_conversations_per_call`. TRL names each function's log after its
  `__name__`: `rewards/rewardsvc_score/mean`, `rewards/rewardsvc_<attribute>/mean`.
- Tools: completions from GRPO with `tools=` hold assistant messages with `tool_calls`, `tool` messages, and
  content that may be a list of text blocks; they go to the server as they are (rewardsvc.messages,
  model.encoding renders them).
- A sample that cannot be scored (the server rejects it: too long, a template that refuses it, a malformed
  message) gets None, which TRL turns into NaN and leaves out of the reward, and a WARNING log line with the
  reason, instead of failing the whole batch. The other samples of the batch are scored as usual.
- `log_gating=True`: for each batch, the mean gating weight and mean effective coefficient of every attribute
  go to the trainer's logs through the `log_metric` callback TRL passes to reward functions
  (`rewardsvc/gating/<attribute>`, `rewardsvc/coefficient/<attribute>`). A TRL too old to pass `log_metric`
  gets a warning, once, and no such metrics.

Client side: grpc and protobuf only (no torch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..types import AttributeWeights
from .trl_functions import log_gating_metrics, shared_async_reward_funcs, shared_reward_funcs, trl_conversation

__all__ = ["async_reward_funcs", "log_gating_metrics", "reward_funcs", "trl_conversation"]


def reward_funcs(client_or_target: Any, attributes: Sequence[str | None] = (None,), weights: AttributeWeights | dict | None = None,
                 *, log_gating: bool = False, max_conversations_per_call: int = 256, normalization: Any = None,
                 **client_kwargs) -> list[Callable[..., list[float]]]:  # fmt: skip
    """Synchronous TRL reward functions. `client_or_target`: a RewardClient, or a target ("host:port") for
    which one is made with `client_kwargs` (token=..., tls=..., timeout=...). normalization: True / a
    Normalization (z-scores against the model's calibration, docs/SERVING.md), False (raw), None (the server's
    default)."""
    from ..client import RewardClient

    client = client_or_target if isinstance(client_or_target, RewardClient) else RewardClient(client_or_target, **client_kwargs)
    return shared_reward_funcs(client, attributes, weights, log_gating=log_gating,
                               max_conversations_per_call=max_conversations_per_call, normalization=normalization)  # fmt: skip


def async_reward_funcs(target: str, attributes: Sequence[str | None] = (None,), weights: AttributeWeights | dict | None = None,
                       *, log_gating: bool = False, max_conversations_per_call: int = 256, normalization: Any = None,
                       **client_kwargs) -> list[Callable[..., Any]]:  # fmt: skip
    """Coroutine TRL reward functions over grpc.aio: one AsyncRewardClient per running event loop, made on
    first use; the functions of one batch share one Score RPC (trl_functions.shared_async_reward_funcs)."""
    from ..client import AsyncRewardClient

    return shared_async_reward_funcs(lambda: AsyncRewardClient(target, **client_kwargs), attributes, weights,
                                     log_gating=log_gating, max_conversations_per_call=max_conversations_per_call,
                                     normalization=normalization)  # fmt: skip
