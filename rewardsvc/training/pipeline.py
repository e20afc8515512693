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

import datetime as dt
import hashlib
import json
import logging
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..config import BackboneConfig
from ..errors import InvalidInputError, RewardError
from ..evaluation.report import evaluate_pairs
from ..model.backbone import Backbone, truncate_backbone
from ..model.backbone_loading import load_backbone
from ..model.batch_plan import plan_padded_batches
from ..model.checkpoint import HeadsCheckpoint, save_heads
from ..model.encoding import ChatEncoder, EncodedConversation
from .adapted_features import CachedAdaptedFeatures
from .candidates import LENGTH_VARIANT_PREFIX, fit_candidate, out_of_fold_stage1, pair_records
from .data.attributes import ATTRIBUTE_NAMES, attributes_with_sources
from .data.build import TrainingSets, build_training_sets, conversation_key, resolve_caps, round_robin
from .data.schema import PreferencePair, RatedConversation
from .feature_store import FeatureStore, extract_features, feature_key, stored_layers
from .model_card import STAGE0_PAIRS_DROPPED, write_model_card
from .pair_split import PairSplit
from .stage0_report import stage0_summary, trained_pair_ids
from .stage1 import fit_stage1
from .train_config import TrainConfig

__all__ = ["SHIPPED_ADAPTER_DIR", "TrainConfig", "features_at_layers", "run_training"]

SHIPPED_ADAPTER_DIR = "adapter"  # where a checkpoint keeps its backbone adapter (model.scorer resolves it)

log = logging.getLogger(__name__)

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


def features_at_layers(backbone: Backbone, layers: Sequence[int], token_budget: int):
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


def _pair_split(pairs: list[PreferencePair], features: _Features) -> PairSplit:
    chosen = features.store.get(features.keys((p.prompt, p.chosen) for p in pairs))
    rejected = features.store.get(features.keys((p.prompt, p.rejected) for p in pairs))
    # Both conversations share the prompt, so either one's prompt-anchor state is the prompt embedding.
    return PairSplit(pairs, chosen.prompt, chosen.response, rejected.response)


