"""ArmoRM heads: per-attribute regression, verbosity transform and prompt-conditioned gating.

Shapes: B batch, H backbone hidden size, K attributes. The heads always run in float32, whatever the
backbone's dtype, so that a bf16 backbone does not also round the (cheap) head arithmetic.
Parameter names equal the reference checkpoint's (`regression_layer.weight`, `reward_transform_matrix`,
`gating.layers.{i}.weight/bias`, `gating.logit_scale`), so one state dict serves both formats. With
`HeadsConfig.regression_bias` the heads also hold `regression_layer.bias` (our format only; the reference
has no bias).

The maths: r = W h_r + b (b = 0 without a bias), r' = r T, g = gating(h_p), score = sum_k g_k r'_k.
The effective coefficients c = g T^T satisfy score = sum_k c_k r_k, bias included, because they act on r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..config import HeadsConfig
from ..types import AttributeWeights, weights_source
from .encoding import ResponseAnchor
from .steering import steer


class GatingNetwork(nn.Module):
    """g = beta * softmax(MLP(h_p) / tau): non-negative attribute weights summing to beta."""

    def __init__(self, in_features: int, out_features: int, hidden_dim: int, n_hidden: int, temperature: float):
        super().__init__()
        widths = [in_features] + [hidden_dim] * n_hidden + [out_features]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.temperature = float(temperature)
        # beta: the reference calls it logit_scale; a learned scale of the whole score.
        self.logit_scale = nn.Parameter(torch.ones(1))

    def logits(self, prompt_embedding: torch.Tensor) -> torch.Tensor:
        x = prompt_embedding  # (B, H)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x  # (B, K)

    def forward(self, prompt_embedding: torch.Tensor) -> torch.Tensor:
        weights = F.softmax(self.logits(prompt_embedding) / self.temperature, dim=-1)
        return weights * self.logit_scale[0]  # (B, K)


@dataclass(frozen=True)
class HeadOutput:
    rewards: torch.Tensor  # (B, K) raw attribute rewards r = W h_r + b (b only with regression_bias)
    debiased: torch.Tensor  # (B, K) r' = r T
    gating: torch.Tensor  # (B, K) g, or the steered weights
    coefficients: torch.Tensor  # (B, K) c = g T^T, so that score = sum_k c_k r_k
    score: torch.Tensor  # (B,) sum_k g_k r'_k


class ArmoHeads(nn.Module):
    """The "armorm" model kind (model/reward_heads.RewardHeads)."""

    kind = "armorm"
    response_anchor = ResponseAnchor()  # the end-of-turn token closing the response
    has_gating = True

    def __init__(self, config: HeadsConfig):
        super().__init__()
        self.config = config
        K, H = config.num_attributes, config.hidden_size
        self.regression_layer = nn.Linear(H, K, bias=config.regression_bias)
        if self.regression_layer.bias is not None:
            nn.init.zeros_(self.regression_layer.bias)  # a fresh head adds nothing until fitted
        # A buffer, not a parameter: stage 2 trains only the gating; the transform comes from stage 1's debiasing.
        self.register_buffer("reward_transform_matrix", torch.eye(K))
        self.gating = GatingNetwork(H, K, config.gating_hidden_dim, config.gating_n_hidden, config.gating_temperature)
        self.float()

    @property
    def attributes(self) -> tuple[str, ...]:
        return self.config.attributes

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def feature_layer(self) -> int | None:
        return self.config.feature_layer

    def rewards(self, response_embedding: torch.Tensor) -> torch.Tensor:
        """r = W h_r + b (B, K): the only place rewards are computed from embeddings."""
        return self.regression_layer(response_embedding.float())  # (B, K)

    def gate(self, prompt_embedding: torch.Tensor) -> torch.Tensor:
        return self.gating(prompt_embedding.float())  # (B, K)

    def combine(self, rewards: torch.Tensor, gating: torch.Tensor) -> HeadOutput:
        """Score from raw rewards (B, K) and attribute weights (B, K)."""
        transform = self.reward_transform_matrix  # (K, K)
        debiased = rewards @ transform  # (B, K)
        score = (gating * debiased).sum(dim=-1)  # (B,)
        coefficients = gating @ transform.T  # (B, K)
        return HeadOutput(rewards=rewards, debiased=debiased, gating=gating, coefficients=coefficients, score=score)

    def forward(self, response_embedding: torch.Tensor, prompt_embedding: torch.Tensor) -> HeadOutput:
        return self.combine(self.rewards(response_embedding), self.gate(prompt_embedding))

    # ---- the RewardHeads protocol (what the Scorer calls) ----------------------------------------------

    def steered_gating(self, prompt_embedding: torch.Tensor, weights: AttributeWeights | None) -> torch.Tensor:
        """The gating for these prompts (N, K), steered by `weights` when given."""
        gating = self.gate(prompt_embedding)  # (N, K)
        return gating if weights is None else steer(gating, weights, self.attributes)

    def outputs(self, response: torch.Tensor, prompt: torch.Tensor, weights: AttributeWeights | None) -> HeadOutput:
        return self.combine(self.rewards(response), self.steered_gating(prompt, weights))

    def weights_for(self, prompt: torch.Tensor | None, weights: AttributeWeights | None) -> tuple[torch.Tensor, torch.Tensor]:
        gating = self.steered_gating(prompt, weights)  # (N, K)
        return gating, gating @ self.reward_transform_matrix.T  # (N, K), as in combine

    def weights_source(self, weights: AttributeWeights | None) -> str:
        return weights_source(weights)

    def describe(self) -> dict:
        return {"model_kind": self.kind}
