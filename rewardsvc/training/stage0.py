"""Stage 0: fine-tune the backbone as a Bradley-Terry reward model with a LoRA adapter (PEFT).

ArmoRM's backbone was itself a Bradley-Terry reward model before its heads were fit on it: its last-token
hidden state already separates better from worse answers. Stage 0 does the same for any backbone here:
a scalar head r(x) = w . h_L(x) + b on the hidden state h_L at the response anchor after L blocks (the layer
the ArmoRM heads will read), and LoRA adapters on the first L blocks, trained on preference pairs with
loss = -log sigmoid(r(chosen) - r(rejected)). Only the adapter ships (a few MB, inside the heads
checkpoint, merged at load); the scalar head is a training device and is dropped. Stages 1-2 are then fit on
features of the adapted backbone (the feature store keys by backbone id, which names the adapter's content).

Resumable by design, so a CPU can train over as many runs as it takes: the work directory holds the adapter,
the scalar head, the optimizer state and the step; the pair order is a fixed permutation of the seed, so
k steps then n-k more give the same weights as n steps at once.

    work_dir/stage0/
      state.json                   step, config, the loss of every step, validation accuracy at each save
      adapter/                     adapter_config.json + adapter_model.safetensors (PEFT layout)
      head.safetensors             the scalar BT head
      optimizer.pt                 AdamW state (our own file, read with weights_only=True)
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from ..config import BackboneConfig
from ..errors import InvalidInputError
from ..model.backbone import Backbone, decoder_of, truncate_backbone
from ..model.backbone_loading import backbone_source, load_tokenizer
from ..model.encoding import ChatEncoder, EncodedConversation
from .data.schema import PreferencePair

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
ADAPTER_DIR = "adapter"
HEAD_FILE = "head.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_stage0_fields(config, integer_fields: tuple[str, ...]) -> None:
    """Each of `integer_fields` an integer >= 1 and learning_rate finite and > 0 (both stage-0 configs)."""
    for name in integer_fields:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(f"stage0.{name} must be an integer >= 1, got {value!r}", field=f"stage0.{name}")
    if not (config.learning_rate > 0 and math.isfinite(config.learning_rate)):
        raise InvalidInputError(f"stage0.learning_rate must be finite and > 0, got {config.learning_rate}", field="stage0.learning_rate")


@dataclass(frozen=True)
class Stage0Config:
    """What stage 0 trains and how. Fields that change the result are checked on resume."""

    feature_layer: int
    """Blocks the heads read (the adapter covers blocks 0..feature_layer-1; later blocks never matter)."""
    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = LLAMA_LINEAR_MODULES
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    pairs_per_step: int = 4
    total_steps: int = 500
    """The schedule's length; one run may stop earlier (see train_stage0's max_steps / max_seconds)."""
    max_tokens: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        check_stage0_fields(self, ("feature_layer", "rank", "alpha", "pairs_per_step", "total_steps", "max_tokens"))


@dataclass
class Stage0State:
    step: int = 0
    config: dict = field(default_factory=dict)
    backbone_id: str = ""
    losses: list[float] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)  # {"step", "accuracy", "pairs"} at each save
    seconds: float = 0.0  # training wall time over all runs
    trained_pair_ids: list[str] = field(default_factory=list)
    """The ids of the training pairs (those that fit max_tokens): `rewardsvc train --adapter` fits stage 2 on others."""


class BTRewardModel(torch.nn.Module):
    """LoRA-adapted decoder (truncated to the feature layer) + scalar head on the response-anchor state."""

    def __init__(self, peft_model, backbone: Backbone, head: torch.nn.Linear):
        super().__init__()
        self.peft_model = peft_model  # owns the LoRA parameters; the decoder is inside it, adapted in place
        self.backbone = backbone  # padding and gathering exactly as serving does (Backbone._inputs / _gather)
        self.decoder = decoder_of(backbone.model)
        self.head = head

    def forward(self, encoded: Sequence[EncodedConversation]) -> torch.Tensor:
        """One reward per conversation, (N,), from the state at each row's response anchor (its last token)."""
        input_ids, mask, index = self.backbone.padded_inputs([list(e.input_ids) for e in encoded],
                                                       [[e.response_anchor] for e in encoded])  # fmt: skip
        hidden = self.decoder(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (N, T, H)
        return self.head(Backbone.gather_positions(hidden, index)[:, 0].float()).squeeze(-1)


def build_model(backbone: BackboneConfig, config: Stage0Config, adapter_dir: Path | None = None, blocks: range | None = None):
    """(BTRewardModel, tokenizer, backbone_id): the causal-LM class (so adapter keys match what
    `load_backbone(adapter=...)` applies), LoRA on `blocks` (default: the first feature_layer blocks; stage 0
    from a state cache adapts only the top ones), blocks after the feature layer dropped."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    if backbone.quantization or backbone.adapter:
        raise InvalidInputError("stage 0 trains from a plain backbone (no quantization, no adapter)", field="backbone")
    source, backbone_id = backbone_source(backbone)
    tokenizer = load_tokenizer(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=False)
    wrapped = Backbone(model, tokenizer, backbone_id, torch.device("cpu"), torch.float32)
    truncate_backbone(wrapped, config.feature_layer)
    model.requires_grad_(False)
    if adapter_dir is not None:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    else:
        lora = LoraConfig(
            r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, target_modules=list(config.target_modules),
            layers_to_transform=list(blocks if blocks is not None else range(config.feature_layer)), bias="none",
        )  # fmt: skip
        peft_model = get_peft_model(model, lora)
    peft_model.peft_config["default"].base_model_name_or_path = backbone_id  # provenance, not a local cache path
    head = torch.nn.Linear(int(model.config.hidden_size), 1)
    torch.nn.init.zeros_(head.weight)  # r = 0 for every answer at step 0: the loss starts at log 2
    torch.nn.init.zeros_(head.bias)
    return BTRewardModel(peft_model, wrapped, head), tokenizer, backbone_id


def encode_pairs(tokenizer, pairs: Sequence[PreferencePair], max_tokens: int) -> tuple[list, int]:
    """[(chosen, rejected) encoded] of the pairs whose both conversations fit max_tokens; and how many did not."""
    encoded, kept = encode_fitting_pairs(tokenizer, pairs, max_tokens)
    return encoded, len(pairs) - len(kept)


def encode_fitting_pairs(tokenizer, pairs: Sequence[PreferencePair], max_tokens: int) -> tuple[list, list[PreferencePair]]:
    """[(chosen, rejected) encoded] of the pairs whose both conversations fit max_tokens; and those pairs."""
    encoder = ChatEncoder(tokenizer, max_tokens, "error")
    encoded, kept = [], []
    for pair in pairs:
        try:
            encoded.append(tuple(
                encoder.encode([*pair.prompt, {"role": "assistant", "content": text}])
                for text in (pair.chosen, pair.rejected)
            ))  # fmt: skip
        except InvalidInputError:
            continue
        kept.append(pair)
    return encoded, kept


def pair_order(n_pairs: int, seed: int, total_pairs: int) -> list[int]:
    """The pair index used at each position of the schedule: epochs of fixed seeded permutations."""
    order: list[int] = []
    epoch = 0
    while len(order) < total_pairs:
        perm = list(range(n_pairs))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        order.extend(perm)
        epoch += 1
    return order[:total_pairs]


@torch.no_grad()
def pair_accuracy(model: BTRewardModel, pairs: Sequence[tuple], batch_pairs: int = 8) -> float:
    """Share of pairs whose chosen answer gets the higher reward (ties count half)."""
    model.eval()
    right = 0.0
    for start in range(0, len(pairs), batch_pairs):
        chunk = pairs[start : start + batch_pairs]
        rewards = model([c for c, _ in chunk] + [r for _, r in chunk])
        margin = rewards[: len(chunk)] - rewards[len(chunk) :]
        right += float((margin > 0).sum()) + 0.5 * float((margin == 0).sum())
    return right / max(len(pairs), 1)


def learning_rate_at(step: int, learning_rate: float, total_steps: int) -> float:
    """Linear warm-up over 5 % of the schedule, then cosine decay to 10 %: a function of the step alone, so a
    resumed run continues the very schedule of an uninterrupted one."""
    warmup = max(1, total_steps // 20)
    if step < warmup:
        return learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def read_state(directory: Path, state_type: type = Stage0State):
    """The saved state (a `state_type`) of a stage-0 directory, or None before its first save."""
    path = directory / STATE_FILE
    if not path.is_file():
        return None
    return state_type(**json.loads(path.read_text()))


def save_checkpoint(directory: Path, model: BTRewardModel, optimizer, state) -> None:
    """Write everything to a fresh directory, then swap it in: a kill leaves the old or the new, never half."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Stage 0 trains LoRA on the blocks only and never resizes the vocabulary, so the embeddings are not saved.
    # (PEFT's "auto" would look the base up by its recorded name, a provenance id such as embedded:..., that
    # is no path nor reachable hub repo, and warn on every save.)
    model.peft_model.save_pretrained(str(tmp / ADAPTER_DIR), save_embedding_layers=False)
    save_file({k: v.detach().contiguous() for k, v in model.head.state_dict().items()}, str(tmp / HEAD_FILE))
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1) + "\n")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def train_stage0(
    work_dir: str | os.PathLike,
    backbone: BackboneConfig,
    config: Stage0Config,
    train_pairs: Sequence[PreferencePair],
    val_pairs: Sequence[PreferencePair] = (),
    *,
    max_steps: int | None = None,
    max_seconds: float | None = None,
    save_every: int = 10,
) -> Stage0State:
    """Train (or continue training) the stage-0 adapter in work_dir/stage0; returns the saved state.

    A run stops at config.total_steps, after max_steps more steps, or once max_seconds have passed
    (checked between steps), whichever comes first, and saves. Resuming with a different config is an error.
    """
    directory = Path(work_dir) / "stage0"
    state = read_state(directory)
    if state is not None and state.config != json.loads(json.dumps(asdict(config))):
        raise InvalidInputError(
            f"{directory} was trained with another stage-0 config {state.config}; use a new work dir", field="stage0"
        )
    # LoRA's A matrices are drawn from torch's global generator: seed it, or the initial adapter (and so the
    # whole run) depends on whatever ran before in the process.
    torch.manual_seed(config.seed)
    model, tokenizer, backbone_id = build_model(backbone, config, directory / ADAPTER_DIR if state else None)
    if state is None:
        state = Stage0State(config=json.loads(json.dumps(asdict(config))), backbone_id=backbone_id)
    elif state.backbone_id != backbone_id:
        raise InvalidInputError(f"{directory} was trained on {state.backbone_id}, not {backbone_id}", field="backbone")
    else:
        model.head.load_state_dict(load_file(str(directory / HEAD_FILE)))
    train, trained_pairs = encode_fitting_pairs(tokenizer, train_pairs, config.max_tokens)
    skipped = len(train_pairs) - len(trained_pairs)
    val, _ = encode_pairs(tokenizer, val_pairs, config.max_tokens)
    if not train:
        raise InvalidInputError("stage 0 has no training pair that fits max_tokens", field="train_pairs")
    params, optimizer = resume_optimizer(model, config, directory)
    record_trained_pairs(directory, model, optimizer, state, trained_pairs)
    order = pair_order(len(train), config.seed, config.total_steps * config.pairs_per_step)
    torch.manual_seed(config.seed + state.step)
    stop = config.total_steps if max_steps is None else min(config.total_steps, state.step + max_steps)
    run_started = started = time.perf_counter()  # run_started bounds this run; started accumulates state.seconds
    log.info("stage0: %d train pairs (%d too long), %d val, steps %d..%d", len(train), skipped, len(val), state.step, stop)
    while state.step < stop:
        model.train()
        batch = [train[i] for i in order[state.step * config.pairs_per_step : (state.step + 1) * config.pairs_per_step]]
        loss = bradley_terry_step(model, batch, optimizer, params,
                                  learning_rate_at(state.step, config.learning_rate, config.total_steps))  # fmt: skip
        state.step += 1
        state.losses.append(round(float(loss.detach()), 6))
        out_of_time = max_seconds is not None and time.perf_counter() - run_started >= max_seconds
        if state.step % save_every == 0 or state.step == stop or out_of_time:
            state.seconds = round(state.seconds + time.perf_counter() - started, 3)
            started = time.perf_counter()
            if val:
                state.validation.append({"step": state.step, "accuracy": pair_accuracy(model, val), "pairs": len(val)})
            save_checkpoint(directory, model, optimizer, state)
            log.info("stage0: step %d loss %.4f %s", state.step, float(loss.detach()), state.validation[-1:] or "")
        if out_of_time:
            break
    return state


