"""The whole ArmoRM training run: data -> backbone features -> per candidate (feature layer, preference heads or
not): stage 1 -> debiasing -> stage 2 -> the candidate best on stage-2 validation -> heads checkpoint, evaluated
on the held-out mix before and after debiasing.

Features are the only expensive step: one backbone pass per unique conversation, stopped after the deepest
candidate layer, gives the prompt and response states of every candidate layer. They live in a content-addressed
store (`work_dir/features`, training.feature_store): a re-run, a new source or a changed split embeds only
conversations never seen, and a killed run resumes. Everything after it takes minutes on a CPU.

`embed="stored"` fits on the conversations already in the store and counts the rest as not embedded yet: how a
CPU too slow for the whole data set makes a model from a partial, resumable pass (the provenance says how much).
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import logging
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..config import BackboneConfig, HeadsConfig
from ..errors import InvalidInputError, RewardError
from ..evaluation.report import evaluate_pairs
from ..model.backbone import Backbone, load_backbone, truncate_backbone
from ..model.batch_plan import plan_padded_batches
from ..model.checkpoint import HeadsCheckpoint, save_heads
from ..model.encoding import ChatEncoder, EncodedConversation
from ..model.heads import ArmoHeads
from .data.attributes import ATTRIBUTE_NAMES, VERBOSITY
from .data.build import TrainingSets, build_training_sets, conversation_key, round_robin
from .data.schema import PreferencePair, RatedConversation
from .data.splits import unit_hash
from .debias import apply_length_offset, fit_length_offset, fit_verbosity_penalties
from .feature_store import FeatureStore, extract_features, feature_key
from .model_card import write_model_card
from .preference_heads import fit_preference_head
from .stage1 import fit_stage1
from .stage2 import PreferencePairs, Stage2Config, balanced_weights, standardize_gating_input, train_gating

SHIPPED_ADAPTER_DIR = "adapter"  # where a checkpoint keeps its backbone adapter (model.scorer resolves it)

log = logging.getLogger(__name__)

EMBED_MODES = ("all", "stored")
PREFERENCE_PREFIX = "preference_"


@dataclass(frozen=True)
class TrainConfig:
    """One training run of the default recipe."""

    out_dir: str
    """Where the heads checkpoint (rewardsvc.json, heads.safetensors, MODEL_CARD.md) is written."""
    work_dir: str
    """The built data sets, the feature store (`features/`) and the evaluation records."""
    data_dir: str | None = None
    """../shared/data by default (see rewardsvc.training.data.files)."""
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    name: str = "rewardsvc-default-smollm2-135m"
    max_tokens: int = 1024
    """Conversations longer than this (in tokens) are left out of training and evaluation, and counted."""
    token_budget: int = 4096
    max_chars: int = 2000
    """Training prompts/responses longer than this many characters are left out (rewardsvc.training.data.build)."""
    caps: dict[str, int | None] | None = None
    layers: tuple[int, ...] = (8, 12, 16)
    """Candidate feature layers, as numbers of backbone blocks (LayerSkip-style early exit). One pass stores all of
    them; the served model stops the backbone after the chosen one. On SmolLM2-135M the middle blocks' states
    predicted the ratings far better than the last block's (docs/TRAINING.md)."""
    preference_heads: tuple[bool, ...] = (False, True)
    """Candidates without and with one Bradley-Terry head per stage-2 category (training.preference_heads)."""
    embed: str = "all"
    """`all`: embed every conversation the store lacks first. `stored`: fit on what the store holds (partial run)."""
    seed: int = 0
    gating_hidden_dim: int = 256
    gating_n_hidden: int = 3
    gating_temperature: float = 10.0
    debias_threshold: float = 0.03
    length_reference: tuple[str, ...] = ("chat",)
    """After stage 2, every lambda_j is raised by one delta so that the score's Spearman with response length is ~0
    on the stage-2 responses (training and validation) of these categories (debias.fit_length_offset); () skips
    it. Safety responses are left out: their length is set by refusing or complying, which is what the safety
    heads must judge. Without it the held-out Spearman was -0.134; docs/TRAINING.md has the measurements."""
    stage2: Stage2Config = field(default_factory=lambda: Stage2Config(lr=1e-3, weight_decay=1e-3, patience=30, max_epochs=300))
    stage2_lrs: tuple[float, ...] = (1e-3, 3e-4, 1e-4)
    """Stage-2 learning rates tried (each replaces `stage2.lr`); the gating best on category-balanced validation
    accuracy is kept. On the full data, lr 1e-3 early-stopped at epoch 11 with a gating nearly constant in the
    prompt (`appropriate` ~1.07 everywhere); 3e-4 was better on validation and follows the prompt (docs/TRAINING.md)."""
    evaluate: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if not self.layers or any(x < 1 for x in self.layers) or len(set(self.layers)) != len(self.layers):
            raise InvalidInputError(f"layers must be distinct integers >= 1, got {self.layers}", field="layers")
        if not self.preference_heads:
            raise InvalidInputError("preference_heads must hold at least one of False / True", field="preference_heads")
        object.__setattr__(self, "stage2_lrs", tuple(float(x) for x in self.stage2_lrs))
        if not self.stage2_lrs or not all(x > 0 for x in self.stage2_lrs):
            raise InvalidInputError(f"stage2_lrs must be learning rates > 0, got {self.stage2_lrs}", field="stage2_lrs")
        object.__setattr__(self, "length_reference", tuple(str(x) for x in self.length_reference))
        if self.embed not in EMBED_MODES:
            raise InvalidInputError(f"embed must be one of {EMBED_MODES}, got {self.embed!r}", field="embed")


