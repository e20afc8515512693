"""protobuf <-> the plain types of rewardsvc.types / rewardsvc.config, both directions, for both ends.

The servicer (rewardsvc.serving.servicer) and the client (rewardsvc.client) both convert through here, so the
two ends read the wire the same way. Needs protobuf only: no grpc, no torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, fields
from typing import Any

from google.protobuf import struct_pb2

from ._proto.rewardsvc.v1 import reward_pb2 as pb
from .config import Limits
from .errors import InvalidInputError
from .messages import as_list, message_content, tool_call
from .normalization import Normalization, as_normalization
from .types import AttributeWeights, CompareResult, GroupResult, InspectResult, NormalizedScores, ScoreResult

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RewardService"].full_name  # "rewardsvc.v1.RewardService"
# Trailing metadata of an error: how long to wait before a retry, and the request field at fault.
RETRY_AFTER_KEY = "retry-after-ms"
FIELD_KEY = "rewardsvc-field"

_MODE_TO_PB = {"override": pb.AttributeWeights.OVERRIDE, "mask": pb.AttributeWeights.MASK}
_MODE_FROM_PB = {v: k for k, v in _MODE_TO_PB.items()}
_NORMALIZATION_TO_PB = {"none": pb.Normalization.NONE, "zscore": pb.Normalization.ZSCORE}
_NORMALIZATION_FROM_PB = {v: k for k, v in _NORMALIZATION_TO_PB.items()}

# ---- protobuf -> dataclasses / plain Python -----------------------------------------------------------


def messages_from_pb(messages) -> list[dict[str, Any]]:
    """Plain role + content dicts; tool_calls / name / tool_call_id only when set (model.conversation
    validates them)."""
    out = []
    for m in messages:
        message: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            message["tool_calls"] = [
                {"type": "function", "function": {"name": c.name, "arguments": c.arguments}, **({"id": c.id} if c.id else {})}
                for c in m.tool_calls
            ]
        if m.name:
            message["name"] = m.name
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def weights_from_pb(request) -> AttributeWeights | None:
    if not request.HasField("weights"):
        return None
    w = request.weights
    if w.mode == pb.AttributeWeights.MODE_UNSPECIFIED:
        if w.values:
            raise InvalidInputError("weights.mode must be OVERRIDE or MASK when weights.values are given", "weights.mode")
        return None
    if w.mode not in _MODE_FROM_PB:
        raise InvalidInputError(f"weights.mode: unknown mode {w.mode}", field="weights.mode")
    return AttributeWeights(mode=_MODE_FROM_PB[w.mode], values=dict(w.values))


def normalization_from_pb(n) -> Normalization | None:
    """A Normalization message -> Normalization, or None (mode unspecified: the server's default)."""
    if n.mode == pb.Normalization.MODE_UNSPECIFIED:
        if n.clip:
            raise InvalidInputError("normalization.clip needs normalization.mode ZSCORE", field="normalization.clip")
        return None
    if n.mode not in _NORMALIZATION_FROM_PB:
        raise InvalidInputError(f"normalization.mode: unknown mode {n.mode}", field="normalization.mode")
    return Normalization(mode=_NORMALIZATION_FROM_PB[n.mode], clip=n.clip or None)


def request_normalization_from_pb(request) -> Normalization | None:
    """What a request asks for; None = the server's default."""
    return normalization_from_pb(request.normalization) if request.HasField("normalization") else None


def _normalized_from_pb(r) -> NormalizedScores | None:
    if not r.HasField("normalized"):
        return None
    n = r.normalized
    return NormalizedScores(score=n.score, rewards=dict(n.rewards), calibration_id=n.calibration_id, clip=n.clip or None)


def result_from_pb(r) -> ScoreResult:
    return ScoreResult(
        score=r.score,
        rewards=dict(r.rewards),
        gating=dict(r.gating),
        coefficients=dict(r.coefficients),
        num_tokens=r.num_tokens,
        truncated=r.truncated,
        weights_source=r.weights_source,
        model_id=r.model_id,
        normalized=_normalized_from_pb(r),
    )


def group_from_pb(response) -> GroupResult:
    return GroupResult(
        results=[result_from_pb(r) for r in response.results],
        mean=response.mean,
        std=response.std,
        ranks=list(response.ranks),
    )


def compare_from_pb(r) -> CompareResult:
    return CompareResult(
        p_chosen=r.p_chosen,
        score_chosen=r.score_chosen,
        score_rejected=r.score_rejected,
        chosen=result_from_pb(r.chosen),
        rejected=result_from_pb(r.rejected),
    )


def inspect_from_pb(response) -> InspectResult:
    return InspectResult(
        gating={a.attribute: a.weight for a in response.attributes},
        coefficients={a.attribute: a.coefficient for a in response.attributes},
        num_tokens=response.num_tokens,
        truncated=response.truncated,
        weights_source=response.weights_source,
        model_id=response.model_id,
    )


def limits_from_pb(limits) -> Limits:
    return Limits(**{f.name: getattr(limits, f.name) for f in fields(Limits)})


def struct_to_python(s) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(s)


def model_info_from_pb(info) -> dict[str, Any]:
    return {
        "model_id": info.model_id,
        "attributes": list(info.attributes),
        "backbone": info.backbone,
        "dtype": info.dtype,
        "device": info.device,
        "max_tokens": info.max_tokens,
        "truncation": info.truncation,
        "trained": info.trained,
        "provenance": struct_to_python(info.provenance),
        "metrics": struct_to_python(info.metrics),
        "label_scales": struct_to_python(info.label_scales),
        "server_version": info.server_version,
        "limits": asdict(limits_from_pb(info.limits)),
        "name": info.name,
        "models": [
            {"name": m.name, "model_id": m.model_id, "backbone": m.backbone, "attributes": list(m.attributes),
             "trained": m.trained, "is_default": m.is_default}
            for m in info.models
        ],  # fmt: skip
        "calibration": struct_to_python(info.calibration),
        "default_normalization": normalization_from_pb(info.default_normalization) or Normalization(mode="none"),
        "scoring_plan": struct_to_python(info.scoring_plan),
    }


# ---- dataclasses / plain Python -> protobuf -----------------------------------------------------------


def messages_to_pb(messages, field: str = "messages") -> list:
    """Messages (OpenAI format: content as a string or text blocks, assistant tool_calls, tool messages) ->
    pb.Message. A message that cannot go on the wire is an InvalidInputError naming its field."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return [_message_to_pb(m, f"{field}[{i}]") for i, m in enumerate(as_list(messages))]


def _message_to_pb(m: Any, field: str):
    if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
        raise InvalidInputError(f"{field} must be an object with a string 'role'", field=field)
    calls = [tool_call(c, f"{field}.tool_calls[{i}]") for i, c in enumerate(as_list(m.get("tool_calls")) or ())]
    return pb.Message(
        role=m["role"],
        content=message_content(m.get("content"), f"{field}.content"),
        tool_calls=[pb.ToolCall(id=c.get("id", ""), name=c["function"]["name"],
                                arguments=json.dumps(c["function"]["arguments"], ensure_ascii=False)) for c in calls],
        name=_optional_text(m, "name", field),
        tool_call_id=_optional_text(m, "tool_call_id", field),
    )


def _optional_text(m: Mapping, key: str, field: str) -> str:
    value = m.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidInputError(f"{field}.{key} must be a string, got {type(value).__name__}", field=f"{field}.{key}")
    return value or ""


def weights_to_pb(weights: AttributeWeights | None):
    if weights is None:
        return None
    return pb.AttributeWeights(mode=_MODE_TO_PB[weights.mode], values=dict(weights.values))


def normalization_to_pb(n: Normalization | None):
    """None (the server's default) -> None: the request then carries no normalization field."""
    if n is None:
        return None
    return pb.Normalization(mode=_NORMALIZATION_TO_PB[n.mode], clip=n.clip or 0.0)


def _normalized_to_pb(n: NormalizedScores | None):
    if n is None:
        return None
    return pb.NormalizedScores(score=n.score, rewards=n.rewards, calibration_id=n.calibration_id, clip=n.clip or 0.0)


def result_to_pb(r: ScoreResult):
    return pb.ScoreResult(
        score=r.score,
        rewards=r.rewards,
        gating=r.gating,
        coefficients=r.coefficients,
        num_tokens=r.num_tokens,
        truncated=r.truncated,
        model_id=r.model_id,
        weights_source=r.weights_source,
        normalized=_normalized_to_pb(r.normalized),
    )


def compare_to_pb(r: CompareResult):
    return pb.CompareResult(
        p_chosen=r.p_chosen,
        score_chosen=r.score_chosen,
        score_rejected=r.score_rejected,
        chosen=result_to_pb(r.chosen),
        rejected=result_to_pb(r.rejected),
    )


def inspect_attributes_to_pb(r: InspectResult) -> list:
    """The InspectWeightsResponse's attributes, in the result's (weight-sorted) order."""
    return [pb.AttributeWeight(attribute=a, weight=w, coefficient=r.coefficients[a]) for a, w in r.gating.items()]


def limits_to_pb(limits: Limits):
    return pb.ServerLimits(**asdict(limits))


def _struct(value: Any):
    s = struct_pb2.Struct()
    if isinstance(value, dict) and value:
        # Round-trip through JSON: Struct holds only JSON types (paths, tuples, numpy scalars become JSON).
        s.update(json.loads(json.dumps(value, default=str)))
    return s


def model_info_to_pb(info: dict[str, Any]):
    """info: RewardService.model_info(), whose "limits" is a config.Limits."""
    return pb.ModelInfo(
        model_id=info["model_id"],
        attributes=info["attributes"],
        backbone=info["backbone"],
        dtype=info["dtype"],
        device=info["device"],
        max_tokens=info["max_tokens"],
        truncation=info.get("truncation", ""),
        trained=info["trained"],
        provenance=_struct(info.get("provenance")),
        metrics=_struct(info.get("metrics")),
        label_scales=_struct(info.get("label_scales")),
        server_version=info.get("server_version", ""),
        limits=limits_to_pb(info.get("limits", Limits())),
        name=info.get("name", ""),
        models=[pb.ServedModel(**m) for m in info.get("models", [])],
        calibration=_struct(info.get("calibration")),
        default_normalization=normalization_to_pb(info.get("default_normalization")),
        scoring_plan=_struct(info.get("scoring_plan")),
    )


# ---- requests, as a client sends them -------------------------------------------------------------------
# Lenient about the Python shapes callers hold (a prompt string, a response as one assistant message, a pair
# as a tuple or dict, weights as a dict); the server validates the rest.


def _response_text(response: Any, field: str) -> str:
    """A response as the wire takes it: a string, or one assistant message (dict or one-element list)."""
    if isinstance(response, list) and len(response) == 1:
        response = response[0]
    if isinstance(response, dict):
        if response.get("role", "assistant") != "assistant":
            raise InvalidInputError(f"{field} must be an assistant message", field=field)
        response = response.get("content")
    if not isinstance(response, str):
        raise InvalidInputError(f"{field} must be a string or one assistant message", field=field)
    return response


def _with_weights(request, weights: AttributeWeights | dict | None) -> Any:
    w = weights_to_pb(AttributeWeights.of(weights))
    if w is not None:
        request.weights.CopyFrom(w)
    return request


def _with_normalization(request, normalization: Normalization | bool | None) -> Any:
    """normalization: a Normalization, True (z-score), False (raw only) or None (the field stays unset: the
    server's default)."""
    n = normalization_to_pb(as_normalization(normalization))
    if n is not None:
        request.normalization.CopyFrom(n)
    return request


def score_request(conversations: Sequence[Any], weights: AttributeWeights | dict | None = None, request_id: str = "",
                  normalization: Normalization | bool | None = None):  # fmt: skip
    convs = [pb.Conversation(messages=messages_to_pb(c, f"conversations[{i}]")) for i, c in enumerate(conversations)]
    request = _with_weights(pb.ScoreRequest(conversations=convs, request_id=request_id), weights)
    return _with_normalization(request, normalization)


def group_request(prompt: Any, responses: Sequence[Any], weights: AttributeWeights | dict | None = None,
                  request_id: str = "", normalization: Normalization | bool | None = None):  # fmt: skip
    texts = [_response_text(r, f"responses[{i}]") for i, r in enumerate(responses)]
    request = _with_weights(pb.ScoreGroupRequest(prompt=messages_to_pb(prompt), responses=texts, request_id=request_id), weights)
    return _with_normalization(request, normalization)


def compare_request(pairs: Iterable[Any], weights: AttributeWeights | dict | None = None, request_id: str = "",
                    normalization: Normalization | bool | None = None):  # fmt: skip
    """pairs: (prompt, chosen, rejected) tuples or {"prompt", "chosen", "rejected"} dicts."""
    out = []
    for i, pair in enumerate(pairs):
        prompt, chosen, rejected = (pair["prompt"], pair["chosen"], pair["rejected"]) if isinstance(pair, dict) else pair
        out.append(pb.ComparePair(
            prompt=messages_to_pb(prompt),
            chosen=_response_text(chosen, f"pairs[{i}].chosen"),
            rejected=_response_text(rejected, f"pairs[{i}].rejected"),
        ))  # fmt: skip
    request = _with_weights(pb.CompareRequest(pairs=out, request_id=request_id), weights)
    return _with_normalization(request, normalization)


def inspect_request(prompt: Any, weights: AttributeWeights | dict | None = None, top_k: int = 0):
    return _with_weights(pb.InspectWeightsRequest(prompt=messages_to_pb(prompt), top_k=top_k), weights)
