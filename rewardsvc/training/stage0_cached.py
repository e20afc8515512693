"""Stage 0 that fits a CPU: LoRA on the top k blocks below the feature layer, trained from a state cache.

Full stage 0 (stage0.py) adapts all L blocks below the feature layer, so each step runs L blocks forward and
backward: about a day of a 2-core CPU per try. Here only blocks L-k..L-1 (0-based; "blocks L-k+1..L" counting
from 1) carry LoRA. The L-k blocks under them are frozen, so each training conversation's residual stream after
L-k blocks is computed once (state_cache.py) and every epoch runs the k trained blocks from it: an epoch costs
about k/L of a full forward and backward.

Why LoRA and not a full fine-tune of the k blocks: the output must be what `rewardsvc train --adapter` consumes,
and a PEFT adapter restricted to those blocks (`layers_to_transform`) is exactly that, unchanged (merged at
load, shipped inside the heads checkpoint; the lower blocks' keys are simply absent). A full fine-tune of k of
SmolLM2's blocks is ~3.5 M parameters a block against ~2-3 thousand training pairs, would need a new shipping
format, and its backward computes every weight gradient (LoRA's computes small ones).

Same guarantees as stage0.py: a seeded pair order (epochs of fixed permutations), a learning rate that is a
function of the step, atomic checkpoints; k steps then n-k more give the weights of n steps at once. The
training pairs' token ids are hashed into the state, so a resume on other pairs is an error, not a silent mix.

Before training, a logistic-regression probe is fit on the frozen block-L anchor states of the same pairs (C
on validation, as the preference heads choose it): the stage-0 head's validation accuracy is compared with it
before anyone re-embeds the data with the adapted backbone.

    work_dir/stage0-top<k>/      the layout of stage0.py (state.json, adapter/, head.safetensors, optimizer.pt)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file

from ..config import BackboneConfig
from ..errors import CheckpointError, InvalidInputError
from .data.schema import PreferencePair
from .preference_heads import fit_preference_head
from .stage0 import (
    ADAPTER_DIR,
    HEAD_FILE,
    LLAMA_LINEAR_MODULES,
    BTRewardModel,
    Stage0Config,
    Stage0State,
    bradley_terry_step,
    build_model,
    check_stage0_fields,
    encode_fitting_pairs,
    encode_pairs,
    learning_rate_at,
    pair_order,
    read_state,
    record_trained_pairs,
    resume_optimizer,
    save_checkpoint,
)
from .state_cache import StateCache, cache_states, state_key
from .top_blocks import check_decoder, forward_blocks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedStage0Config:
    """What stage 0 from a cache trains and how. Fields that change the result are checked on resume."""

    feature_layer: int
    """L: blocks the heads read."""
    top_blocks: int
    """k: LoRA covers blocks L-k..L-1 (0-based); the cache holds the states after L-k blocks."""
    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = LLAMA_LINEAR_MODULES
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    pairs_per_step: int = 4
    epochs: int = 3
    """The schedule's length in passes over the training pairs; one run may stop earlier."""
    max_tokens: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        check_stage0_fields(self, ("feature_layer", "rank", "alpha", "pairs_per_step", "epochs", "max_tokens"))
        k = self.top_blocks
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.feature_layer:
            raise InvalidInputError(
                f"--top-blocks must be an integer in 1..{self.feature_layer} (the feature layer --layer {self.feature_layer}), got {k!r}",
                field="top_blocks",
            )  # fmt: skip

    @property
    def cache_block(self) -> int:
        """Blocks below the trained ones: the cache holds the residual stream after this many."""
        return self.feature_layer - self.top_blocks

    @property
    def trained_blocks(self) -> range:
        return range(self.cache_block, self.feature_layer)

    def as_stage0(self) -> Stage0Config:
        """The fields build_model reads (the LoRA shape), as stage0.py's config."""
        return Stage0Config(feature_layer=self.feature_layer, rank=self.rank, alpha=self.alpha, target_modules=self.target_modules,
                            learning_rate=self.learning_rate, weight_decay=self.weight_decay, pairs_per_step=self.pairs_per_step,
                            max_tokens=self.max_tokens, seed=self.seed)  # fmt: skip


@dataclass
class CachedStage0State(Stage0State):
    total_steps: int = 0
    train_pairs: int = 0
    train_pairs_sha256: str = ""
    frozen_probe: dict = field(default_factory=dict)
    """{"val_accuracy", "train_accuracy", "C", "train_pairs", "val_pairs", "seconds"}: logistic probe on frozen block-L states."""
    adapted_probe: dict = field(default_factory=dict)
    """The same probe refit on the adapted block-L states, once the schedule is done."""


def stage0_dir(work_dir: str | os.PathLike, top_blocks: int) -> Path:
    """Where stage 0 from a cache keeps one k's run (several k coexist in one work dir)."""
    return Path(work_dir) / f"stage0-top{top_blocks}"


