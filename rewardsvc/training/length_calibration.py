"""Length calibration after stage 2: one common offset delta on the verbosity penalties (row v of T), chosen by
one of `LENGTH_CALIBRATIONS` (TrainConfig.length_calibration). Raising every lambda_j by delta changes the score
by -delta * p, p = r_v * sum_{j != v} g_j: a length penalty in the score itself, in the same checkpoint format.

- "pairwise": Bradley-Terry on the stage-2 training pairs, with the score difference and the
  penalty difference as the two regressors, each category and each source in it weighted the same
  (length_fit.fit_offset_pairwise). The length coefficient is what the preferences support: where the shorter
  answer usually wins (safety, chat-hard) it is not pushed to zero correlation.
- "balanced-spearman": the delta minimising the largest |Spearman(score, length)| over the stage-2 categories and
  all responses pooled, on the training pairs' responses, weighted the same way (length_fit.fit_offset_minimax).
- "chat-spearman": Spearman ~0 on the chat responses of training AND validation, unweighted (the shipped default's).
- "per-category": one offset per stage-2 category, spread over the lambdas by where each category's gating goes
  (a per-attribute offset: the penalty follows the prompt). One common offset cannot bring chat and safety to 0
  together (docs/TRAINING.md); with the gatings apart, this can, on the categories it has training pairs for.
- "none": no offset.

Why not zero correlation on chat alone: the offset did not transfer. It gave -0.03 on the responses it was fit on
but +0.28 on pairs measured outside the repository, and -0.23 within the held-out safety category. Both reference
methods fit on training pairs only, so validation judges them (docs/TRAINING.md has the measurements).

Which rewards: "pairwise" uses the out-of-fold rewards of the training pairs that the gating learned from, where
given (`train_rewards`): in-sample preference heads separate their own pairs too well and would inflate the
score's coefficient a. "balanced-spearman" uses the served heads' rewards: what it controls is how the served
score relates to length, and the out-of-fold heads (each fit on half the rows) relate to length differently: in a
fit on a small partial store, their chat Spearman at delta 0 was near 0 where the served heads' was far below it,
on the training responses and on validation alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import InvalidInputError
from ..model.heads import ArmoHeads
from .debias import DEFAULT_OFFSET_GRID, apply_length_offset, fit_length_offset
from .length_fit import balanced_response_weights, fit_offset_minimax, fit_offset_pairwise, fit_offsets_coordinatewise
from .pair_split import PairSplit
from .stage2 import balanced_weights
from .train_config import LENGTH_CALIBRATIONS

CHAT = "chat"


def fit_length_calibration(method: str, heads: ArmoHeads, train: PairSplit, val: PairSplit, i: int, verbosity_index: int,
                           train_rewards: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:  # fmt: skip
    """The offset delta of `method` for these heads (not applied) and how it was found: {"method", "delta", ...}."""
    if method not in LENGTH_CALIBRATIONS:
        raise InvalidInputError(f"length_calibration must be one of {LENGTH_CALIBRATIONS}, got {method!r}",
                                field="length_calibration")  # fmt: skip
    if method == "none":
        return {"method": method, "delta": 0.0}
    if method == "chat-spearman":
        return {"method": method, **_chat_spearman(heads, (train, val), i, verbosity_index)}
    categories = [p.category for p in train.pairs]
    sources = [p.source for p in train.pairs]
    if method == "balanced-spearman":
        score, penalty = _score_and_penalty(heads, train, i, verbosity_index, None)  # (2, N) each: chosen, rejected
        lengths = [len(p.chosen) for p in train.pairs] + [len(p.rejected) for p in train.pairs]
        fit = fit_offset_minimax(score.reshape(-1), penalty.reshape(-1), lengths, categories * 2,
                                 balanced_response_weights(categories * 2, sources * 2), DEFAULT_OFFSET_GRID)  # fmt: skip
        return {"method": method, **fit, "responses": len(lengths),
                "reference": "stage-2 training responses of every category, each category and source weighted the same"}  # fmt: skip
    if method == "per-category":
        return {"method": method, **_per_category(heads, train, i, verbosity_index, categories, sources)}
    score, penalty = _score_and_penalty(heads, train, i, verbosity_index, train_rewards)
    fit = fit_offset_pairwise(score[0] - score[1], penalty[0] - penalty[1],
                              balanced_weights(list(zip(categories, sources))).numpy())  # fmt: skip
    if fit["delta"] is None:
        return {"method": method, **fit, "delta": 0.0, "fallback": "the score does not predict the training preferences "
                "(a <= 0): no length penalty fitted"}  # fmt: skip
    return {"method": method, **fit,
            "reference": "stage-2 training pairs, each category and source weighted the same (out-of-fold rewards)"}  # fmt: skip


def apply_length_calibration(heads: ArmoHeads, verbosity_index: int, fit: dict[str, Any]) -> None:
    """Raise the lambdas of the heads by a fit's offsets, in place: its per-attribute `deltas` where it has them,
    else one `delta` on every lambda_j (j != v)."""
    if "deltas" not in fit:
        heads.reward_transform_matrix.copy_(apply_length_offset(heads.reward_transform_matrix, verbosity_index, fit["delta"]))
        return
    for j, name in enumerate(heads.attributes):
        if j != verbosity_index:
            heads.reward_transform_matrix[verbosity_index, j] -= float(fit["deltas"][name])


@torch.inference_mode()
def _per_category(heads: ArmoHeads, train: PairSplit, i: int, v: int, categories: list[str], sources: list[str]) -> dict[str, Any]:
    """One offset d_c per category, spread over the attributes by where the category's gating mass goes:
    delta_j = sum_c d_c w_cj, w_cj = the share of attribute j's mean gating weight that comes from category c's
    prompts. A prompt then loses about r_v * sum_j g_j delta_j: its own category's offset where the gatings differ."""
    gating = heads.gate(train.prompt[:, i]).double()  # (N, K)
    names = sorted(set(categories))
    mine = torch.tensor([[c == name for c in categories] for name in names], dtype=torch.float64)  # (C, N)
    mean = (mine @ gating) / mine.sum(1, keepdim=True)  # (C, K) mean gating per category
    mean[:, v] = 0.0
    share = mean / mean.sum(0, keepdim=True).clamp_min(1e-12)  # (C, K) w_cj
    rewards = torch.stack([heads.rewards(train.chosen[:, i]), heads.rewards(train.rejected[:, i])]).double()  # (2, N, K)
    penalties = (rewards[..., v, None] * (gating @ share.T)[None]).reshape(-1, len(names))  # (2N, C)
    score, _ = _score_and_penalty(heads, train, i, v, None)
    lengths = [len(p.chosen) for p in train.pairs] + [len(p.rejected) for p in train.pairs]
    fit = fit_offsets_coordinatewise(score.reshape(-1), penalties.numpy(), lengths, categories * 2,
                                     balanced_response_weights(categories * 2, sources * 2), DEFAULT_OFFSET_GRID)  # fmt: skip
    offsets = torch.tensor(fit["offsets"], dtype=torch.float64)
    deltas = offsets @ share  # (K,)
    effective = (gating @ deltas) / (gating.sum(1) - gating[:, v])  # (N,) each prompt's gating-weighted offset
    return {"delta": float(effective.mean()), "deltas": {a: float(deltas[j]) for j, a in enumerate(heads.attributes) if j != v},
            "category_offsets": dict(zip(names, fit["offsets"])), "spearman": fit["spearman"],
            "spearman_at_zero": fit["spearman_at_zero"], "sweeps": fit["sweeps"], "responses": len(lengths),
            "reference": "stage-2 training responses of every category, each category and source weighted the same; "
                         "one offset per category, spread over the attributes by the categories' mean gating"}  # fmt: skip