# ---- conversations -> features ----------------------------------------------------------------------------------

# Order in which a partial run embeds: every (stage, source) advances at the same pace, except just-eval-safety
# (2,811 answers, 95 % rated 5: the least information per backbone second) at a third of it, and evaluation pairs
# slightly ahead, so that a model fit on a partial store is evaluated on a balanced share of every category.
_PACE = {("stage1", "just-eval-safety"): 1 / 3, ("eval", None): 1.25}


def _conversations(item: RatedConversation | PreferencePair) -> list[list[dict]]:
    if isinstance(item, RatedConversation):
        return [[*item.prompt, {"role": "assistant", "content": item.response}]]
    return [[*item.prompt, {"role": "assistant", "content": r}] for r in (item.chosen, item.rejected)]


def _in_embedding_order(sets: TrainingSets, seed: int) -> list[RatedConversation | PreferencePair]:
    by_stream: dict[tuple[str, str], list] = {}
    for stage, items in (("stage1", sets.stage1_train + sets.stage1_val),
                         ("stage2", sets.stage2_train + sets.stage2_val), ("eval", sets.eval_pairs)):  # fmt: skip
        for item in items:
            by_stream.setdefault((stage, item.source), []).append(item)
    ranked = []
    for (stage, source), items in by_stream.items():
        pace = _PACE.get((stage, source), _PACE.get((stage, None), 1.0))
        for k, item in enumerate(round_robin(items, seed)):
            ranked.append(((k + 0.5) / len(items) / pace, item))
    ranked.sort(key=lambda kv: kv[0])
    return [item for _, item in ranked]


class _Features:
    """conversation_key -> feature-store key, for the conversations that could be encoded."""

    def __init__(self, store: FeatureStore):
        self.store = store
        self.key_of: dict[str, str] = {}
        self.encoded: dict[str, EncodedConversation] = {}

    def add(self, encoder: ChatEncoder, backbone_id: str, items: Sequence, dropped: dict[str, int]) -> None:
        for item in items:
            for messages in _conversations(item):
                ckey = conversation_key(messages[:-1], messages[-1]["content"])
                if ckey in self.key_of:
                    continue
                try:
                    e = encoder.encode(messages)
                except RewardError as exc:
                    what = f"conversation over max_tokens={encoder.max_tokens} or invalid: {type(exc).__name__}"
                    dropped[what] = dropped.get(what, 0) + 1
                    self.key_of[ckey] = ""
                    continue
                fkey = feature_key(backbone_id, e.input_ids, e.prompt_anchor)
                self.key_of[ckey] = fkey
                self.encoded.setdefault(fkey, e)

    def stored(self, prompt, response: str) -> bool:
        return self.key_of.get(conversation_key(prompt, response), "") in self.store

    def keys(self, prompts_responses) -> list[str]:
        return [self.key_of[conversation_key(p, r)] for p, r in prompts_responses]


def _features_fn(backbone: Backbone, layers: Sequence[int], token_budget: int):
    def features(encoded: Sequence[EncodedConversation]) -> tuple[torch.Tensor, torch.Tensor]:
        n, L, H = len(encoded), len(layers), backbone.hidden_size
        response, prompt = torch.empty(n, L, H), torch.empty(n, L, H)
        for batch in plan_padded_batches([e.num_tokens for e in encoded], token_budget, 64):
            hidden = backbone.hidden_at_layers([list(encoded[i].input_ids) for i in batch],
                                               [[encoded[i].prompt_anchor, encoded[i].response_anchor] for i in batch],
                                               layers)  # (b, 2, L, H)  # fmt: skip
            index = torch.tensor(batch)
            prompt[index], response[index] = hidden[:, 0], hidden[:, 1]
        return response, prompt

    return features


