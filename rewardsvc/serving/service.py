"""What one RPC does, without protobuf: check limits, encode (tokenize) in the caller's thread, hand the
model work to the batcher, wait for it, and assemble the answer (group and pair maths: rewardsvc.types).

The servicer translates protobuf to these calls and back; the batcher owns the model.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from typing import Any

from .. import __version__, tracing
from ..config import Limits
from ..errors import DeadlineExceededError, InvalidInputError, NonFiniteResultError, NotReadyError
from ..model.encoding import EncodedConversation
from ..normalization import FIELD as NORMALIZATION_FIELD
from ..normalization import RAW, Normalization, steering_conflict
from ..types import AttributeWeights, CompareResult, GroupResult, InspectResult, ScoreResult, weights_source
from .backend import ScorerBackend
from .batching import Batcher, WorkItem
from .models import ModelSet

DEADLINE_SLACK_S = 0.1


@dataclass(frozen=True)
class CallContext:
    """What the transport knows about one call."""

    deadline: float | None = None  # time.monotonic() value
    on_cancel: Callable[[Callable[[], None]], Any] | None = None  # registers a callback run when the call ends
    deadline_passed: Callable[[], bool] | None = None  # by the transport's clock (labels drops: deadline/cancelled)
    started: float | None = None  # time.monotonic() when the call arrived

    def cancel_reason(self) -> str:
        """Why the call ended early: "deadline" when its deadline has passed, else "cancelled".

        A client whose deadline fires cancels the call; the server sees that cancel a little before its own
        copy of the deadline (which started when the call arrived). So a cancel within the last quarter of
        the call's time (at least DEADLINE_SLACK_S) counts as the deadline."""
        if self.deadline_passed is not None and self.deadline_passed():
            return "deadline"
        if self.deadline is not None:
            budget = self.deadline - self.started if self.started is not None else 0.0
            if time.monotonic() >= self.deadline - max(DEADLINE_SLACK_S, 0.25 * budget):
                return "deadline"
        return "cancelled"


def _finite(value: float, where: str) -> float:
    if not math.isfinite(value):
        raise NonFiniteResultError(f"{where} is {value}: a non-finite result is never returned")
    return value


def check_finite(result: ScoreResult | InspectResult, where: str = "result") -> None:
    """Raise NonFiniteResultError (INTERNAL) if any number of `result` is inf or NaN."""
    if isinstance(result, ScoreResult):
        _finite(result.score, f"{where}.score")
        for name, value in result.rewards.items():
            _finite(value, f"{where}.rewards[{name!r}]")
    for name, value in result.gating.items():
        _finite(value, f"{where}.gating[{name!r}]")
    for name, value in result.coefficients.items():
        _finite(value, f"{where}.coefficients[{name!r}]")


def check_finite_results(results: Sequence[ScoreResult]) -> list[ScoreResult]:
    for i, result in enumerate(results):
        check_finite(result, f"results[{i}]")
    return list(results)


def _calibration_of(scorer: ScorerBackend) -> tuple[Any, str]:
    """(the backend's calibration or None, where it comes from / why there is none). A backend that keeps no
    calibration at all (a test double) counts as uncalibrated."""
    return getattr(scorer, "calibration", None), getattr(scorer, "calibration_note", "this backend keeps no calibration")


def _check_count(field: str, count: int, what: str, limit: int, limit_name: str) -> None:
    if count > limit:
        raise InvalidInputError(f"{field}: {count} {what}, over {limit_name}={limit}", field=field)


