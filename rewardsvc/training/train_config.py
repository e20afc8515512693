"""TrainConfig: one training run of the default recipe (frozen, validated; `rewardsvc train` flags map onto it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import BackboneConfig
from ..errors import InvalidInputError
from .stage2 import Stage2Config

EMBED_MODES = ("all", "stored")
STAGE2_PAIRS = ("unseen-by-stage0", "all")
LENGTH_CALIBRATIONS = ("pairwise", "balanced-spearman", "per-category", "chat-spearman", "none")


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
    length_calibration: str = "chat-spearman"
    """How the common offset on the verbosity penalties is chosen after stage 2 (training.length_calibration):
    "pairwise" (Bradley-Terry on the training pairs with the length penalty as a regressor), "balanced-spearman"
    (smallest worst |Spearman(score, length)| over the categories of the training responses), "per-category" (one
    offset per category, spread over the lambdas by the categories' gating), "chat-spearman"
    (Spearman ~0 on the chat responses of training and validation: how the shipped default was made) or "none".
    Every one of them is also fit on the chosen candidate and recorded in the provenance with its validation and
    held-out figures; docs/TRAINING.md has the measurements."""
    stage2: Stage2Config = field(default_factory=lambda: Stage2Config(lr=1e-3, weight_decay=1e-3, patience=30, max_epochs=300))
    stage2_lrs: tuple[float, ...] = (1e-3, 3e-4, 1e-4)
    """Stage-2 learning rates tried (each replaces `stage2.lr`); the gating best on category-balanced validation
    accuracy is kept. On the full data, lr 1e-3 early-stopped at epoch 11 with a gating nearly constant in the
    prompt (`appropriate` ~1.07 everywhere); 3e-4 was better on validation and follows the prompt (docs/TRAINING.md)."""
    evaluate: bool = True
    stage2_pairs: str = "unseen-by-stage0"
    """With a stage-0 adapter: "unseen-by-stage0" leaves the pairs its stage 0 trained on (recorded in its state)
    out of stage 2's training pairs (the preference heads, the gating and the length calibration); "all" keeps them.
    The adapter memorises its pairs, so heads fit on them would learn separations that do not generalise; the
    measured effect on validation was small either way (training.stage0_pairs, docs/TRAINING.md)."""
    state_cache: str | None = None
    """With a stage-0 adapter: the state cache of its `train-backbone` run. Conversations it holds are embedded by
    running only the adapted blocks from their cached states; the others run the blocks below the adapter once and
    are added to it, so the next refit finds them (training.adapted_features). The features agree with the full
    forward to the cache's float16 precision."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if not self.layers or any(x < 1 for x in self.layers) or len(set(self.layers)) != len(self.layers):
            raise InvalidInputError(f"layers must be distinct integers >= 1, got {self.layers}", field="layers")
        if not self.preference_heads:
            raise InvalidInputError("preference_heads must hold at least one of False / True", field="preference_heads")
        object.__setattr__(self, "stage2_lrs", tuple(float(x) for x in self.stage2_lrs))
        if not self.stage2_lrs or not all(x > 0 for x in self.stage2_lrs):
            raise InvalidInputError(f"stage2_lrs must be learning rates > 0, got {self.stage2_lrs}", field="stage2_lrs")
        if self.length_calibration not in LENGTH_CALIBRATIONS:
            raise InvalidInputError(f"length_calibration must be one of {LENGTH_CALIBRATIONS}, got {self.length_calibration!r}",
                                    field="length_calibration")  # fmt: skip
        if self.stage2_pairs not in STAGE2_PAIRS:
            raise InvalidInputError(f"stage2_pairs must be one of {STAGE2_PAIRS}, got {self.stage2_pairs!r}", field="stage2_pairs")
        if self.state_cache and not self.backbone.adapter:
            raise InvalidInputError("state_cache needs a stage-0 adapter: the plain backbone's features come from its own pass",
                                    field="state_cache")  # fmt: skip
        if self.embed not in EMBED_MODES:
            raise InvalidInputError(f"embed must be one of {EMBED_MODES}, got {self.embed!r}", field="embed")