@torch.inference_mode()
def _score_and_penalty(heads: ArmoHeads, split: PairSplit, i: int, v: int,
                       rewards: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Score at delta 0 and the penalty p = r_v * sum_{j != v} g_j, each (2, N): row 0 chosen, row 1 rejected."""
    gating = heads.gate(split.prompt[:, i]).double()  # (N, K)
    if rewards is None:
        rewards = (heads.rewards(split.chosen[:, i]), heads.rewards(split.rejected[:, i]))
    K = gating.shape[1]
    if any(tuple(r.shape) != (len(split.pairs), K) for r in rewards):
        raise InvalidInputError(f"train_rewards must be two ({len(split.pairs)}, {K}) tensors", field="train_rewards")
    transform = heads.reward_transform_matrix.double()
    others = gating.sum(1) - gating[:, v]  # (N,)
    score = torch.stack([((r.double() @ transform) * gating).sum(1) for r in rewards])  # (2, N)
    penalty = torch.stack([r.double()[:, v] * others for r in rewards])  # (2, N)
    return score.numpy(), penalty.numpy()


def _chat_spearman(heads: ArmoHeads, splits: Sequence[PairSplit], i: int, verbosity_index: int) -> dict[str, Any]:
    """The previous default: Spearman(score, length) ~0 on the chat responses of training and validation."""
    prompt, responses, lengths = [], [], []
    for split in splits:
        keep = [p.category == CHAT for p in split.pairs]
        mine = torch.tensor(keep, dtype=torch.bool)
        pairs = [p for p, kept in zip(split.pairs, keep) if kept]
        prompt += [split.prompt[mine, i], split.prompt[mine, i]]
        responses += [split.chosen[mine, i], split.rejected[mine, i]]
        lengths += [len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs]
    if len(lengths) < 3:
        raise InvalidInputError("length_calibration 'chat-spearman' needs at least 2 chat stage-2 pairs",
                                field="length_calibration")  # fmt: skip
    with torch.inference_mode():
        gating, rewards = heads.gate(torch.cat(prompt)), heads.rewards(torch.cat(responses))
    delta, rho, rho_zero = fit_length_offset(rewards, gating, heads.reward_transform_matrix, verbosity_index, lengths)
    return {"delta": delta, "spearman": {CHAT: rho}, "spearman_at_zero": {CHAT: rho_zero}, "responses": len(lengths),
            "reference": "stage-2 training and validation responses of chat"}  # fmt: skip
