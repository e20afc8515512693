"""vLLM's pooling protocol for a reward model served with `vllm serve MODEL --runner pooling` (vLLM 0.34.0:
`vllm/entrypoints/pooling/base/protocol.py`, `classify/protocol.py`, `pooling/protocol.py`,
`serve/engine/protocol.py`), so that a client written for such a server can point at rewardsvc instead:

    POST /classify  {"model"?, "input": str | [str] | [int] | [[int]], "use_activation"?, "add_special_tokens"?}
                    or {"model"?, "messages": [...], "use_activation"?, ...}
                    -> {"id", "object": "list", "created", "model",
                        "data": [{"index", "label", "probs": [p], "num_classes": 1}], "usage"}
    POST /pooling   the same inputs (+ "task": "classify", "encoding_format": "float")
                    -> {"id", "object": "list", "created", "model", "data": [{"index", "object": "pooling",
                        "data": [p]}], "usage"}
    GET  /v1/models -> {"object": "list", "data": [{"id", "object": "model", "created", "owned_by", "root",
                        "parent", "max_model_len", "permission"}]}

A text input is a whole conversation rendered in the *reward model's* chat template (what a vLLM user sends:
`tokenizer.apply_chat_template(conversation, tokenize=False)`); rewardsvc reads its turns back and scores the
messages (token-id inputs are decoded first). `messages` is one conversation ending with the response. `p` is
the score: sigmoid(score) by default, as vLLM applies its activation to a one-label classifier, and the raw
score with `"use_activation": false`; so `data[-1].probs[-1]` is the last input's reward. `usage.prompt_tokens`
counts the tokens scored. `add_special_tokens` is accepted and changes nothing: the text is re-rendered by the
template, which places the special tokens itself. Fields that would change what is scored and that rewardsvc
does not do (`truncate_prompt_tokens`, `dimensions`, `task` other than classify, `encoding_format` other than
float, `continue_final_message`, `add_generation_prompt`) are refused with a 400 naming the field, never
ignored. Errors have vLLM's shape: {"error": {"message", "type", "param", "code"}}.

This module is the protocol only; stdlib, no grpc, no torch.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidInputError
from ..types import ScoreResult, sigmoid

CLASSIFY_PATH, POOLING_PATH, MODELS_PATH = "/classify", "/pooling", "/v1/models"
OWNED_BY = "rewardsvc"
LABEL = "score"
ERROR_TYPES = {400: "BadRequestError", 401: "UnauthorizedError", 404: "NotFoundError", 405: "MethodNotAllowed",
               413: "BadRequestError", 429: "TooManyRequestsError", 499: "ClientClosedRequest",
               500: "InternalServerError", 503: "ServiceUnavailableError", 504: "TimeoutError"}  # fmt: skip


@dataclass(frozen=True)
class PoolingInput:
    """One input: a templated text (token ids already decoded by the caller of `parse_request`: `tokens`) or
    messages."""

    text: str | None = None
    tokens: tuple[int, ...] | None = None
    messages: list[Any] | None = None


@dataclass(frozen=True)
class PoolingRequest:
    inputs: tuple[PoolingInput, ...]
    model: str | None
    use_activation: bool
    add_special_tokens: bool


def _refuse(body: dict[str, Any], key: str, allowed: tuple[Any, ...], why: str) -> None:
    if key in body and body[key] not in allowed:
        raise InvalidInputError(f"{key}: {body[key]!r} is not supported by rewardsvc ({why})", field=key)


def _bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidInputError(f"{key}: must be true or false, got {value!r}", field=key)
    return value


def _token_ids(value: list[Any], field: str) -> tuple[int, ...]:
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise InvalidInputError(f"{field}: token ids must be non-negative integers", field=field)
    return tuple(value)


def _inputs(value: Any) -> tuple[PoolingInput, ...]:
    if isinstance(value, str):
        return (PoolingInput(text=value),)
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return (PoolingInput(tokens=_token_ids(value, "input")),)
    if isinstance(value, list) and value:
        out = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                out.append(PoolingInput(text=item))
            elif isinstance(item, list) and item:
                out.append(PoolingInput(tokens=_token_ids(item, f"input[{i}]")))
            else:
                raise InvalidInputError(f"input[{i}]: must be a string or a non-empty list of token ids", field=f"input[{i}]")
        return tuple(out)
    raise InvalidInputError("input: must be a string, a non-empty list of strings, or token ids", field="input")


def parse_request(body: Any, route: str) -> PoolingRequest:
    """A /classify or /pooling body -> what to score (vLLM's ClassificationRequest / PoolingRequest fields)."""
    if not isinstance(body, dict):
        raise InvalidInputError("request: the body must be a JSON object with `input` or `messages`", field="request")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidInputError(f"model: must be a string, got {model!r}", field="model")
    _refuse(body, "truncate_prompt_tokens", (None,), "a conversation is never cut silently; see max_tokens")
    _refuse(body, "continue_final_message", (None, False), "the last message is a whole response")
    _refuse(body, "add_generation_prompt", (None, False), "the last message is the response to score")
    if route == POOLING_PATH:
        _refuse(body, "task", (None, "classify"), "a reward model pools with the classify task")
        _refuse(body, "encoding_format", (None, "float"), "only float is produced")
        _refuse(body, "dimensions", (None,), "a reward has one dimension")
    if ("input" in body) == ("messages" in body):
        raise InvalidInputError("request: needs exactly one of `input` (templated text) and `messages`", field="input")
    if "messages" in body:
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise InvalidInputError("messages: must be a non-empty list of messages", field="messages")
        inputs: tuple[PoolingInput, ...] = (PoolingInput(messages=messages),)
    else:
        inputs = _inputs(body["input"])
    return PoolingRequest(inputs=inputs, model=model, use_activation=_bool(body, "use_activation", True),
                          add_special_tokens=_bool(body, "add_special_tokens", "messages" not in body))  # fmt: skip



def _value(result: ScoreResult, use_activation: bool) -> float:
    return sigmoid(result.score) if use_activation else result.score


def _envelope(prefix: str, model: str, results: Sequence[ScoreResult]) -> dict[str, Any]:
    tokens = sum(r.num_tokens for r in results)
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                      "completion_tokens_details": None}}  # fmt: skip


def classify_reply(model: str, results: Sequence[ScoreResult], use_activation: bool) -> dict[str, Any]:
    data = [{"index": i, "label": LABEL, "probs": [_value(r, use_activation)], "num_classes": 1} for i, r in enumerate(results)]
    return {**_envelope("classify", model, results), "data": data}


def pooling_reply(model: str, results: Sequence[ScoreResult], use_activation: bool) -> dict[str, Any]:
    data = [{"index": i, "object": "pooling", "data": [_value(r, use_activation)]} for i, r in enumerate(results)]
    return {**_envelope("pool", model, results), "data": data}


def models_reply(model_ids: Sequence[str], max_model_len: int | None, created: int) -> dict[str, Any]:
    """vLLM's ModelList: one card per model the service serves."""
    cards = [{"id": m, "object": "model", "created": created, "owned_by": OWNED_BY, "root": m, "parent": None,
              "max_model_len": max_model_len, "permission": []} for m in model_ids]  # fmt: skip
    return {"object": "list", "data": cards}


def error_body(status: int, message: str, field: str | None) -> dict[str, Any]:
    """vLLM's ErrorResponse."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "InternalServerError"), "param": field or None, "code": status}}
