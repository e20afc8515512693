"""A reward-loop manager for verl 0.9.1 that scores the samples arriving together in one Score call.

verl's RewardLoopWorker (verl/experimental/reward_loop/reward_loop.py) starts `run_single` for every sample of
its chunk at once (asyncio.gather). The registered managers then make one reward-function call per sample;
this one collects the samples that arrive within a short window (`window_ms`, default 5, at most 1000) or
until `max_batch` are waiting, and sends them as one Score RPC: the server's batcher sees the whole chunk.
It reads the prompt from verl's own `raw_prompt` (the chat messages its dataset keeps for every sample), so no
copy of the prompt into extra_info is needed, and the response as the naive manager does (the valid response
tokens, decoded without special tokens).

    reward.reward_manager.source=importlib
    reward.reward_manager.module.path=pkg://rewardsvc.integrations.verl   # or the file path of verl.py
    reward.reward_manager.name=RewardsvcRewardManager
    +reward.reward_kwargs.target=HOST:PORT   # and token, attribute, weights, return_dict, normalize, window_ms, max_batch

A sample the server rejects (too long, refused by the template) raises its own error in its run_single; the
other samples of the call are scored. Runs inside verl's worker, so it imports verl (and so torch); it is
the only rewardsvc module that does (tests/test_import_rules.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

from rewardsvc.errors import InvalidInputError
from rewardsvc.integrations.partial_batches import Outcome, run_async, score_tolerantly
from rewardsvc.integrations.verl_score import async_client, prompt_messages, reward_value
from rewardsvc.types import ScoreResult

MAX_WINDOW_MS = 1000.0


@dataclass(frozen=True)
class ManagerSettings:
    """`reward.reward_kwargs` of verl's config, validated."""

    target: str | None = None
    token: str | None = None
    attribute: str | None = None
    weights: Any = None
    return_dict: bool = False
    normalize: bool | None = None  # as for compute_score: z-scores, raw, or (None) the server's default
    window_ms: float = 5.0
    max_batch: int = 256

    def __post_init__(self):
        if not 0 < self.window_ms <= MAX_WINDOW_MS:
            raise InvalidInputError(f"window_ms must be in (0, {MAX_WINDOW_MS:g}], got {self.window_ms}", field="window_ms")
        if not 1 <= self.max_batch <= 4096:
            raise InvalidInputError(f"max_batch must be in [1, 4096], got {self.max_batch}", field="max_batch")

    @classmethod
    def of(cls, kwargs: Mapping[str, Any]) -> ManagerSettings:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InvalidInputError(f"reward.reward_kwargs: unknown {unknown}; known: {sorted(known)}", field="reward_kwargs")
        values = dict(kwargs)
        if values.get("weights") is not None:  # an OmegaConf node -> plain dicts and lists
            values["weights"] = _plain(values["weights"])
        return cls(**values)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


class Coalescer:
    """The conversations submitted within `window_s` of the first waiting one (or until `max_batch` wait)
    go out together in one call of `score_many`; each submitter gets its own outcome. One per event loop."""

    def __init__(self, score_many: Callable[[list[Any]], Awaitable[list[Outcome]]], window_s: float, max_batch: int):
        self._score_many, self._window_s, self._max_batch = score_many, window_s, max_batch
        self._waiting: list[tuple[Any, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task] = set()  # strong references until each call ends
        self.calls = 0

    async def submit(self, conversation: Any) -> ScoreResult:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((conversation, future))
        if len(self._waiting) >= self._max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._window_s, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._waiting = self._waiting, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        self.calls += 1
        try:
            outcomes = await self._score_many([conversation for conversation, _ in batch])
        except Exception as exc:  # the call as a whole failed: every sample in it gets the error
            outcomes = [exc] * len(batch)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # its run_single was cancelled
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)


class RewardsvcRewardManager(RewardManagerBase):
    """verl's RewardManagerBase interface: constructed by RewardLoopWorker, `await run_single(data)` per sample
    -> {"reward_score", "reward_extra_info"}; `assemble_rm_scores` is verl's own."""

    def __init__(self, config, tokenizer, compute_score=None, reward_router_address=None, reward_model_tokenizer=None):
        super().__init__(config, tokenizer, compute_score)
        self.settings = ManagerSettings.of(config.reward.get("reward_kwargs") or {})
        self._coalescers: dict[asyncio.AbstractEventLoop, Coalescer] = {}

    def coalescer(self) -> Coalescer:
        loop = asyncio.get_running_loop()
        if loop not in self._coalescers:
            s = self.settings
            client = async_client(s.target, s.token)

            async def score_many(conversations: list[Any]) -> list[Outcome]:
                return await run_async(score_tolerantly(conversations, s.max_batch), lambda batch: client.score(batch, s.weights, normalization=s.normalize))

            self._coalescers[loop] = Coalescer(score_many, s.window_ms / 1000.0, s.max_batch)
        return self._coalescers[loop]

    async def run_single(self, data) -> dict:
        item = data[-1:][0]  # for multi-sequence outputs the last sequence is scored, as verl's managers do
        response_ids = item.batch["responses"]
        valid_length = int(item.batch["attention_mask"][-response_ids.shape[-1] :].sum())
        # Decoded here, not in an executor as verl's managers do: with no await before submit, every run_single
        # that RewardLoopWorker starts together reaches the coalescer in the same event-loop turn, so a chunk
        # goes out as one call whatever the machine's load (decoding one response takes well under a millisecond).
        response = self.tokenizer.decode(response_ids[:valid_length], skip_special_tokens=True)
        messages = [*self._prompt(item.non_tensor_batch), {"role": "assistant", "content": response}]
        result = await self.coalescer().submit(messages)
        value = reward_value(result, self.settings.attribute, self.settings.return_dict)
        if isinstance(value, dict):
            return {"reward_score": value["score"], "reward_extra_info": value}
        return {"reward_score": value, "reward_extra_info": {"score": value}}

    @staticmethod
    def _prompt(fields: Mapping[str, Any]) -> list[dict[str, Any]]:
        if fields.get("raw_prompt") is not None:
            return prompt_messages(fields["raw_prompt"], "raw_prompt")
        extra_info = fields.get("extra_info")
        if isinstance(extra_info, Mapping) and extra_info.get("prompt") is not None:
            return prompt_messages(extra_info["prompt"], 'extra_info["prompt"]')
        raise InvalidInputError(
            "raw_prompt: missing from the batch (verl's RLHFDataset sets it for every sample); nor is there an "
            'extra_info["prompt"]', field="raw_prompt",
        )  # fmt: skip
