"""Preference heads: a linear reward fit with Bradley-Terry (logistic regression) on preference pairs.

Symbols: N pairs, H hidden size.

ArmoRM's backbone was itself a Bradley-Terry reward model, so its last-token state already carries a preference
direction. With a frozen chat LM as backbone that direction has to be found: a linear head w with
P(chosen > rejected) = sigmoid(w . (h_c - h_r)) is exactly logistic regression without intercept on the
differences. The head is then one more attribute next to the rated ones: served as r = w . h + b, rescaled
so that r has mean 0 and standard deviation 1 on the training responses (the units of the stage-1 heads).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from ..errors import InvalidInputError
from ..evaluation.report import pair_outcomes

DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 1, 11))
"""Inverse L2 strengths tried (sklearn's C), on features scaled to unit overall std: 1e-4 .. 10."""


@dataclass(frozen=True)
class PreferenceHead:
    """r = weight . h + bias, in units of the training responses' reward std."""

    weight: torch.Tensor  # (H,) float32
    bias: float
    C: float
    val_accuracy: float
    """Pairwise accuracy on the validation pairs (ties 0.5)."""
    train_accuracy: float


def _accuracy(w: np.ndarray, diff: np.ndarray) -> float:
    return float(pair_outcomes(diff @ w).mean())


def fit_preference_head(
    train_chosen: torch.Tensor, train_rejected: torch.Tensor, val_chosen: torch.Tensor, val_rejected: torch.Tensor,
    Cs: Sequence[float] = DEFAULT_CS,
) -> PreferenceHead:
    """Fit w on (N, H) chosen/rejected response embeddings; C by validation accuracy (ties: validation loss)."""
    if len(train_chosen) < 2 or len(val_chosen) < 1:
        raise InvalidInputError(
            f"a preference head needs >= 2 training and >= 1 validation pairs, got {len(train_chosen)} and {len(val_chosen)}",
            field="pairs",
        )
    tc, tr = train_chosen.double().numpy(), train_rejected.double().numpy()
    vc, vr = val_chosen.double().numpy(), val_rejected.double().numpy()
    d = tc - tr
    # Both orientations: no intercept is needed by symmetry, and classes are exactly balanced.
    X = np.concatenate([d, -d]); y = np.concatenate([np.ones(len(d)), np.zeros(len(d))])
    scale = X.std() or 1.0
    vd = vc - vr
    best = None
    for C in Cs:
        clf = LogisticRegression(C=C, fit_intercept=False, max_iter=2000, tol=1e-6)
        clf.fit(X / scale, y)
        w = clf.coef_[0] / scale
        m = vd @ w
        acc = _accuracy(w, vd)
        loss = float(np.logaddexp(0, -m).mean())
        if best is None or (acc, -loss) > best[0]:
            best = ((acc, -loss), C, w)
    _, C, w = best
    responses = np.concatenate([tc, tr]) @ w
    mu, sd = responses.mean(), responses.std() or 1.0
    w_std = w / sd
    return PreferenceHead(weight=torch.from_numpy(w_std).float(), bias=float(-mu / sd), C=float(C),
                          val_accuracy=_accuracy(w, vd), train_accuracy=_accuracy(w, d))  # fmt: skip
