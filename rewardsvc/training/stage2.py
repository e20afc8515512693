"""Stage 2: train the gating network (and its scale beta) with a Bradley-Terry loss on preference pairs.

Symbols: N pairs, H hidden size, K attributes, B batch.

Only `heads.gating` learns; the regression layer and the transform stay frozen (they are not given to the
optimizer). The loss is on the DEBIASED rewards r' = r T, the ones the model scores with at inference (the
reference trained on raw rewards but served debiased ones). Both responses of a pair share the prompt, hence
the gating, so s_c - s_r = sum_k g_k (r'_c - r'_r)_k: the reward difference d (N, K) is computed once and an
epoch is only the gating MLP on the prompts.

Early stopping: after each epoch the validation set is scored; the best state is the one with the highest
validation accuracy, ties broken by the lower validation loss (accuracy on a few hundred pairs plateaus in
steps, the loss still says which is better). The untrained state is epoch 0 and a candidate too, so training
can never return something worse on validation than what it was given. Accuracy counts s_c > s_r strictly.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..errors import InvalidInputError
from ..model.heads import ArmoHeads

logger = logging.getLogger(__name__)

_EVAL_CHUNK = 8192  # rows per forward when scoring a whole split, to bound activation memory


@dataclass(frozen=True)
class PreferencePairs:
    """Precomputed embeddings of N preference pairs: the prompt (gating input) and both responses."""

    prompt: torch.Tensor  # (N, H)
    chosen: torch.Tensor  # (N, H)
    rejected: torch.Tensor  # (N, H)

    def __post_init__(self) -> None:
        shapes = {name: tuple(getattr(self, name).shape) for name in ("prompt", "chosen", "rejected")}
        if len(set(shapes.values())) != 1 or len(shapes["prompt"]) != 2 or shapes["prompt"][0] < 1:
            raise InvalidInputError(f"pair embeddings must all be (N, H) with N >= 1, got {shapes}", field="pairs")

    def __len__(self) -> int:
        return self.prompt.shape[0]


@dataclass(frozen=True)
class Stage2Config:
    """Optimisation of the gating. Defaults follow the reference (AdamW, lr 1e-3, no weight decay)."""

    lr: float = 1e-3
    """AdamW learning rate (constant; early stopping does the annealing's job of not over-fitting)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay, on the weight matrices only (biases and beta are not decayed: shrinking
    beta only rescales the score, which the Bradley-Terry loss then pushes back)."""
    batch_size: int = 256
    """Pairs per optimizer step."""
    max_epochs: int = 100
    """Most passes over the training pairs."""
    max_steps: int | None = None
    """Most optimizer steps in all; training stops (and validates) as soon as it is reached."""
    patience: int = 10
    """Epochs without a better validation state before stopping."""
    seed: int = 0
    """Seed of the shuffling (the gating's initial weights are whatever the heads hold)."""
    progress: bool = False
    """Show a tqdm bar over epochs."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise InvalidInputError(f"stage2.lr must be > 0, got {self.lr}", field="stage2.lr")
        if self.weight_decay < 0:
            raise InvalidInputError(
                f"stage2.weight_decay must be >= 0, got {self.weight_decay}", field="stage2.weight_decay"
            )
        for name in ("batch_size", "max_epochs", "patience"):
            value = getattr(self, name)
            if value < 1:
                raise InvalidInputError(f"stage2.{name} must be >= 1, got {value}", field=f"stage2.{name}")
        if self.max_steps is not None and self.max_steps < 1:
            raise InvalidInputError(f"stage2.max_steps must be >= 1, got {self.max_steps}", field="stage2.max_steps")


@dataclass(frozen=True)
class Stage2Result:
    best_val_accuracy: float
    """Validation accuracy of the restored (best) state."""
    history: tuple[dict[str, float], ...]
    """Per epoch (epoch 0 = before training): epoch, steps, train_loss, val_loss, val_accuracy."""
    steps: int
    """Optimizer steps taken in all."""
    best_epoch: int
    """Epoch whose state was restored into the heads."""


def train_gating(
    heads: ArmoHeads,
    train: PreferencePairs,
    val: PreferencePairs,
    config: Stage2Config | None = None,
    sample_weights: torch.Tensor | None = None,
    train_rewards: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Stage2Result:
    """Fit `heads.gating` in place with -log sigmoid(s_chosen - s_rejected) on r' = r T; restore the best state.

    `sample_weights` (N,), non-negative: each epoch draws N training pairs with replacement in proportion to them
    (e.g. `balanced_weights`, so that a large source does not decide the gating of every prompt); None = every
    pair once per epoch. `train_rewards` (raw rewards (N, K) of the chosen and the rejected training responses)
    replace the heads' own on the training pairs: out-of-fold rewards of heads that were fit on these very pairs.
    """
    config = config or Stage2Config()
    if sample_weights is not None:
        sample_weights = torch.as_tensor(sample_weights, dtype=torch.float64)
        if sample_weights.shape != (len(train),) or not torch.isfinite(sample_weights).all() or (sample_weights < 0).any() \
                or not sample_weights.sum() > 0:
            raise InvalidInputError(f"sample_weights must be {len(train)} finite values >= 0, not all 0", field="sample_weights")
    H = heads.config.hidden_size
    for split, pairs in (("train", train), ("val", val)):
        if pairs.prompt.shape[1] != H:
            raise InvalidInputError(
                f"{split} pairs have H={pairs.prompt.shape[1]}, the heads H={H}", field=f"{split}_pairs"
            )
    device = heads.reward_transform_matrix.device
    was_training = heads.training
    heads.eval()  # no dropout in the heads today; eval() keeps it that way if one is added

    train_prompt, train_diff = _prompts_and_differences(heads, train, device, train_rewards)  # (N, H), (N, K)
    val_prompt, val_diff = _prompts_and_differences(heads, val, device)  # (M, H), (M, K)

    optimizer = torch.optim.AdamW(_param_groups(heads, config.weight_decay), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)

    train_loss0, _ = _evaluate(heads, train_prompt, train_diff)
    val_loss, val_acc = _evaluate(heads, val_prompt, val_diff)
    history = [_row(0, 0, train_loss0, val_loss, val_acc)]
    best_key, best_epoch = (val_acc, -val_loss), 0
    best_state = copy.deepcopy(heads.gating.state_dict())

    steps, stale = 0, 0
    epochs = tqdm(range(1, config.max_epochs + 1), desc="stage 2", unit="epoch", disable=not config.progress)
    for epoch in epochs:
        if sample_weights is None:
            order = torch.randperm(len(train), generator=generator).to(device)
        else:
            order = torch.multinomial(sample_weights, len(train), replacement=True, generator=generator).to(device)
        loss_sum, seen = 0.0, 0
        for start in range(0, len(train), config.batch_size):
            if config.max_steps is not None and steps >= config.max_steps:
                break
            idx = order[start : start + config.batch_size]
            loss = _bt_loss(heads.gate(train_prompt[idx]), train_diff[idx]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            loss_sum += loss.item() * idx.numel()
            seen += idx.numel()
        if seen == 0:
            break  # max_steps was reached exactly at the end of the previous epoch
        val_loss, val_acc = _evaluate(heads, val_prompt, val_diff)
        history.append(_row(epoch, steps, loss_sum / seen, val_loss, val_acc))
        epochs.set_postfix(val_acc=f"{val_acc:.4f}", val_loss=f"{val_loss:.4f}")
        if (val_acc, -val_loss) > best_key:
            best_key, best_epoch, stale = (val_acc, -val_loss), epoch, 0
            best_state = copy.deepcopy(heads.gating.state_dict())
        else:
            stale += 1
        if not math.isfinite(loss_sum):
            # A diverged state scores accuracy 0 on NaN margins, so it is never restored; stop wasting epochs.
            logger.warning("stage 2: training loss became non-finite at epoch %d; stopping (try a lower lr)", epoch)
            break
        if stale >= config.patience or (config.max_steps is not None and steps >= config.max_steps):
            break

    heads.gating.load_state_dict(best_state)
    heads.train(was_training)
    return Stage2Result(best_val_accuracy=best_key[0], history=tuple(history), steps=steps, best_epoch=best_epoch)


def balanced_weights(groups: Sequence[tuple[str, str]]) -> torch.Tensor:
    """Sampling weights (N,) from (category, source) per pair: every category weighs the same in all, and within a
    category every source weighs the same, so 1,200 noisy pairs of one source do not drown 400 clean ones."""
    sources_of: dict[str, set[str]] = defaultdict(set)
    count = Counter(groups)
    for category, source in count:
        sources_of[category].add(source)
    return torch.tensor([1.0 / (len(sources_of) * len(sources_of[c]) * count[(c, s)]) for c, s in groups], dtype=torch.float64)


@torch.no_grad()
def standardize_gating_input(heads: ArmoHeads, prompts: torch.Tensor) -> None:
    """Fold a per-feature standardization of the prompt embeddings (N, H) into the gating's first layer.

    Hidden states have a few dimensions hundreds of times larger than the rest; an MLP fed them raw starts out
    (and, with early stopping, usually ends) nearly constant in the prompt. W' = W / sd, b' = b - W' mu gives the
    same network on standardized inputs without a new parameter, so the checkpoint format does not change.
    """
    prompts = prompts.double()
    mu, sd = prompts.mean(0), prompts.std(0).clamp_min(1e-6)  # (H,), (H,)
    first = heads.gating.layers[0]
    weight = first.weight.double() / sd  # (hidden, H)
    first.bias.copy_((first.bias.double() - weight @ mu).float())
    first.weight.copy_(weight.float())


def _prompts_and_differences(
    heads: ArmoHeads, pairs: PreferencePairs, device, rewards: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings (N, H) and debiased reward differences d = (r_c - r_r) T (N, K), frozen."""
    if rewards is not None:
        K = heads.config.num_attributes
        if tuple(rewards[0].shape) != (len(pairs), K) or tuple(rewards[1].shape) != (len(pairs), K):
            raise InvalidInputError(f"train_rewards must be two ({len(pairs)}, {K}) tensors", field="train_rewards")
        diff = (rewards[0].to(device).float() - rewards[1].to(device).float()) @ heads.reward_transform_matrix
        if not torch.isfinite(diff).all():
            raise InvalidInputError("train_rewards are not all finite", field="train_rewards")
        return pairs.prompt.to(device=device, dtype=torch.float32), diff
    with torch.no_grad():
        diffs = []
        for start in range(0, len(pairs), _EVAL_CHUNK):
            chosen = heads.rewards(pairs.chosen[start : start + _EVAL_CHUNK].to(device))  # (C, K)
            rejected = heads.rewards(pairs.rejected[start : start + _EVAL_CHUNK].to(device))  # (C, K)
            diffs.append((chosen - rejected) @ heads.reward_transform_matrix)  # (C, K)
    if not all(torch.isfinite(d).all() for d in diffs):
        raise InvalidInputError("pair embeddings give non-finite rewards", field="pairs")
    return pairs.prompt.to(device=device, dtype=torch.float32), torch.cat(diffs)


def _bt_loss(gating: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    margin = (gating * diff).sum(dim=-1)  # (B,) s_chosen - s_rejected
    return F.softplus(-margin)  # (B,) = -log sigmoid(margin), without overflow


def _evaluate(heads: ArmoHeads, prompt: torch.Tensor, diff: torch.Tensor) -> tuple[float, float]:
    """Mean Bradley-Terry loss and accuracy (s_c > s_r) over a whole split."""
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, prompt.shape[0], _EVAL_CHUNK):
            gating = heads.gate(prompt[start : start + _EVAL_CHUNK])  # (C, K)
            d = diff[start : start + _EVAL_CHUNK]  # (C, K)
            loss_sum += _bt_loss(gating, d).sum().item()
            correct += int(((gating * d).sum(dim=-1) > 0).sum().item())
    n = prompt.shape[0]
    return loss_sum / n, correct / n


def _param_groups(heads: ArmoHeads, weight_decay: float) -> list[dict]:
    matrices = [p for p in heads.gating.parameters() if p.ndim >= 2]
    others = [p for p in heads.gating.parameters() if p.ndim < 2]  # biases, logit_scale (beta)
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]


def _row(epoch: int, steps: int, train_loss: float, val_loss: float, val_accuracy: float) -> dict[str, float]:
    return {
        "epoch": epoch, "steps": steps, "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_accuracy
    }
