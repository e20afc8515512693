"""The whole ArmoRM training run on precomputed embeddings: data -> embeddings -> stage 1 -> debiasing ->
stage 2 -> heads checkpoint (+ evaluation on the held-out mix, before and after debiasing).

Embeddings are the only expensive step (one backbone pass per unique conversation, cached and resumable
in `work_dir/embeddings`); everything after it takes seconds, so re-running after a change of the heads'
hyper-parameters costs no backbone time.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..config import BackboneConfig, HeadsConfig
from ..errors import RewardError
from ..evaluation.report import evaluate_pairs
from ..model.backbone import Backbone, load_backbone
from ..model.checkpoint import HeadsCheckpoint, save_heads
from ..model.embedding import embed_encoded
from ..model.encoding import ChatEncoder, EncodedConversation
from ..model.heads import ArmoHeads
from .data.attributes import ATTRIBUTE_NAMES, VERBOSITY
from .data.build import TrainingSets, build_training_sets, conversation_key
from .data.schema import PreferencePair, RatedConversation
from .debias import fit_verbosity_penalties
from .embedding_store import EmbeddingSet, extract_embeddings
from .model_card import write_model_card
from .stage1 import fit_stage1
from .stage2 import PreferencePairs, Stage2Config, train_gating

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """One training run of the default recipe."""

    out_dir: str
    """Where the heads checkpoint (rewardsvc.json, heads.safetensors, MODEL_CARD.md) is written."""
    work_dir: str
    """Cache of the built data sets and the embedding shards (resumable)."""
    data_dir: str | None = None
    """../shared/data by default (see rewardsvc.training.data.files)."""
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    name: str = "rewardsvc-default-smollm2-135m"
    max_tokens: int = 768
    """Conversations longer than this (in tokens) are left out of training and evaluation, and counted."""
    token_budget: int = 4096
    max_chars: int = 2000
    """Training prompts/responses longer than this many characters are left out (rewardsvc.training.data.build)."""
    caps: dict[str, int | None] | None = None
    seed: int = 0
    gating_hidden_dim: int = 256
    gating_n_hidden: int = 3
    gating_temperature: float = 10.0
    debias_threshold: float = 0.03
    stage2: Stage2Config = field(default_factory=lambda: Stage2Config(lr=1e-3, weight_decay=1e-3, patience=15, max_epochs=200))
    evaluate: bool = True


@dataclass
class _Conversation:
    id: str  # conversation_key: one embedding per unique (prompt, response)
    messages: list[dict]
    encoded: EncodedConversation | None = None


def _collect(sets_rows: Sequence[RatedConversation | PreferencePair]) -> dict[str, _Conversation]:
    unique: dict[str, _Conversation] = {}
    for item in sets_rows:
        if isinstance(item, RatedConversation):
            pairs = [(item.prompt, item.response)]
        else:
            pairs = [(item.prompt, item.chosen), (item.prompt, item.rejected)]
        for prompt, response in pairs:
            key = conversation_key(prompt, response)
            unique.setdefault(key, _Conversation(key, [*prompt, {"role": "assistant", "content": response}]))
    return unique


def _encode_all(encoder: ChatEncoder, conversations: dict[str, _Conversation], dropped: dict[str, int], what: str) -> None:
    for conv in conversations.values():
        try:
            conv.encoded = encoder.encode(conv.messages, what)
        except RewardError as exc:
            reason = type(exc).__name__
            dropped[f"{what}: {reason}"] = dropped.get(f"{what}: {reason}", 0) + 1


def _embed(backbone: Backbone, conversations: dict[str, _Conversation], directory: Path, token_budget: int) -> "_Lookup":
    """Embed every encodable conversation (resumable store); embeddings by conversation key."""
    rows = sorted((c for c in conversations.values() if c.encoded is not None), key=lambda c: c.id)

    def embed_fn(chunk: Sequence[_Conversation]) -> dict[str, torch.Tensor]:
        encoded = [c.encoded for c in chunk]
        emb = embed_encoded(backbone, encoded, token_budget, max_batch_size=64)
        return {"response": emb.response, "prompt": emb.prompt,
                "num_tokens": torch.tensor([e.num_tokens for e in encoded], dtype=torch.int64)}  # fmt: skip

    return _Lookup(extract_embeddings(rows, embed_fn, directory, backbone_id=backbone.model_id, shard_size=128))


class _Lookup:
    """Embeddings by conversation key."""

    def __init__(self, store: EmbeddingSet):
        self.store = store
        self.index = {i: n for n, i in enumerate(store.ids)}

    def has(self, prompt, response) -> bool:
        return conversation_key(prompt, response) in self.index

    def rows(self, keys: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.index[k] for k in keys], dtype=torch.long)


def _labels(rows: Sequence[RatedConversation], attributes: Sequence[str]) -> torch.Tensor:
    y = torch.full((len(rows), len(attributes)), float("nan"), dtype=torch.float64)
    for i, row in enumerate(rows):
        for k, name in enumerate(attributes):
            value = row.labels.get(name)
            if value is not None:
                y[i, k] = float(value)
    return y  # (N, K)


def _pairs_tensors(pairs: Sequence[PreferencePair], lookup: _Lookup) -> PreferencePairs:
    keys_c = [conversation_key(p.prompt, p.chosen) for p in pairs]
    keys_r = [conversation_key(p.prompt, p.rejected) for p in pairs]
    rows_c, rows_r = lookup.rows(keys_c), lookup.rows(keys_r)
    # Both conversations share the prompt, so either one's prompt-anchor state is the prompt embedding.
    return PreferencePairs(prompt=lookup.store.prompt[rows_c], chosen=lookup.store.response[rows_c],
                           rejected=lookup.store.response[rows_r])  # fmt: skip


def _usable(pairs: Sequence[PreferencePair], lookup: _Lookup, dropped: dict[str, int], what: str) -> list[PreferencePair]:
    kept = [p for p in pairs if lookup.has(p.prompt, p.chosen) and lookup.has(p.prompt, p.rejected)]
    if len(kept) < len(pairs):
        dropped[f"{what}: a conversation could not be encoded"] = len(pairs) - len(kept)
    return kept


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


def _accuracy(heads: ArmoHeads, pairs: PreferencePairs) -> float:
    with torch.inference_mode():
        g = heads.gate(pairs.prompt)
        diff = heads.combine(heads.rewards(pairs.chosen), g).score - heads.combine(heads.rewards(pairs.rejected), g).score
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def run_training(config: TrainConfig) -> dict[str, Any]:
    started = time.perf_counter()
    timings: dict[str, float] = {}
    work = Path(config.work_dir)
    sets: TrainingSets = build_training_sets(config.data_dir, max_tokens_chars=config.max_chars, caps=config.caps, seed=config.seed)
    sets.write(work / "data")
    dropped: dict[str, int] = dict(sets.dropped)

    backbone = load_backbone(config.backbone)
    encoder = ChatEncoder(backbone.tokenizer, config.max_tokens, "error")
    train_convs = _collect([*sets.stage1_train, *sets.stage1_val, *sets.stage2_train, *sets.stage2_val])
    _encode_all(encoder, train_convs, dropped, f"training conversation over max_tokens={config.max_tokens} or invalid")
    t = time.perf_counter()
    lookup = _embed(backbone, train_convs, work / "embeddings" / "train", config.token_budget)
    timings["embed_train_s"] = time.perf_counter() - t

    # ---- stage 1: ridge per attribute ------------------------------------------------------------
    attributes = tuple(ATTRIBUTE_NAMES)
    s1_train = [r for r in sets.stage1_train if lookup.has(r.prompt, r.response)]
    s1_val = [r for r in sets.stage1_val if lookup.has(r.prompt, r.response)]
    x_train = lookup.store.response[lookup.rows([conversation_key(r.prompt, r.response) for r in s1_train])]
    x_val = lookup.store.response[lookup.rows([conversation_key(r.prompt, r.response) for r in s1_val])]
    stage1 = fit_stage1(x_train, _labels(s1_train, attributes), x_val, _labels(s1_val, attributes), attributes)

    # ---- stage-2 data ------------------------------------------------------------------------------
    s2_train = _usable(sets.stage2_train, lookup, dropped, "stage2 train pair")
    s2_val = _usable(sets.stage2_val, lookup, dropped, "stage2 val pair")
    train_pairs, val_pairs = _pairs_tensors(s2_train, lookup), _pairs_tensors(s2_val, lookup)

    heads_config = HeadsConfig(
        attributes=attributes, hidden_size=backbone.hidden_size, gating_hidden_dim=config.gating_hidden_dim,
        gating_n_hidden=config.gating_n_hidden, gating_temperature=config.gating_temperature,
        verbosity_attribute=VERBOSITY,
    )  # fmt: skip
    torch.manual_seed(config.seed)
    initial = ArmoHeads(heads_config)
    with torch.no_grad():
        initial.regression_layer.weight.copy_(stage1.weight)

    # ---- verbosity debiasing on the stage-2 training responses (the reference set) ---------------
    reference = torch.cat([train_pairs.chosen, train_pairs.rejected])
    with torch.inference_mode():
        reference_rewards = initial.rewards(reference)
    lambdas, transform, debias_report = fit_verbosity_penalties(
        reference_rewards, attributes.index(VERBOSITY), attributes, threshold=config.debias_threshold
    )

    # ---- stage 2: gating, before (T = I) and after debiasing (T from the penalties) -------------
    variants: dict[str, ArmoHeads] = {}
    stage2_results = {}
    for variant, T in (("before_debiasing", torch.eye(len(attributes))), ("after_debiasing", transform)):
        heads = copy.deepcopy(initial)
        heads.reward_transform_matrix.copy_(T)
        t = time.perf_counter()
        result = train_gating(heads, train_pairs, val_pairs, config.stage2)
        stage2_results[variant] = {"best_val_accuracy": result.best_val_accuracy, "best_epoch": result.best_epoch,
                                   "steps": result.steps, "seconds": round(time.perf_counter() - t, 2),
                                   "train_accuracy": _accuracy(heads, train_pairs)}  # fmt: skip
        variants[variant] = heads

    # ---- evaluation on the held-out mix ------------------------------------------------------------
    evaluation: dict[str, Any] = {}
    eval_records: dict[str, list[dict[str, Any]]] = {}
    if config.evaluate and sets.eval_pairs:
        eval_convs = _collect(sets.eval_pairs)
        _encode_all(encoder, eval_convs, dropped, f"eval conversation over max_tokens={config.max_tokens} or invalid")
        t = time.perf_counter()
        eval_lookup = _embed(backbone, eval_convs, work / "embeddings" / "eval", config.token_budget)
        timings["embed_eval_s"] = time.perf_counter() - t
        eval_pairs = _usable(sets.eval_pairs, eval_lookup, dropped, "eval pair")
        eval_tensors = _pairs_tensors(eval_pairs, eval_lookup)
        for variant, heads in variants.items():
            records = pair_records(heads, eval_pairs, eval_tensors)
            eval_records[variant] = records
            evaluation[variant] = evaluate_pairs(records)

    heads = variants["after_debiasing"]
    timings["total_s"] = time.perf_counter() - started
    provenance = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "rewardsvc_version": __version__,
        "backbone": backbone.model_id,
        "machine": f"{platform.machine()} {platform.processor()} threads={torch.get_num_threads()}",
        "recipe": {k: v for k, v in asdict(config).items() if k not in ("out_dir", "work_dir", "data_dir")},
        "data": {
            "stage1_train": len(s1_train), "stage1_val": len(s1_val), "stage2_train": len(s2_train),
            "stage2_val": len(s2_val), "eval_pairs": len(eval_records.get("after_debiasing", [])),
            "unique_training_conversations": len(lookup.store.ids), "dropped": dropped,
        },  # fmt: skip
        "metrics": {
            "stage1_validation": stage1.metrics,
            "stage1_alphas": stage1.alphas,
            "debiasing": {"lambdas": lambdas, "report": debias_report, "threshold": config.debias_threshold},
            "stage2": stage2_results,
            "eval": evaluation,
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    save_heads(config.out_dir, HeadsCheckpoint(heads=heads, backbone=_backbone_reference(config.backbone),
                                               name=config.name, trained=True, label_scales=stage1.label_scales,
                                               provenance=provenance))  # fmt: skip
    write_model_card(config.out_dir)
    (work / "eval_records.json").write_text(json.dumps(eval_records))
    return provenance


def _backbone_reference(backbone: BackboneConfig) -> dict[str, Any]:
    """Where serving loads the backbone from; device/dtype are the server's choice, not the checkpoint's."""
    return {"model": backbone.model, "gguf_file": backbone.gguf_file, "adapter": backbone.adapter}

