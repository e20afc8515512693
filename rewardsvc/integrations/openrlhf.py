"""OpenRLHF's remote reward-model protocol (`--remote_rm_url http://HOST:PORT/get_reward`), as served by
`rewardsvc serve --http-port PORT` (rewardsvc.serving.http).

OpenRLHF posts JSON `{"query": [str], "prompts": [str], "labels": [...]}` (the path and fields of its own
`openrlhf.cli.serve_rm`), where query[i] = prompts[i] + response, rendered in the *policy's* chat template,
with a 180 s timeout and 5 retries on any failure. The reply is `{"rewards": [float], "scores": [float],
"extra_logs": {name: [float]}}`: OpenRLHF uses `rewards` for advantages, `scores` for dynamic filtering and
logs every `extra_logs` entry (here: each attribute's reward, gating weight and effective coefficient per
sample). `labels` is
accepted and ignored (a reward model needs no reference answer). An empty `query` gets empty lists.

This module is the protocol only (request -> conversations, results -> reply); stdlib, no grpc, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import InvalidInputError
from ..types import ScoreResult
from .chat_text import ChatTemplateSplitter

PATH = "/get_reward"


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


def conversations_of(body: Any, splitter: ChatTemplateSplitter, extra_stops: tuple[str, ...] = ()) -> list[list[dict[str, str]]]:
    """The request body -> one conversation (messages ending with the response) per query."""
    if not isinstance(body, dict):
        raise InvalidInputError("request: the body must be a JSON object with a `query` list", field="request")
    queries = _strings(body, "query", required=True)
    prompts = _strings(body, "prompts", required=False)
    if prompts is not None and len(prompts) not in (0, len(queries)):
        raise InvalidInputError(f"prompts: {len(prompts)} prompts for {len(queries)} queries", field="prompts")
    out = []
    for i, query in enumerate(queries):
        prompt = prompts[i] if prompts else None
        out.append(splitter.split(query, prompt, field=f"query[{i}]", extra_stops=extra_stops))
    return out


def reply(results: Sequence[ScoreResult]) -> dict[str, Any]:
    """Results -> OpenRLHF's reply. extra_logs: `reward/<attribute>`, `gating/<attribute>`,
    `coefficient/<attribute>`, one value per sample."""
    scores = [r.score for r in results]
    logs: dict[str, list[float]] = {}
    for r in results:
        for name, value in r.rewards.items():
            logs.setdefault(f"reward/{name}", []).append(value)
        for name, value in r.gating.items():
            logs.setdefault(f"gating/{name}", []).append(value)
        for name, value in r.coefficients.items():
            logs.setdefault(f"coefficient/{name}", []).append(value)
    return {"rewards": scores, "scores": scores, "extra_logs": logs}