def cached_adapter_dir(work_dir: str | os.PathLike, top_blocks: int) -> Path:
    """The PEFT adapter `rewardsvc train --adapter` takes."""
    return stage0_dir(work_dir, top_blocks) / ADAPTER_DIR


def pairs_digest(encoded: Sequence[tuple]) -> str:
    digest = hashlib.sha256()
    for chosen, rejected in encoded:
        digest.update(json.dumps([list(chosen.input_ids), list(rejected.input_ids)], separators=(",", ":")).encode())
    return digest.hexdigest()


def fill_cache(
    cache_dir: str | os.PathLike,
    backbone: BackboneConfig,
    pairs: Sequence[PreferencePair],
    blocks: Sequence[int],
    max_tokens: int,
    *,
    max_seconds: float | None = None,
    dtype: str | None = None,
    progress=None,
    bar: bool = False,
) -> dict:
    """Cache the states after each of `blocks` blocks of every conversation of `pairs` that fits max_tokens
    (one backbone pass, stopping after the largest block). Resumable; returns cache_states' summary plus
    {"conversations", "cached_before"}. `progress` and `bar`: as cache_states."""
    from ..model.backbone_loading import load_backbone

    if backbone.quantization or backbone.adapter:
        raise InvalidInputError("the state cache is of the plain backbone (no quantization, no adapter)", field="backbone")
    loaded = load_backbone(BackboneConfig(model=backbone.model, device="cpu", dtype="float32"))
    encoded, _ = encode_pairs(loaded.tokenizer, pairs, max_tokens)
    conversations = {}
    for pair in encoded:  # chosen and rejected of a pair next to each other: a partial pass caches whole pairs
        for e in pair:
            conversations.setdefault(tuple(e.input_ids), e.input_ids)
    cache = StateCache(cache_dir, loaded.model_id, loaded.hidden_size, dtype)
    before = len(cache)
    # Parts of 8k tokens (~10 MB per block): on a loaded 2-core CPU that is a save every few minutes.
    summary = cache_states(cache, loaded, conversations, blocks, chunk_tokens=8192, max_seconds=max_seconds, progress=progress, bar=bar)
    return {**summary, "conversations": len(conversations), "cached_before": before}


class CachedRewards:
    """Rewards of encoded conversations from their cached states: the top k blocks, the norm, the head."""

    def __init__(self, model: BTRewardModel, cache: StateCache, config: CachedStage0Config, backbone_id: str):
        self.model, self.cache, self.config, self.backbone_id = model, cache, config, backbone_id
        check_decoder(model.decoder)

    def key(self, encoded) -> str:
        return state_key(self.backbone_id, encoded.input_ids, self.config.cache_block)

    def require(self, encoded: Sequence) -> None:
        absent = sum(self.key(e) not in self.cache for e in encoded)
        if absent:
            raise CheckpointError(
                f"{absent} of {len(encoded)} conversations have no cached states after block {self.config.cache_block} "
                f"in {self.cache.directory}; run the caching pass (train-backbone --top-blocks caches first)"
            )

    def anchor_states(self, encoded: Sequence) -> torch.Tensor:
        """(N, H) final-norm block-L states at each conversation's response anchor."""
        rows = []
        for e in encoded:
            hidden = self.cache.get(self.key(e)).unsqueeze(0)  # (1, T, H): one unpadded sequence
            top = forward_blocks(self.model.decoder, hidden, self.config.cache_block, self.config.feature_layer)
            rows.append(top[0, e.response_anchor])
        return torch.stack(rows).float()

    def __call__(self, encoded: Sequence) -> torch.Tensor:
        return self.model.head(self.anchor_states(encoded)).squeeze(-1)


@torch.no_grad()
def cached_pair_accuracy(rewards: CachedRewards, pairs: Sequence[tuple]) -> float:
    """Share of pairs whose chosen answer gets the higher stage-0 reward (ties count half)."""
    rewards.model.eval()
    right = 0.0
    for chosen, rejected in pairs:
        r = rewards([chosen, rejected])
        right += 1.0 if r[0] > r[1] else 0.5 if r[0] == r[1] else 0.0
    return right / max(len(pairs), 1)