class RewardService:
    """One per server. Methods run on gRPC handler threads; they block until the batcher answers."""

    def __init__(self, limits: Limits = Limits(), default_normalization: Normalization = RAW):
        self.limits = limits
        self.default_normalization = default_normalization  # what a call that names none gets
        self.scorer: ScorerBackend | None = None  # the default model
        self.models: ModelSet | None = None  # every served model, by name
        self.batcher: Batcher | None = None
        # Handler threads tokenize concurrently; one lock keeps the (Rust) tokenizer's mutable state out of
        # reach of races. Tokenizing is ~1 ms; the model runs outside this lock, on the batcher thread.
        self._encode_lock = threading.Lock()

    def attach(self, scorer: ScorerBackend | ModelSet, batcher: Batcher) -> None:
        """Start serving a loaded scorer, or several models by name (until then every call is UNAVAILABLE).
        The limit max_tokens_per_conversation is the smallest of the models' max_tokens."""
        models = scorer if isinstance(scorer, ModelSet) else ModelSet.single(scorer)
        if self.default_normalization.enabled:
            for name, backend in models.items():
                calibration, note = _calibration_of(backend)
                if calibration is None:
                    raise InvalidInputError(
                        f"server.normalize: the server default normalizes, but model {name} ({backend.model_id}) has "
                        f"no calibration ({note})",
                        field="server.normalize",
                    )
        max_tokens = min(backend.config.max_tokens for _, backend in models.items())
        self.limits = replace(self.limits, max_tokens_per_conversation=max_tokens)
        self.models, self.scorer, self.batcher = models, models.get(None), batcher

    @property
    def ready(self) -> bool:
        return self.batcher is not None

    def _require_ready(self, model: str | None = None) -> ScorerBackend:
        """The backend of the served model named `model` (None or "" = the default)."""
        if self.models is None or self.batcher is None:
            raise NotReadyError("the model is still loading; retry shortly")
        return self.models.get(model)

    @property
    def model_id(self) -> str:
        return self.scorer.model_id if self.scorer is not None else ""

    @property
    def model_ids(self) -> list[str]:
        """The names of every model this service serves, the default first (what requests put in `model`; HTTP
        GET /v1/models lists them); empty until loaded."""
        return self.models.names if self.models is not None else []

    def model_name(self, model: str | None = None) -> str:
        """The canonical name of a request's `model` (the default's for an empty one); "" while loading."""
        return self.models.resolve(model) if self.models is not None else ""

    def model_id_of(self, model: str | None = None) -> str:
        return self.models.get(model).model_id if self.models is not None else ""

    def served_models(self) -> list[dict[str, Any]]:
        """Every served model (name, model_id, backbone, attributes, trained, is_default); [] while loading.
        GetModelInfo.models and the HTTP GET /v1/models list these."""
        return self.models.describe() if self.models is not None else []

    def weights_source(self, weights: AttributeWeights | None, model: str | None = None) -> str:
        """The responses' weights_source: the named (or default) model's kind decides ("fixed" for a model without
        gating)."""
        return self.models.get(model).weights_source(weights) if self.models is not None else weights_source(weights)

    # ---- checks ------------------------------------------------------------------------------------

    def check_message_bytes(self, size: int) -> None:
        if size > self.limits.max_message_bytes:
            raise InvalidInputError(
                f"request: {size} bytes, over max_message_bytes={self.limits.max_message_bytes}", field="request"
            )

    @staticmethod
    def _check_weights(weights: AttributeWeights | None, scorer: ScorerBackend) -> None:
        # Checked here so that a bad name fails fast and never reaches (and fails) a shared batch.
        if weights is not None:
            weights.check_attributes(scorer.attributes)

    def normalization_for(
        self, requested: Normalization | None, weights: AttributeWeights | None, model: str | None = None
    ) -> Normalization | None:
        """The normalization a call gets: what it asked for, else the server's default; None = raw values only.
        Checked before any work is queued, so a call that cannot be normalized fails at once."""
        scorer = self._require_ready(model)
        normalization = requested if requested is not None else self.default_normalization
        if not normalization.enabled:
            return None
        steering_conflict(normalization, weights)
        calibration, note = _calibration_of(scorer)
        if calibration is None:
            raise InvalidInputError(
                f"{NORMALIZATION_FIELD}: model {self.model_name(model)} ({scorer.model_id}) has no calibration, so it "
                f"cannot normalize ({note}); ask for normalization.mode=NONE or serve a calibrated model",
                field=NORMALIZATION_FIELD,
            )
        return normalization

    def normalized(
        self, results: list[ScoreResult], normalization: Normalization | None, model: str | None = None
    ) -> list[ScoreResult]:
        """`results` with their z-scores added (raw values kept); unchanged when normalization is None."""
        if normalization is None:
            return results
        calibration, _ = _calibration_of(self._require_ready(model))
        return [calibration.normalize(r, normalization) for r in results]

    def _encode(self, scorer: ScorerBackend, messages: Any, field: str) -> EncodedConversation:
        with self._encode_lock:
            return scorer.encode(messages, field)

    # ---- waiting -----------------------------------------------------------------------------------

    @staticmethod
    def wait(item: WorkItem, call: CallContext) -> Any:
        """The item's result; cancels the item if the call ends (client cancel) or its deadline passes."""
        if call.on_cancel is not None:
            call.on_cancel(lambda: item.cancel(call.cancel_reason()))
        timeout = None if call.deadline is None else max(0.0, call.deadline - time.monotonic())
        try:
            return item.future.result(timeout=timeout)
        except FutureTimeout:
            item.cancel("deadline")
            raise DeadlineExceededError("the deadline passed before the work was computed") from None

    # ---- calls -------------------------------------------------------------------------------------

    def submit_score(
        self, conversations: Sequence[Any], weights: AttributeWeights | None, call: CallContext, model: str | None = None
    ) -> WorkItem:
        """Check, encode and enqueue; does not wait (ScoreStream keeps several in flight)."""
        scorer = self._require_ready(model)
        with tracing.span(tracing.VALIDATE, conversations=len(conversations)):
            _check_count(
                "conversations", len(conversations), "conversations",
                self.limits.max_conversations_per_request, "max_conversations_per_request",
            )  # fmt: skip
            self._check_weights(weights, scorer)
            encoded = [self._encode(scorer, c, f"conversations[{i}]") for i, c in enumerate(conversations)]
        return self.batcher.submit_score(encoded, weights, deadline=call.deadline, model=model)

    def score(
        self, conversations: Sequence[Any], weights: AttributeWeights | None, call: CallContext = CallContext(), model: str | None = None,
        normalization: Normalization | None = None,
    ) -> list[ScoreResult]:
        """normalization: None = the server's default."""
        applied = self.normalization_for(normalization, weights, model)
        if not conversations:
            return []
        results = check_finite_results(self.wait(self.submit_score(conversations, weights, call, model), call))
        return self.normalized(results, applied, model)

    def score_group(
        self, prompt: Any, responses: Sequence[Any], weights: AttributeWeights | None, call: CallContext = CallContext(),
        model: str | None = None, normalization: Normalization | None = None,
    ) -> GroupResult:
        """Scorer.score_group split in two: the group is encoded here (Scorer.encode_group) and the model runs
        on the batcher thread.

        The responses reach the scorer in one score_encoded call (unless the batcher's token budget splits
        them), where conversations starting with the same prompt tokens run that prompt once and continue from
        its key/value cache (ScorerConfig.share_prompts, model/batch_plan.plan_shared_prompts)."""
        scorer = self._require_ready(model)
        applied = self.normalization_for(normalization, weights, model)
        with tracing.span(tracing.VALIDATE, conversations=len(responses)):
            if not responses:
                raise InvalidInputError("responses: a group needs at least one response", field="responses")
            _check_count("responses", len(responses), "responses", self.limits.max_group_size, "max_group_size")
            self._check_weights(weights, scorer)
            with self._encode_lock:
                encoded = scorer.encode_group(prompt, responses)
        item = self.batcher.submit_score(encoded, weights, deadline=call.deadline, model=model)
        results = check_finite_results(self.wait(item, call))
        group = GroupResult.of(self.normalized(results, applied, model))  # statistics of the raw scores
        _finite(group.mean, "mean")
        _finite(group.std, "std")
        return group

    def compare(
        self, pairs: Sequence[tuple[Any, Any, Any]], weights: AttributeWeights | None, call: CallContext = CallContext(),
        model: str | None = None, normalization: Normalization | None = None,
    ) -> list[CompareResult]:
        """pairs: (prompt, chosen, rejected); prompt = messages or a string, chosen/rejected = strings.
        p_chosen and score_* are the raw scores'; normalization adds z-scores to `chosen` and `rejected`."""
        scorer = self._require_ready(model)
        applied = self.normalization_for(normalization, weights, model)
        if not pairs:  # the same rule as ScoreGroup's responses: a request must name its work
            raise InvalidInputError("pairs: a Compare needs at least one pair", field="pairs")
        limit = self.limits.max_conversations_per_request
        if 2 * len(pairs) > limit:  # each pair is two conversations
            raise InvalidInputError(
                f"pairs: {len(pairs)} pairs ({2 * len(pairs)} conversations), over max_conversations_per_request={limit}",
                field="pairs",
            )
        self._check_weights(weights, scorer)
        with self._encode_lock:
            encoded = scorer.encode_pairs(pairs)
        item = self.batcher.submit_score(encoded, weights, deadline=call.deadline, model=model)
        results = self.normalized(check_finite_results(self.wait(item, call)), applied, model)  # p_chosen stays raw
        return [CompareResult.of(results[2 * i], results[2 * i + 1]) for i in range(len(pairs))]

    def inspect(
        self, prompt: Any, weights: AttributeWeights | None, top_k: int = 0, call: CallContext = CallContext(), model: str | None = None
    ) -> InspectResult:
        """Gating weights for a prompt, sorted by weight (descending), cut to the top_k (0 = all)."""
        scorer = self._require_ready(model)
        if top_k < 0:
            raise InvalidInputError(f"top_k must be >= 0 (0 = all), got {top_k}", field="top_k")
        self._check_weights(weights, scorer)
        with self._encode_lock:
            encoded = scorer.encode_prompt(prompt, "prompt")
        item = self.batcher.submit_inspect(encoded, weights, deadline=call.deadline, model=model)
        result: InspectResult = self.wait(item, call)
        check_finite(result)
        ranking = result.gating or result.coefficients  # a model without gating: its fixed coefficients
        order = sorted(ranking, key=lambda a: -ranking[a])
        if top_k:
            order = order[:top_k]
        return replace(
            result,
            gating={a: result.gating[a] for a in order if a in result.gating},
            coefficients={a: result.coefficients[a] for a in order},
        )

    def model_info(self, model: str | None = None) -> dict[str, Any]:
        """The named (or default) model's model_info, plus its name, metrics, server_version, limits (a
        config.Limits) and `models`: every served model (served_models)."""
        scorer = self._require_ready(model)
        info = dict(scorer.model_info())
        info["name"] = self.model_name(model)
        info["models"] = self.served_models()
        provenance = info.get("provenance") or {}
        info["metrics"] = info.get("metrics") or (provenance.get("metrics") if isinstance(provenance, dict) else None) or {}
        info["server_version"] = __version__
        info["limits"] = self.limits
        info["default_normalization"] = self.default_normalization
        return info