def record_trained_pairs(directory: Path, model: BTRewardModel, optimizer, state: Stage0State,
                         pairs: Sequence[PreferencePair]) -> None:
    """Put the training pairs' ids in the state (saved now when a state from before the record exists, so a
    finished run gains it by being run once more; resuming on other pairs is an error)."""
    ids = sorted(p.id for p in pairs)
    if state.trained_pair_ids == ids:
        return
    if state.trained_pair_ids:
        raise InvalidInputError(f"{directory} was trained on {len(state.trained_pair_ids)} other pairs; use a new work dir",
                                field="train_pairs")  # fmt: skip
    state.trained_pair_ids = ids
    if state.step:
        save_checkpoint(directory, model, optimizer, state)


def resume_optimizer(model: torch.nn.Module, config, directory: Path) -> tuple[list[torch.nn.Parameter], torch.optim.AdamW]:
    """AdamW over the model's trainable parameters (config.learning_rate, config.weight_decay), with the state a
    previous run saved in `directory` when there is one."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    if (directory / OPTIMIZER_FILE).is_file():
        optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, weights_only=True))
    return params, optimizer


def bradley_terry_step(rewards_of, batch, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                       learning_rate: float) -> torch.Tensor:  # fmt: skip
    """One optimizer step on `batch`, (chosen, rejected) pairs scored by `rewards_of` (all chosen, then all
    rejected): loss -log sigmoid(r_chosen - r_rejected), gradient norm clipped at 1. Returns the loss."""
    rewards = rewards_of([c for c, _ in batch] + [r for _, r in batch])
    loss = -torch.nn.functional.logsigmoid(rewards[: len(batch)] - rewards[len(batch) :]).mean()
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return loss


def adapter_dir(work_dir: str | os.PathLike) -> Path:
    """Where train_stage0 keeps the adapter (a PEFT directory `BackboneConfig(adapter=...)` loads)."""
    return Path(work_dir) / "stage0" / ADAPTER_DIR
