"""The modeling file of an exported model (`rewardsvc export`): an ArmoRM-layout reward model that plain
transformers loads with `AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)`.

`model/export.py` copies this file, unchanged, into the export directory as `modeling_rewardsvc_armorm.py`;
the export's config.json names it in `auto_map`. So it must stand alone: it imports only torch and
transformers, never rewardsvc (the export has to work where rewardsvc is not installed). Written for rewardsvc
from the method's description (DESIGN.md section 1); no code of the published ArmoRM repository.

The maths is rewardsvc's (model/heads.py): on the backbone's last hidden states,
    r = W h_r (+ b)            rewards at the response anchor           (B, K)
    g = beta * softmax(MLP(h_p) / tau)   gating at the prompt anchor     (B, K)
    score = sum_k g_k (r T)_k                                            (B,)
Heads run in float32 whatever the backbone's dtype, as rewardsvc runs them.

Anchors come from token ids, with what the export read off the tokenizer's chat template (config fields):
- response anchor: the last attended token, stepping back over `trailing_token_ids` (whitespace the template
  puts after the end-of-turn token, which rewardsvc strips); works with left and right padding;
- prompt anchor: the token just before the last occurrence of `assistant_header_ids` (the tokens that open
  the final assistant turn) before the response anchor. A row without it is an error that says so, not a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, PreTrainedModel
from transformers.utils import ModelOutput


@dataclass
class RewardOutput(ModelOutput):
    """logits (B, 1) = score as a one-label classifier; score (B,); rewards (B, K) raw attribute rewards;
    gating_output (B, K) attribute weights; coefficients (B, K) = gating T^T (score = sum_k c_k r_k);
    hidden_state (B, H) and prompt_embedding (B, H) the backbone states at the two anchors."""

    logits: torch.FloatTensor | None = None
    score: torch.FloatTensor | None = None
    rewards: torch.FloatTensor | None = None
    gating_output: torch.FloatTensor | None = None
    coefficients: torch.FloatTensor | None = None
    hidden_state: torch.FloatTensor | None = None
    prompt_embedding: torch.FloatTensor | None = None


class Gating(nn.Module):
    """beta * softmax(MLP(h_p) / tau); parameter names `layers.{i}`, `logit_scale` as in the ArmoRM layout."""

    def __init__(self, hidden_size: int, num_objectives: int, hidden_dim: int, n_hidden: int, temperature: float):
        super().__init__()
        widths = [hidden_size] + [hidden_dim] * n_hidden + [num_objectives]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.temperature = float(temperature)
        self.logit_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.linear(x, layer.weight.float(), layer.bias.float())
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return F.softmax(x / self.temperature, dim=-1) * self.logit_scale.float()[0]


class RewardModelWithGating(PreTrainedModel):
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _keep_in_fp32_modules = ["regression_layer", "gating", "reward_transform_matrix"]

    def __init__(self, config):
        super().__init__(config)
        K, H = int(config.num_objectives), int(config.hidden_size)
        self.model = AutoModel.from_config(config)
        self.regression_layer = nn.Linear(H, K, bias=bool(getattr(config, "regression_bias", False)))
        self.register_buffer("reward_transform_matrix", torch.eye(K))
        self.gating = Gating(H, K, int(config.gating_hidden_dim), int(config.gating_n_hidden), float(config.gating_temperature))
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    # ---- anchors -------------------------------------------------------------------------------------

    def _response_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        B, T = input_ids.shape
        index = torch.arange(T, device=input_ids.device).expand(B, T)
        attended = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        trailing = torch.tensor(list(self.config.trailing_token_ids or []), dtype=input_ids.dtype, device=input_ids.device)
        content = attended & ~torch.isin(input_ids, trailing)
        # The last attended token that is not template whitespace: padding on either side cannot move it.
        last = torch.where(content, index, torch.full_like(index, -1)).max(dim=1).values
        if (last < 0).any():
            raise ValueError(f"rows {(last < 0).nonzero().flatten().tolist()} hold no token to score")
        return last  # (B,)

    def _prompt_positions(self, input_ids: torch.Tensor, response_positions: torch.Tensor) -> torch.Tensor:
        header = list(self.config.assistant_header_ids)
        n = len(header)
        positions = []
        for row, end in zip(input_ids.tolist(), response_positions.tolist()):
            found = -1
            for start in range(end - n + 1, 0, -1):  # the last header that opens the scored turn
                if row[start : start + n] == header:
                    found = start - 1
                    break
            if found < 0:
                raise ValueError(
                    f"a row has no assistant turn header {header} before its last token: pass the conversation "
                    "rendered with this model's chat template (tokenizer.apply_chat_template)"
                )
            positions.append(found)
        return torch.tensor(positions, device=input_ids.device)  # (B,)

    # ---- forward ---------------------------------------------------------------------------------------

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, return_dict=None, **kwargs) -> RewardOutput:
        if input_ids is None:
            raise ValueError("input_ids are required: the anchors are found from the token ids")
        if position_ids is None and attention_mask is not None:
            # Left padding: real tokens start at position 0 in every row, as they do unpadded.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        kwargs.pop("token_type_ids", None)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        hidden = out.last_hidden_state  # (B, T, H)
        response_at = self._response_positions(input_ids, attention_mask)
        prompt_at = self._prompt_positions(input_ids, response_at)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        h_r = hidden[rows, response_at.to(hidden.device)].float()  # (B, H)
        h_p = hidden[rows, prompt_at.to(hidden.device)].float()  # (B, H)
        bias = None if self.regression_layer.bias is None else self.regression_layer.bias.float()
        rewards = F.linear(h_r, self.regression_layer.weight.float(), bias)  # (B, K)
        gating = self.gating(h_p)  # (B, K)
        transform = self.reward_transform_matrix.float()  # (K, K)
        score = (gating * (rewards @ transform)).sum(dim=-1)  # (B,)
        return RewardOutput(
            logits=score.unsqueeze(-1), score=score, rewards=rewards, gating_output=gating,
            coefficients=gating @ transform.T, hidden_state=h_r, prompt_embedding=h_p,
        )  # fmt: skip
