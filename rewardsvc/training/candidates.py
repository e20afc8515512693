"""Fitting one candidate of the recipe (a feature layer, with or without preference heads): stage 1 heads
(+ per-category Bradley-Terry heads), verbosity debiasing, stage-2 gating for each learning rate, and the
length calibration; out-of-fold rewards keep the gating from trusting memorised heads. `run_training`
(training.pipeline) fits every candidate and keeps the best on validation."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..config import HeadsConfig
from ..errors import InvalidInputError
from ..evaluation.report import evaluate_pairs
from ..model.heads import ArmoHeads
from .data.attributes import VERBOSITY
from .data.schema import PreferencePair, RatedConversation
from .data.splits import unit_hash
from .debias import fit_verbosity_penalties
from .length_calibration import apply_length_calibration, fit_length_calibration
from .pair_split import PairSplit
from .preference_heads import fit_preference_head
from .stage1 import fit_stage1
from .stage2 import PreferencePairs, balanced_weights, standardize_gating_input, train_gating
from .train_config import LENGTH_CALIBRATIONS, TrainConfig

PREFERENCE_PREFIX = "preference_"
LENGTH_VARIANT_PREFIX = "length_calibration:"  # Candidate.variants key of each calibration method


@dataclass
class Candidate:
    layer: int
    preference: bool
    heads: ArmoHeads
    variants: dict[str, ArmoHeads]
    report: dict[str, Any]

    @property
    def rank(self) -> tuple:
        # Best category-balanced validation accuracy (the validation pairs are mostly safety pairs, the held-out mix
        # is not: an overall figure would pick the best safety model), then overall accuracy, then the cheaper model.
        s2 = self.report["stage2"]["after_debiasing"]
        return (self.report["val_balanced_accuracy"], s2["best_val_accuracy"], -self.layer, not self.preference)


def _fold(items: Sequence, seed: int) -> torch.Tensor:
    """Two folds by prompt group, the same for stage-1 rows and stage-2 pairs: a pair's responses are never in the
    rows that fit the heads whose out-of-fold rewards the gating learns from."""
    return torch.tensor([unit_hash(it.group, f"rewardsvc-crossfit-{seed}") < 0.5 for it in items], dtype=torch.bool)


def out_of_fold_stage1(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                        rows: Sequence[RatedConversation], train: PairSplit, i: int, seed: int, attributes: Sequence[str],
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
    """Stage-1 rewards (N, K) of the training pairs' chosen and rejected responses from heads fit without their fold.

    The stage-1 rows share many responses with the stage-2 pairs (XSTest and UltraFeedback completions): with
    in-sample rewards the gating learns to trust whichever head memorised them (on a partial store the XSTest
    `appropriate` head took 0.9 of every prompt's weight). None when a fold has too few labels for some attribute.
    """
    row_fold, pair_fold = _fold(rows, seed), _fold(train.pairs, seed)
    chosen = torch.zeros(len(train.pairs), len(attributes))
    rejected = torch.zeros_like(chosen)
    for held_out in (True, False):
        fit = row_fold != held_out
        try:
            part = fit_stage1(x_train[fit], y_train[fit], x_val, y_val, attributes, fit_intercept=True)
        except InvalidInputError:
            return None
        apply = pair_fold == held_out
        chosen[apply] = train.chosen[apply, i] @ part.weight.T + part.bias
        rejected[apply] = train.rejected[apply, i] @ part.weight.T + part.bias
    return chosen, rejected


def category_preference_heads(train: PairSplit, val: PairSplit, i: int, seed: int) -> tuple[list, dict, tuple[torch.Tensor, torch.Tensor]]:
    """One head per stage-2 category, and the training pairs' out-of-fold rewards (N, P) of chosen and rejected.

    The gating learns from the training pairs, so it must see these heads' rewards as they are on pairs the heads
    did not fit: in-sample rewards look better than they are, and the gating would learn to trust them. Two folds
    by prompt group give out-of-fold rewards with the C chosen on validation.
    """
    categories = sorted({p.category for p in train.pairs})
    heads, info = [], {}
    oof_c = torch.zeros(len(train.pairs), len(categories))
    oof_r = torch.zeros_like(oof_c)
    fold = _fold(train.pairs, seed)
    for j, category in enumerate(categories):
        mine = torch.tensor([p.category == category for p in train.pairs])
        mine_val = torch.tensor([p.category == category for p in val.pairs])
        if mine.sum() < 2 or mine_val.sum() < 1:
            raise InvalidInputError(f"stage-2 category {category!r} has too few pairs for a preference head", field="pairs")
        head = fit_preference_head(train.chosen[mine, i], train.rejected[mine, i], val.chosen[mine_val, i],
                                   val.rejected[mine_val, i])  # fmt: skip
        heads.append((PREFERENCE_PREFIX + category, head))
        info[PREFERENCE_PREFIX + category] = {"C": head.C, "val_accuracy": head.val_accuracy,
                                              "train_accuracy": head.train_accuracy}  # fmt: skip
        for held_out in (True, False):
            fit_rows = mine & (fold != held_out)
            if fit_rows.sum() < 2:
                raise InvalidInputError(f"stage-2 category {category!r} has too few pairs for two folds", field="pairs")
            part = fit_preference_head(train.chosen[fit_rows, i], train.rejected[fit_rows, i], val.chosen[mine_val, i],
                                       val.rejected[mine_val, i], Cs=(head.C,))  # fmt: skip
            rows = fold == held_out
            oof_c[rows, j] = train.chosen[rows, i] @ part.weight + part.bias
            oof_r[rows, j] = train.rejected[rows, i] @ part.weight + part.bias
    return heads, info, (oof_c, oof_r)


def fit_candidate(config: TrainConfig, layer: int, i: int, preference: bool, stage1, stage1_oof, train: PairSplit,
                   val: PairSplit, hidden_size: int, depth: int) -> Candidate:  # fmt: skip
    attributes = list(stage1.attributes)
    weight, bias = stage1.weight, stage1.bias
    train_rewards = stage1_oof
    report: dict[str, Any] = {"layer": layer, "preference_heads": preference, "out_of_fold_stage1": stage1_oof is not None}
    if preference:
        extra, report["preference_heads_fit"], oof = category_preference_heads(train, val, i, config.seed)
        attributes += [name for name, _ in extra]
        weight = torch.cat([weight, torch.stack([h.weight for _, h in extra])])
        bias = torch.cat([bias, torch.tensor([h.bias for _, h in extra])])
        if stage1_oof is None:
            with torch.no_grad():
                stage1_oof = (train.chosen[:, i] @ stage1.weight.T + stage1.bias,
                              train.rejected[:, i] @ stage1.weight.T + stage1.bias)  # fmt: skip
        train_rewards = (torch.cat([stage1_oof[0], oof[0]], 1), torch.cat([stage1_oof[1], oof[1]], 1))
    heads_config = HeadsConfig(
        attributes=tuple(attributes), hidden_size=hidden_size, gating_hidden_dim=config.gating_hidden_dim,
        gating_n_hidden=config.gating_n_hidden, gating_temperature=config.gating_temperature,
        verbosity_attribute=VERBOSITY, regression_bias=True, feature_layer=None if layer == depth else layer,
    )  # fmt: skip
    torch.manual_seed(config.seed)
    initial = ArmoHeads(heads_config)
    with torch.no_grad():
        initial.regression_layer.weight.copy_(weight)
        initial.regression_layer.bias.copy_(bias)
    standardize_gating_input(initial, train.prompt[:, i])

    # Verbosity debiasing on the stage-2 training responses (the reference set).
    train_pairs, val_pairs = train.at(i), val.at(i)
    with torch.inference_mode():
        reference = initial.rewards(torch.cat([train_pairs.chosen, train_pairs.rejected]))
    lambdas, transform, debias_report = fit_verbosity_penalties(
        reference, attributes.index(VERBOSITY), attributes, threshold=config.debias_threshold
    )
    report["debiasing"] = {"lambdas": lambdas, "report": debias_report, "threshold": config.debias_threshold}

    weights = balanced_weights([(p.category, p.source) for p in train.pairs])
    variants: dict[str, ArmoHeads] = {}
    report["stage2"] = {}
    for variant, T in (("before_debiasing", torch.eye(len(attributes))), ("after_debiasing", transform)):
        tried = []
        for lr in config.stage2_lrs:
            heads = copy.deepcopy(initial)
            heads.reward_transform_matrix.copy_(T)
            t = time.perf_counter()
            result = train_gating(heads, train_pairs, val_pairs, replace(config.stage2, lr=lr),
                                  sample_weights=weights, train_rewards=train_rewards)  # fmt: skip
            best = result.history[result.best_epoch]
            summary = {"lr": lr, "best_val_accuracy": result.best_val_accuracy, "best_val_loss": best["val_loss"],
                       "best_epoch": result.best_epoch, "steps": result.steps,
                       "seconds": round(time.perf_counter() - t, 2), **validation_accuracy(heads, val, val_pairs)}  # fmt: skip
            tried.append((heads, summary))
        # Best category-balanced validation accuracy, then overall, then the larger lr (the first given).
        heads, chosen = max(tried, key=lambda hs: (hs[1]["val_balanced_accuracy"], hs[1]["best_val_accuracy"]))
        report["stage2"][variant] = {**chosen, "lrs_tried": [s for _, s in tried]}
        variants[variant] = heads
    # Length calibration: every method is fit on this gating and recorded (validation figures included); the
    # configured one is applied, and the candidates then compete on their calibrated validation accuracy.
    verbosity_index = attributes.index(VERBOSITY)
    uncalibrated = variants["after_debiasing"]
    alternatives = {}
    for method in LENGTH_CALIBRATIONS:
        fit = fit_length_calibration(method, uncalibrated, train, val, i, verbosity_index, train_rewards)
        heads = copy.deepcopy(uncalibrated)
        apply_length_calibration(heads, verbosity_index, fit)
        alternatives[method] = {**fit, **validation_accuracy(heads, val, val_pairs)}
        variants[LENGTH_VARIANT_PREFIX + method] = heads
    chosen_fit = alternatives[config.length_calibration]
    report["length_offset"] = {**chosen_fit, "alternatives": alternatives}
    report.update({k: chosen_fit[k] for k in ("val_balanced_accuracy", "val_categories", "val_spearman")})
    variants["after_debiasing"] = variants[LENGTH_VARIANT_PREFIX + config.length_calibration]
    return Candidate(layer, preference, variants["after_debiasing"], variants, report)


def validation_accuracy(heads: ArmoHeads, val: PairSplit, val_pairs: PreferencePairs) -> dict[str, Any]:
    """Validation accuracy per category and its category-balanced mean (what ranks gatings and candidates), and
    Spearman(score, length) over all validation responses and per category."""
    result = evaluate_pairs(pair_records(heads, val.pairs, val_pairs))
    categories = {c: v["accuracy"] for c, v in result["categories"].items()}
    return {"val_balanced_accuracy": sum(categories.values()) / len(categories), "val_categories": categories,
            "val_spearman": {"all": result["verbosity_spearman"], **result["verbosity_spearman_by_category"]}}


@torch.inference_mode()
def pair_records(heads: ArmoHeads, pairs: Sequence[PreferencePair], tensors: PreferencePairs) -> list[dict[str, Any]]:
    """Per pair: scores of both responses, their lengths (characters) and the gating used."""
    gating = heads.gate(tensors.prompt)  # (N, K)
    s_c = heads.combine(heads.rewards(tensors.chosen), gating).score
    s_r = heads.combine(heads.rewards(tensors.rejected), gating).score
    return [
        {"id": p.id, "subset": p.subset, "category": p.category, "chosen_score": float(s_c[i]),
         "rejected_score": float(s_r[i]), "chosen_length": len(p.chosen), "rejected_length": len(p.rejected),
         "gating": dict(zip(heads.attributes, gating[i].tolist()))}  # fmt: skip
        for i, p in enumerate(pairs)
    ]