def _labels(rows: Sequence[RatedConversation], attributes: Sequence[str]) -> torch.Tensor:
    y = torch.full((len(rows), len(attributes)), float("nan"), dtype=torch.float64)
    for i, row in enumerate(rows):
        for k, name in enumerate(attributes):
            value = row.labels.get(name)
            if value is not None:
                y[i, k] = float(value)
    return y  # (N, K)


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
    candidate_layers = tuple(sorted(config.layers))
    # Features are keyed by the whole backbone's id: layer l's feature does not depend on where the pass stops.
    backbone_id = backbone.model_id
    # One store per backbone: a stage-0 adapter changes every feature, so its features live beside the plain ones.
    store_dir = work / ("features" if not config.backbone.adapter else "features-" + hashlib.sha256(backbone_id.encode()).hexdigest()[:12])
    # A store holding more layers than the candidates (e.g. `--layers 16` on the default 8, 12, 16) is used as it is.
    stored = stored_layers(store_dir)
    layers = stored if stored and set(candidate_layers) <= set(stored) else candidate_layers
    if max(layers) > depth:
        raise InvalidInputError(f"the store's layers {layers} go deeper than the backbone's {depth} blocks", field="layers")
    truncate_backbone(backbone, max(layers))  # the blocks after the deepest stored layer never matter
    encoder = ChatEncoder(backbone.tokenizer, config.max_tokens, "error")
    store = FeatureStore(store_dir, backbone_id, layers, backbone.hidden_size)
    features = _Features(store)
    ordered = _in_embedding_order(sets, config.seed)
    if not config.evaluate:  # held-out conversations are embedded only to be evaluated
        held_out = {id(p) for p in sets.eval_pairs}
        ordered = [item for item in ordered if id(item) not in held_out]
    features.add(encoder, backbone_id, ordered, dropped)
    wanted = {k: features.encoded[k] for k in features.key_of.values() if k}  # embedding order, deduplicated
    t = time.perf_counter()
    state_cache_counts = {}
    if config.embed == "all":
        if config.state_cache:  # stage 0's cached states: only the adapted blocks run for the conversations it holds
            cached = CachedAdaptedFeatures(backbone, config.backbone, config.state_cache, config.backbone.adapter, layers)
            extract_features(store, wanted, cached)
            state_cache_counts = {"embedded_from_state_cache": cached.from_cache, "embedded_and_added_to_state_cache": cached.added_to_cache,
                                  "embedded_not_cacheable": cached.not_cacheable}  # fmt: skip
        else:
            extract_features(store, wanted, features_at_layers(backbone, layers, config.token_budget))
    timings["embed_s"] = time.perf_counter() - t
    coverage = {"conversations_wanted": len(wanted), "conversations_stored": sum(k in store for k in wanted), **state_cache_counts}

    def usable(items, what):
        kept = [it for it in items if all(features.stored(m[:-1], m[-1]["content"]) for m in _conversations(it))]
        if len(kept) < len(items):
            reason = "not embedded yet (embed=stored)" if config.embed == "stored" else "a conversation could not be encoded"
            dropped[f"{what}: {reason}"] = dropped.get(f"{what}: {reason}", 0) + len(items) - len(kept)
        return kept

    s1_train, s1_val = usable(sets.stage1_train, "stage1 train row"), usable(sets.stage1_val, "stage1 val row")
    train = _pair_split(usable(_unseen_by_stage0(config, sets.stage2_train, dropped), "stage2 train pair"), features)
    val = _pair_split(usable(sets.stage2_val, "stage2 val pair"), features)
    x_train = store.get(features.keys((r.prompt, r.response) for r in s1_train)).response  # (N, L, H)
    x_val = store.get(features.keys((r.prompt, r.response) for r in s1_val)).response
    attributes = attributes_with_sources(resolve_caps(config.caps))
    y_train, y_val = _labels(s1_train, attributes), _labels(s1_val, attributes)

    # ---- candidates: every layer, without and with preference heads; the best on stage-2 validation wins ----
    t = time.perf_counter()
    candidates, stage1_by_layer, skipped = [], {}, []
    for layer in candidate_layers:
        i = layers.index(layer)  # where the layer sits in the store
        stage1 = fit_stage1(x_train[:, i], y_train, x_val[:, i], y_val, attributes, fit_intercept=True)
        stage1_by_layer[layer] = stage1
        stage1_oof = out_of_fold_stage1(x_train[:, i], y_train, x_val[:, i], y_val, s1_train, train, i, config.seed,
                                         attributes)  # fmt: skip
        for preference in config.preference_heads:
            try:
                candidate = fit_candidate(config, layer, i, preference, stage1, stage1_oof, train, val, backbone.hidden_size,
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
        # Every length calibration of the chosen candidate, for the record (the configured one is "after_debiasing").
        evaluation["length_calibrations"] = {
            name[len(LENGTH_VARIANT_PREFIX):]: _summary(evaluate_pairs(pair_records(heads, held_out.pairs, held_out.at(layers.index(best.layer)))))
            for name, heads in best.variants.items() if name.startswith(LENGTH_VARIANT_PREFIX)
        }  # fmt: skip

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
            "attributes_left_out": [a for a in ATTRIBUTE_NAMES if a not in attributes],
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
    if config.backbone.adapter:  # how the adapter was made, while its stage-0 state is at hand (it is not shipped)
        provenance["stage0"] = stage0_summary(config.backbone.adapter)
    save_heads(config.out_dir, HeadsCheckpoint(heads=heads, backbone=_backbone_reference(config.backbone, config.out_dir),
                                               name=config.name, trained=True, label_scales=stage1.label_scales,
                                               provenance=provenance))  # fmt: skip
    write_model_card(config.out_dir)
    (work / "eval_records.json").write_text(json.dumps(eval_records))
    return provenance


def _unseen_by_stage0(config: TrainConfig, pairs: list[PreferencePair], dropped: dict[str, int]) -> list[PreferencePair]:
    """Stage 2's training pairs without those the adapter's stage 0 trained on (config.stage2_pairs)."""
    trained = trained_pair_ids(config.backbone.adapter) if config.backbone.adapter and config.stage2_pairs == "unseen-by-stage0" else None
    if not trained:
        return pairs
    kept = [p for p in pairs if p.id not in trained]
    if not kept:
        raise InvalidInputError(f"the adapter's stage 0 trained on all {len(pairs)} stage-2 training pairs: none is left for "
                                "stage 2 (train-backbone --stage0-share below 1, or --stage2-pairs all)", field="stage2_pairs")  # fmt: skip
    dropped[STAGE0_PAIRS_DROPPED] = len(pairs) - len(kept)
    return kept


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """An evaluate_pairs result without the per-subset and gating detail."""
    return {k: result[k] for k in ("overall", "categories", "verbosity_spearman", "verbosity_spearman_by_category")}


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
            # PEFT's generated README is a template card naming a local cache path: loading needs only the rest
            shutil.copytree(backbone.adapter, shipped, ignore=shutil.ignore_patterns("README.md"))
        adapter = SHIPPED_ADAPTER_DIR
    return {"model": backbone.model, "gguf_file": backbone.gguf_file, "adapter": adapter}