# ---- fitting ----------------------------------------------------------------------------------------------------


@dataclass
class _Split:
    """Pairs of one split at every stored layer: prompt, chosen, rejected (N, L, H) and the pairs themselves."""

    pairs: list[PreferencePair]
    prompt: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor

    def at(self, i: int) -> PreferencePairs:
        return PreferencePairs(prompt=self.prompt[:, i], chosen=self.chosen[:, i], rejected=self.rejected[:, i])


def _pair_split(pairs: list[PreferencePair], features: _Features) -> _Split:
    chosen = features.store.get(features.keys((p.prompt, p.chosen) for p in pairs))
    rejected = features.store.get(features.keys((p.prompt, p.rejected) for p in pairs))
    # Both conversations share the prompt, so either one's prompt-anchor state is the prompt embedding.
    return _Split(pairs, chosen.prompt, chosen.response, rejected.response)


def _labels(rows: Sequence[RatedConversation], attributes: Sequence[str]) -> torch.Tensor:
    y = torch.full((len(rows), len(attributes)), float("nan"), dtype=torch.float64)
    for i, row in enumerate(rows):
        for k, name in enumerate(attributes):
            value = row.labels.get(name)
            if value is not None:
                y[i, k] = float(value)
    return y  # (N, K)


@dataclass
class _Candidate:
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


def _out_of_fold_stage1(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                        rows: Sequence[RatedConversation], train: _Split, i: int, seed: int, attributes: Sequence[str],
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


def _preference_heads(train: _Split, val: _Split, i: int, seed: int) -> tuple[list, dict, tuple[torch.Tensor, torch.Tensor]]:
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


def _fit_candidate(config: TrainConfig, layer: int, i: int, preference: bool, stage1, stage1_oof, train: _Split,
                   val: _Split, hidden_size: int, depth: int) -> _Candidate:  # fmt: skip
    attributes = list(stage1.attributes)
    weight, bias = stage1.weight, stage1.bias
    train_rewards = stage1_oof
    report: dict[str, Any] = {"layer": layer, "preference_heads": preference, "out_of_fold_stage1": stage1_oof is not None}
    if preference:
        extra, report["preference_heads_fit"], oof = _preference_heads(train, val, i, config.seed)
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
                       "seconds": round(time.perf_counter() - t, 2), **_val_accuracy(heads, val, val_pairs)}  # fmt: skip
            tried.append((heads, summary))
        # Best category-balanced validation accuracy, then overall, then the larger lr (the first given).
        heads, chosen = max(tried, key=lambda hs: (hs[1]["val_balanced_accuracy"], hs[1]["best_val_accuracy"]))
        report["stage2"][variant] = {**chosen, "lrs_tried": [s for _, s in tried]}
        variants[variant] = heads
    chosen = report["stage2"]["after_debiasing"]
    report["val_balanced_accuracy"], report["val_categories"] = chosen["val_balanced_accuracy"], chosen["val_categories"]
    if config.length_reference:  # the candidates then compete on their calibrated validation accuracy
        heads = variants["after_debiasing"]
        offset = _calibrate_length(heads, (train, val), i, config.length_reference, attributes.index(VERBOSITY))
        calibrated = _val_accuracy(heads, val, val_pairs)
        offset["val_categories"] = calibrated["val_categories"]
        report["length_offset"] = offset
        report.update(calibrated)
    return _Candidate(layer, preference, variants["after_debiasing"], variants, report)


def _val_accuracy(heads: ArmoHeads, val: _Split, val_pairs: PreferencePairs) -> dict[str, Any]:
    """Validation accuracy per category and its category-balanced mean (what ranks gatings and candidates)."""
    categories = {c: v["accuracy"] for c, v in evaluate_pairs(pair_records(heads, val.pairs, val_pairs))["categories"].items()}
    return {"val_balanced_accuracy": sum(categories.values()) / len(categories), "val_categories": categories}


