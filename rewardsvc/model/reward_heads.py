"""The seam between the Scorer and a model kind: what turns backbone embeddings into a score.

Two kinds implement it:
- `heads.ArmoHeads` (kind "armorm"): per-attribute regression, the verbosity transform and a prompt-conditioned
  gating; our heads format and the reference ArmoRM layout both load into it.
- `seqcls.SequenceClassificationHeads` (kind "sequence-classification"): the `score` layer of a standard
  Hugging Face `*ForSequenceClassification` model; one label gives the score alone, several labels are named
  attributes mixed with fixed weights (no gating).

The Scorer runs the backbone (padded, packed, shared-prompt or one per forward: model/embedding.py), reads the
response (and prompt) hidden states at the anchors the kind asks for (`response_anchor`), and hands them to
`outputs`. Everything kind-specific stays behind this protocol, so the batcher, the data plane, gRPC, HTTP and
the CLI serve every kind the same way.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from ..types import AttributeWeights
from .encoding import ResponseAnchor
from .heads import HeadOutput


@runtime_checkable
class RewardHeads(Protocol):
    kind: str  # "armorm" | "sequence-classification"
    response_anchor: ResponseAnchor  # how the encoder renders and where it reads the response
    has_gating: bool  # False: the weights do not depend on the prompt (inspect says there is no gating)

    @property
    def attributes(self) -> tuple[str, ...]:
        """Named attributes (K); empty for a single-score model."""
        ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def feature_layer(self) -> int | None:
        """Backbone blocks the heads read after (None: all of them)."""
        ...

    def outputs(self, response: torch.Tensor, prompt: torch.Tensor, weights: AttributeWeights | None) -> HeadOutput:
        """response, prompt: (N, H) hidden states at the anchors -> rewards (N, K), weights used (N, K or 0),
        coefficients (N, K) with score = sum_k c_k r_k (plus any constant), score (N,)."""
        ...

    def weights_for(self, prompt: torch.Tensor | None, weights: AttributeWeights | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(gating (N, K) or (N, 0) without gating, coefficients (N, K)) for prompts (N, H); `prompt` may be
        None when `has_gating` is False (nothing is computed from it)."""
        ...

    def weights_source(self, weights: AttributeWeights | None) -> str:
        """What the results' `weights_source` says: "gating", "override", "mask" or "fixed"."""
        ...

    def describe(self) -> dict[str, Any]:
        """What model_info reports about the kind (its `provenance` carries it over the wire)."""
        ...