@torch.no_grad()
def probe(rewards: CachedRewards, train: Sequence[tuple], val: Sequence[tuple], frozen: bool) -> dict:
    """Logistic Bradley-Terry probe (preference_heads.fit_preference_head, C on validation) on the block-L anchor
    states of the pairs: frozen (adapter off) or adapted."""
    started = time.perf_counter()
    rewards.model.eval()

    def states(pairs):
        flat = rewards.anchor_states([e for pair in pairs for e in pair])
        return flat[0::2], flat[1::2]

    with rewards.model.peft_model.disable_adapter() if frozen else contextlib.nullcontext():
        tc, tr = states(train)
        vc, vr = states(val)
    head = fit_preference_head(tc, tr, vc, vr)
    return {"val_accuracy": round(head.val_accuracy, 6), "train_accuracy": round(head.train_accuracy, 6), "C": head.C,
            "train_pairs": len(train), "val_pairs": len(val), "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip


def train_stage0_cached(
    work_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    backbone: BackboneConfig,
    config: CachedStage0Config,
    train_pairs: Sequence[PreferencePair],
    val_pairs: Sequence[PreferencePair] = (),
    *,
    max_steps: int | None = None,
    max_seconds: float | None = None,
    save_every: int = 50,
    probes: bool = True,
) -> CachedStage0State:
    """Train (or continue) stage 0 on the top `config.top_blocks` blocks from the cache in `cache_dir`, which
    must hold every training and validation conversation (fill_cache). Returns the saved state.

    A run stops at the end of the schedule (epochs x pairs / pairs_per_step steps), after max_steps more steps,
    or once max_seconds have passed (checked between steps), whichever comes first, and saves. With `probes`,
    the frozen-feature probe is fit before the first step (with validation pairs) and the adapted one at the end.
    """
    directory = stage0_dir(work_dir, config.top_blocks)
    state = read_state(directory, CachedStage0State)
    wanted = json.loads(json.dumps(asdict(config)))
    if state is not None and state.config != wanted:
        raise InvalidInputError(f"{directory} was trained with another stage-0 config {state.config}; use a new work dir", field="stage0")
    # LoRA's A matrices are drawn from torch's global generator: seed it, or the initial adapter (and so the
    # whole run) depends on whatever ran before in the process.
    torch.manual_seed(config.seed)
    model, tokenizer, backbone_id = build_model(
        backbone, config.as_stage0(), directory / ADAPTER_DIR if state else None, blocks=config.trained_blocks
    )  # fmt: skip
    train, trained_pairs = encode_fitting_pairs(tokenizer, train_pairs, config.max_tokens)
    skipped = len(train_pairs) - len(trained_pairs)
    val, _ = encode_pairs(tokenizer, val_pairs, config.max_tokens)
    if not train:
        raise InvalidInputError("stage 0 has no training pair that fits max_tokens", field="train_pairs")
    digest = pairs_digest(train)
    total_steps = math.ceil(config.epochs * len(train) / config.pairs_per_step)
    if state is None:
        state = CachedStage0State(config=wanted, backbone_id=backbone_id, total_steps=total_steps, train_pairs=len(train), train_pairs_sha256=digest)
    else:
        if state.backbone_id != backbone_id:
            raise InvalidInputError(f"{directory} was trained on {state.backbone_id}, not {backbone_id}", field="backbone")
        if state.train_pairs_sha256 != digest:
            raise InvalidInputError(
                f"{directory} was trained on other pairs ({state.train_pairs} pairs, sha256 {state.train_pairs_sha256[:12]}); "
                f"these are {len(train)} (sha256 {digest[:12]}): use a new work dir", field="train_pairs",
            )  # fmt: skip
        model.head.load_state_dict(load_file(str(directory / HEAD_FILE)))
    cache = StateCache(cache_dir, backbone_id, int(model.backbone.hidden_size))
    rewards = CachedRewards(model, cache, config, backbone_id)
    rewards.require([e for pair in [*train, *val] for e in pair])
    params, optimizer = resume_optimizer(model, config, directory)
    record_trained_pairs(directory, model, optimizer, state, trained_pairs)
    if probes and val and not state.frozen_probe:
        state.frozen_probe = probe(rewards, train, val, frozen=True)
        log.info("stage0: frozen block-%d probe %s", config.feature_layer, state.frozen_probe)
    order = pair_order(len(train), config.seed, total_steps * config.pairs_per_step)
    torch.manual_seed(config.seed + state.step)
    stop = total_steps if max_steps is None else min(total_steps, state.step + max_steps)
    run_started = started = time.perf_counter()
    log.info("stage0 top %d: %d train pairs (%d too long), %d val, steps %d..%d of %d",
             config.top_blocks, len(train), skipped, len(val), state.step, stop, total_steps)  # fmt: skip
    while state.step < stop:
        model.train()
        batch = [train[i] for i in order[state.step * config.pairs_per_step : (state.step + 1) * config.pairs_per_step]]
        loss = bradley_terry_step(rewards, batch, optimizer, params, learning_rate_at(state.step, config.learning_rate, total_steps))
        state.step += 1
        state.losses.append(round(float(loss.detach()), 6))
        out_of_time = max_seconds is not None and time.perf_counter() - run_started >= max_seconds
        if state.step % save_every == 0 or state.step == stop or out_of_time:
            state.seconds = round(state.seconds + time.perf_counter() - started, 3)
            if val:
                state.validation.append({"step": state.step, "accuracy": cached_pair_accuracy(rewards, val), "pairs": len(val),
                                         "train_seconds": state.seconds})  # fmt: skip
            if probes and val and state.step == total_steps and not state.adapted_probe:
                state.adapted_probe = probe(rewards, train, val, frozen=False)
            save_checkpoint(directory, model, optimizer, state)
            started = time.perf_counter()
            log.info("stage0 top %d: step %d loss %.4f %s", config.top_blocks, state.step, float(loss.detach()), state.validation[-1:] or "")
        if out_of_time:
            break
    return state