def _calibrate_length(heads: ArmoHeads, splits: Sequence[_Split], i: int, categories: Sequence[str],
                      verbosity_index: int) -> dict[str, Any]:  # fmt: skip
    """Apply the common lambda offset fit on the splits' responses of `categories` (in place); its report."""
    prompt, responses, lengths = [], [], []
    for split in splits:
        keep = [p.category in categories for p in split.pairs]
        mine = torch.tensor(keep, dtype=torch.bool)
        pairs = [p for p, kept in zip(split.pairs, keep) if kept]
        prompt += [split.prompt[mine, i], split.prompt[mine, i]]
        responses += [split.chosen[mine, i], split.rejected[mine, i]]
        lengths += [len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs]
    if len(lengths) < 3:
        raise InvalidInputError(f"length_reference {tuple(categories)} matches fewer than 2 stage-2 pairs",
                                field="length_reference")  # fmt: skip
    with torch.inference_mode():
        gating, rewards = heads.gate(torch.cat(prompt)), heads.rewards(torch.cat(responses))
    transform = heads.reward_transform_matrix
    delta, rho, rho_zero = fit_length_offset(rewards, gating, transform, verbosity_index, lengths)
    heads.reward_transform_matrix.copy_(apply_length_offset(transform, verbosity_index, delta))
    return {"delta": delta, "spearman": rho, "spearman_at_zero": rho_zero, "responses": len(lengths),
            "reference": f"stage-2 training and validation responses of {', '.join(categories)}"}  # fmt: skip


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


