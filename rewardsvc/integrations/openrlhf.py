"""OpenRLHF's remote reward-model protocol, as OpenRLHF 0.11.2 sends it (`openrlhf/utils/agent.py`,
`SingleTurnAgentExecutor`), served by `rewardsvc serve --http-port PORT` (rewardsvc.serving.http) at
`--reward.remote_url http://HOST:PORT/get_reward` (the flag was `--remote_rm_url` before 0.10.2).

Each rollout sample is one POST (aiohttp, 180 s total timeout, 5 tries one second apart), many at once:

    {"query": [q], "prompts": [p], "labels": [label]}

where p is the dataset prompt rendered in the *policy's* chat template (add_generation_prompt=True) and
q = tokenizer.decode(prompt_ids + action_ids, skip_special_tokens=False), prompt_ids = tokenizer(p,
add_special_tokens=False) cut from the LEFT to max_prompt_length when the prompt is longer. So q starts with p,
except when the prompt was cut (or when decoding the ids does not give p back): such a query is parsed on its
own against the policy template, its partial first turn becoming the first user turn (integrations/chat_text).

The reply is `{"rewards": [float], "scores": [float], "extra_logs": {name: [float]}}`. OpenRLHF takes
`rewards` as the sample's reward, `scores` for dynamic filtering (`--algo.dynamic_filtering_enable`: a prompt's
samples are dropped unless the mean of their scores lies strictly inside `--algo.dynamic_filtering_range`,
default (0, 1)) and logs every `extra_logs` entry as a number. `scores` is the score mapped into [0, 1]
(ScoresMapping): sigmoid(score) by default, or 1/0 against a threshold (pass/fail, as rule-based rewards give),
or the raw score. extra_logs: each attribute's reward, gating weight and effective coefficient, and
`prompt_cut` (1.0 when the sample's prompt reached us cut from the left, else 0.0). `labels` is accepted and
ignored (a reward model needs no reference answer). An empty `query` gets empty lists.

This module is the protocol only (request -> conversations, results -> reply); stdlib, no grpc, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidInputError
from ..types import ScoreResult, sigmoid
from .chat_text import ChatTemplateSplitter, ParsedQuery

PATH = "/get_reward"
CUT_LOG = "prompt_cut"
RAW_SCORE_LOG = "raw_score"  # with the server's normalization on, the raw scores beside the z-score rewards



@dataclass(frozen=True)
class ScoresMapping:
    """How a reward becomes OpenRLHF's `scores` (its dynamic-filtering signal). Written as `sigmoid`, `raw` or
    `threshold=T` (`rewardsvc serve --openrlhf-scores`)."""

    kind: str = "sigmoid"  # "sigmoid": sigmoid(score); "threshold": 1.0 if score >= threshold else 0.0; "raw"
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("sigmoid", "threshold", "raw"):
            raise InvalidInputError(f"openrlhf_scores: must be sigmoid, raw or threshold=T, got {self.kind!r}", field="openrlhf_scores")
        if not math.isfinite(self.threshold):
            raise InvalidInputError(f"openrlhf_scores: the threshold must be finite, got {self.threshold}", field="openrlhf_scores")

    @classmethod
    def parse(cls, text: str) -> "ScoresMapping":
        name, _, value = text.strip().partition("=")
        if name == "threshold":
            try:
                return cls("threshold", float(value))
            except ValueError:
                raise InvalidInputError(f"openrlhf_scores: threshold=T needs a number, got {value!r}", field="openrlhf_scores") from None
        if value:
            raise InvalidInputError(f"openrlhf_scores: only threshold takes a value, got {text!r}", field="openrlhf_scores")
        return cls(name)

    def __str__(self) -> str:
        return f"threshold={self.threshold:g}" if self.kind == "threshold" else self.kind

    def __call__(self, score: float) -> float:
        if self.kind == "sigmoid":
            return sigmoid(score)
        if self.kind == "threshold":
            return 1.0 if score >= self.threshold else 0.0
        return score


def _strings(body: dict[str, Any], key: str, required: bool) -> list[str] | None:
    value = body.get(key)
    if value is None:
        if required:
            raise InvalidInputError(f"{key}: required (a list of strings)", field=key)
        return None
    if isinstance(value, str):  # a single query, as some callers send
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInputError(f"{key}: must be a list of strings", field=key)
    return value


def parse_request(body: Any, splitter: ChatTemplateSplitter, extra_stops: tuple[str, ...] = ()) -> list[ParsedQuery]:
    """The request body -> one parsed query (messages ending with the response, and whether it was cut) each."""
    if not isinstance(body, dict):
        raise InvalidInputError("request: the body must be a JSON object with a `query` list", field="request")
    queries = _strings(body, "query", required=True)
    prompts = _strings(body, "prompts", required=False)
    if prompts is not None and len(prompts) not in (0, len(queries)):
        raise InvalidInputError(f"prompts: {len(prompts)} prompts for {len(queries)} queries", field="prompts")
    return [
        splitter.parse(query, prompts[i] if prompts else None, field=f"query[{i}]", extra_stops=extra_stops)
        for i, query in enumerate(queries)
    ]


def conversations_of(body: Any, splitter: ChatTemplateSplitter, extra_stops: tuple[str, ...] = ()) -> list[list[dict[str, str]]]:
    """The request body -> one conversation (messages ending with the response) per query."""
    return [parsed.messages for parsed in parse_request(body, splitter, extra_stops)]


def reply(results: Sequence[ScoreResult], cut: Sequence[bool] | None = None,
          scores: ScoresMapping = ScoresMapping()) -> dict[str, Any]:  # fmt: skip
    """Results -> OpenRLHF's reply. extra_logs: `reward/<attribute>`, `gating/<attribute>`,
    `coefficient/<attribute>` and `prompt_cut`, one number per sample. When the server normalizes, `rewards` are
    the z-scores, `raw_score` logs the raw scores, and `scores` still map the raw score (the mapping's
    threshold is in raw-score units)."""
    rewards = [r.reward for r in results]  # the z-score when the server normalizes (serve --normalize)
    raw = [r.score for r in results]
    logs: dict[str, list[float]] = {}
    for r in results:
        for name, value in r.rewards.items():
            logs.setdefault(f"reward/{name}", []).append(value)
        for name, value in r.gating.items():
            logs.setdefault(f"gating/{name}", []).append(value)
        for name, value in r.coefficients.items():
            logs.setdefault(f"coefficient/{name}", []).append(value)
    if results:
        logs[CUT_LOG] = [1.0 if c else 0.0 for c in (cut if cut is not None else [False] * len(results))]
    if any(r.normalized is not None for r in results):
        logs[RAW_SCORE_LOG] = raw
    return {"rewards": rewards, "scores": [scores(s) for s in raw], "extra_logs": logs}
