"""What serving needs from a model: the data plane encodes with it (handler threads, under a lock) and the
batcher computes with it (its one thread). rewardsvc.model.scorer.Scorer is the implementation; tests use
small ones (a Scorer over a tiny random Llama, or a test double)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from ..config import ScorerConfig
from ..model.conversation import Messages
from ..model.encoding import EncodedConversation
from ..normalization import Calibration
from ..types import AttributeWeights, InspectResult, ScoreResult


class ConversationEncoder(Protocol):
    def encode(self, messages: Messages, field: str) -> EncodedConversation:
        """Template and tokenize already validated messages (the last one is the response)."""
        ...


@runtime_checkable
class ScorerBackend(Protocol):
    config: ScorerConfig  # its max_tokens is the limit max_tokens_per_conversation
    encoder: ConversationEncoder
    model_id: str
    trained: bool
    calibration: Calibration | None  # normalization statistics stored with the model (`rewardsvc calibrate`)
    calibration_note: str  # where they come from, or why there are none

    @property
    def attributes(self) -> tuple[str, ...]: ...

    def weights_source(self, weights: AttributeWeights | None) -> str:
        """What results computed with `weights` report: "gating", "override", "mask" or "fixed" (no gating)."""
        ...

    # ---- handler threads (data plane) --------------------------------------------------------------

    def encode(self, messages: Any, field: str = "messages") -> EncodedConversation:
        """Validate, template and tokenize one conversation (InvalidInputError naming `field`)."""
        ...

    def encode_prompt(self, messages: Any, field: str = "prompt") -> EncodedConversation: ...

    def encode_group(self, prompt: Any, responses: Sequence[Any]) -> list[EncodedConversation]:
        """One prompt, N responses -> N encoded conversations (errors name `prompt` / `responses[i]`)."""
        ...

    def encode_pairs(self, pairs: Sequence[tuple[Any, Any, Any]]) -> list[EncodedConversation]:
        """(prompt, chosen, rejected) triples -> chosen, rejected, chosen, ... (errors name `pairs[i].*`)."""
        ...

    def model_info(self) -> dict[str, Any]: ...

    def with_config(self, config: ScorerConfig) -> "ScorerBackend":
        """The same loaded model under other limits (the server applies its max_tokens_per_conversation)."""
        ...

    # ---- the batcher thread only -------------------------------------------------------------------

    def score_encoded(
        self, encoded: Sequence[EncodedConversation], weights: AttributeWeights | None = None
    ) -> list[ScoreResult]: ...

    def inspect_encoded(self, encoded: EncodedConversation, weights: AttributeWeights | None = None) -> InspectResult: ...