def run_training(config: TrainConfig) -> dict[str, Any]:
    started = time.perf_counter()
    timings: dict[str, float] = {}
    work = Path(config.work_dir)
    sets: TrainingSets = build_training_sets(config.data_dir, max_tokens_chars=config.max_chars, caps=config.caps, seed=config.seed)
    sets.write(work / "data")
    dropped: dict[str, int] = dict(sets.dropped)

    backbone = load_backbone(config.backbone)
    depth = int(backbone.model.config.num_hidden_layers)
    if max(config.layers) > depth:
        raise InvalidInputError(f"layers {config.layers} go deeper than the backbone's {depth} blocks", field="layers")
    layers = tuple(sorted(config.layers))
    # Features are keyed by the whole backbone's id: layer l's feature does not depend on where the pass stops.
    backbone_id = backbone.model_id
    truncate_backbone(backbone, max(layers))  # the blocks after the deepest candidate never matter
    encoder = ChatEncoder(backbone.tokenizer, config.max_tokens, "error")
    # One store per backbone: a stage-0 adapter changes every feature, so its features live beside the plain ones.
    store_dir = work / ("features" if not config.backbone.adapter else "features-" + hashlib.sha256(backbone_id.encode()).hexdigest()[:12])
    store = FeatureStore(store_dir, backbone_id, layers, backbone.hidden_size)
    features = _Features(store)
    ordered = _in_embedding_order(sets, config.seed)
    if not config.evaluate:  # held-out conversations are embedded only to be evaluated
        held_out = {id(p) for p in sets.eval_pairs}
        ordered = [item for item in ordered if id(item) not in held_out]
    features.add(encoder, backbone_id, ordered, dropped)
    wanted = {k: features.encoded[k] for k in features.key_of.values() if k}  # embedding order, deduplicated
    t = time.perf_counter()
    if config.embed == "all":
        extract_features(store, wanted, _features_fn(backbone, layers, config.token_budget))
    timings["embed_s"] = time.perf_counter() - t
    coverage = {"conversations_wanted": len(wanted), "conversations_stored": sum(k in store for k in wanted)}

    def usable(items, what):
        kept = [it for it in items if all(features.stored(m[:-1], m[-1]["content"]) for m in _conversations(it))]
        if len(kept) < len(items):
            reason = "not embedded yet (embed=stored)" if config.embed == "stored" else "a conversation could not be encoded"
            dropped[f"{what}: {reason}"] = dropped.get(f"{what}: {reason}", 0) + len(items) - len(kept)
        return kept

    s1_train, s1_val = usable(sets.stage1_train, "stage1 train row"), usable(sets.stage1_val, "stage1 val row")
    train = _pair_split(usable(sets.stage2_train, "stage2 train pair"), features)
    val = _pair_split(usable(sets.stage2_val, "stage2 val pair"), features)
    x_train = store.get(features.keys((r.prompt, r.response) for r in s1_train)).response  # (N, L, H)
    x_val = store.get(features.keys((r.prompt, r.response) for r in s1_val)).response
    attributes = tuple(ATTRIBUTE_NAMES)
    y_train, y_val = _labels(s1_train, attributes), _labels(s1_val, attributes)

    # ---- candidates: every layer, without and with preference heads; the best on stage-2 validation wins ----
    t = time.perf_counter()
    candidates, stage1_by_layer, skipped = [], {}, []
    for i, layer in enumerate(layers):
        stage1 = fit_stage1(x_train[:, i], y_train, x_val[:, i], y_val, attributes, fit_intercept=True)
        stage1_by_layer[layer] = stage1
        stage1_oof = _out_of_fold_stage1(x_train[:, i], y_train, x_val[:, i], y_val, s1_train, train, i, config.seed,
                                         attributes)  # fmt: skip
        for preference in config.preference_heads:
            try:
                candidate = _fit_candidate(config, layer, i, preference, stage1, stage1_oof, train, val, backbone.hidden_size,
                                           depth)  # fmt: skip
            except InvalidInputError as exc:
                if not preference:
                    raise
                skipped.append({"layer": layer, "preference_heads": True, "skipped": str(exc)})
                continue
            candidate.report["stage1_mean_val_pearson"] = _mean_pearson(stage1.metrics)
            candidates.append(candidate)
            log.info("candidate layer=%d preference=%s val=%.4f", layer, preference,
                     candidate.report["stage2"]["after_debiasing"]["best_val_accuracy"])  # fmt: skip
    best = max(candidates, key=lambda c: c.rank)
    stage1 = stage1_by_layer[best.layer]
    timings["fit_s"] = time.perf_counter() - t

    # ---- evaluation on the held-out mix (the chosen candidate; the others for the record only) ----
    evaluation: dict[str, Any] = {}
    eval_records: dict[str, list[dict[str, Any]]] = {}
    if config.evaluate and sets.eval_pairs:
        held_out = _pair_split(usable(sets.eval_pairs, "eval pair"), features)
        before = best.variants["before_debiasing"]
        eval_records["before_debiasing"] = pair_records(before, held_out.pairs, held_out.at(layers.index(best.layer)))
        evaluation["before_debiasing"] = evaluate_pairs(eval_records["before_debiasing"])
        for c in candidates:  # the chosen one's after-debiasing figures are the ones reported
            records = pair_records(c.heads, held_out.pairs, held_out.at(layers.index(c.layer)))
            result = evaluate_pairs(records)
            c.report["eval_accuracy"] = result["overall"]
            if c is best:
                eval_records["after_debiasing"], evaluation["after_debiasing"] = records, result

    heads = best.heads
    timings["total_s"] = time.perf_counter() - started
    provenance = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "rewardsvc_version": __version__,
        "backbone": backbone_id,
        "machine": f"{platform.machine()} {platform.processor()} threads={torch.get_num_threads()}",
        "recipe": {k: v for k, v in asdict(config).items() if k not in ("out_dir", "work_dir", "data_dir")},
        "data": {
            "stage1_train": len(s1_train), "stage1_val": len(s1_val), "stage2_train": len(train.pairs),
            "stage2_val": len(val.pairs), "eval_pairs": len(eval_records.get("after_debiasing", [])),
            "features": coverage, "dropped": dropped,
        },  # fmt: skip
        "metrics": {
            "chosen": {"layer": best.layer, "backbone_blocks": depth, "preference_heads": best.preference},
            "candidates": [c.report for c in candidates] + skipped,
            "stage1_validation": stage1.metrics,
            "stage1_alphas": stage1.alphas,
            "debiasing": best.report["debiasing"],
            "length_offset": best.report.get("length_offset"),
            "stage2": best.report["stage2"],
            "preference_heads": best.report.get("preference_heads_fit", {}),
            "eval": evaluation,
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    save_heads(config.out_dir, HeadsCheckpoint(heads=heads, backbone=_backbone_reference(config.backbone, config.out_dir),
                                               name=config.name, trained=True, label_scales=stage1.label_scales,
                                               provenance=provenance))  # fmt: skip
    write_model_card(config.out_dir)
    (work / "eval_records.json").write_text(json.dumps(eval_records))
    return provenance


def _mean_pearson(metrics: dict[str, dict[str, float]]) -> float | None:
    values = [m["pearson"] for m in metrics.values() if m["pearson"] == m["pearson"]]  # NaN != NaN
    return sum(values) / len(values) if values else None


def _backbone_reference(backbone: BackboneConfig, out_dir: str) -> dict[str, Any]:
    """Where serving loads the backbone from; device/dtype are the server's choice, not the checkpoint's.
    A (stage-0) adapter is copied into the checkpoint and named relative to it: the checkpoint moves as one."""
    adapter = None
    if backbone.adapter:
        shipped = Path(out_dir) / SHIPPED_ADAPTER_DIR
        if Path(backbone.adapter).resolve() != shipped.resolve():
            shutil.rmtree(shipped, ignore_errors=True)
            shutil.copytree(backbone.adapter, shipped)
        adapter = SHIPPED_ADAPTER_DIR
    return {"model": backbone.model, "gguf_file": backbone.gguf_file, "adapter": adapter}
