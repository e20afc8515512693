"""Standard Hugging Face sequence-classification reward models: the "sequence-classification" model kind.

What TRL's RewardTrainer, OpenRLHF's train_rm and most published reward models (Skywork-Reward, GRM, ...) save:
an `*ForSequenceClassification` directory whose `score` layer maps the last hidden state to `num_labels` logits.
It loads here as a Backbone (the decoder inside the model) plus `SequenceClassificationHeads` (that score
layer), so the batcher, the padded / packed / shared-prompt plans, compare, gRPC, HTTP and the CLI serve it as
they serve ArmoRM heads.

Fidelity to transformers' own forward (`XForSequenceClassification`):
- the text is the chat template's rendering as is (no whitespace stripped), tokenized without added specials,
  the way `apply_chat_template(..., tokenize=True)` and TRL's RewardTrainer tokenize it;
- the logits are read at the last token whose id is not the config's `pad_token_id` (transformers pools that
  token, so a response ending in the pad token, e.g. pad == eos, is read one token earlier); with no pad token
  id, at the last token;
- `num_labels == 1`: the logit is the score, with no named attributes; `num_labels > 1`: the labels (named by
  `id2label`) are the attributes and the score is a fixed mix of them (`config.ScoreMix`, from the model card).
There is no gating: the weights never depend on the prompt.

Safety: safetensors only, `trust_remote_code=False`, and only architectures built into transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import BackboneConfig, ScoreMix
from ..errors import CheckpointError, InvalidInputError
from ..types import AttributeWeights
from .backbone import Backbone
from .backbone_loading import load_tokenizer, resolve_device, resolve_dtype
from .encoding import ResponseAnchor
from .heads import HeadOutput
from .steering import steer

KIND = "sequence-classification"
ARCHITECTURE_SUFFIX = "ForSequenceClassification"


def _config_json(directory: Path) -> dict[str, Any] | None:
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def is_sequence_classification_checkpoint(directory: str | Path) -> bool:
    """A config.json whose `architectures` names a *ForSequenceClassification class (and that is not the
    reference ArmoRM layout, which has `num_objectives`)."""
    raw = _config_json(Path(directory))
    if raw is None or "num_objectives" in raw:
        return False
    return any(str(a).endswith(ARCHITECTURE_SUFFIX) for a in raw.get("architectures") or ())


class SequenceClassificationHeads(nn.Module):
    """The `score` layer of a sequence-classification model (model/reward_heads.RewardHeads).

    Runs in float32 like the ArmoRM heads (transformers runs it in the model's dtype: identical in fp32)."""

    kind = KIND
    has_gating = False

    def __init__(self, labels: tuple[str, ...], weight: torch.Tensor, bias: torch.Tensor | None,
                 pad_token_id: int | None, mix: ScoreMix | None = None):  # fmt: skip
        super().__init__()
        num_labels, hidden = weight.shape
        if len(labels) != num_labels:
            raise CheckpointError(f"score layer has {num_labels} outputs but id2label names {len(labels)} labels")
        self.labels = tuple(labels)
        self.score = nn.Linear(hidden, num_labels, bias=bias is not None)
        with torch.no_grad():
            self.score.weight.copy_(weight.float())
            if bias is not None:
                self.score.bias.copy_(bias.float())
        self.pad_token_id = pad_token_id
        self.response_anchor = ResponseAnchor(strip_trailing_whitespace=False, skip_token_id=pad_token_id)
        if num_labels == 1:
            if mix is not None:
                raise InvalidInputError("score_mix: this model has a single label; its logit is the score", field="score_mix")
            self.register_buffer("mix", torch.ones(1))
            self.mix_weights: dict[str, float] | None = None
        else:
            if mix is None:
                raise CheckpointError(
                    f"the model has {num_labels} labels {list(labels)}: say which is the score (the one its model card "
                    f"defines) with --score-mix LABEL or a weighted mix --score-mix '{{\"{labels[0]}\": 1.0, ...}}'"
                )
            unknown = sorted(set(mix.as_dict()) - set(labels))
            if unknown:
                raise InvalidInputError(f"score_mix names unknown labels {unknown}; the labels are {list(labels)}", field="score_mix")
            self.mix_weights = {name: mix.as_dict().get(name, 0.0) for name in labels}  # as configured (float64)
            self.register_buffer("mix", torch.tensor([self.mix_weights[name] for name in labels]))
        self.float().eval().requires_grad_(False)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def attributes(self) -> tuple[str, ...]:
        return self.labels if self.num_labels > 1 else ()

    @property
    def hidden_size(self) -> int:
        return int(self.score.in_features)

    @property
    def feature_layer(self) -> int | None:
        return None  # the score layer reads the decoder's final output

    def logits(self, response: torch.Tensor) -> torch.Tensor:
        return self.score(response.float())  # (N, L)

    def _mix(self, n: int, weights: AttributeWeights | None) -> torch.Tensor:
        """The label weights used (n, L): the fixed mix, steered by `weights` (several labels only)."""
        mix = self.mix.expand(n, -1)
        if weights is None:
            return mix
        if self.num_labels == 1:
            raise InvalidInputError(
                "weights: this model has a single score and no attributes to steer (a sequence-classification model "
                "with one label)",
                field="weights",
            )
        return steer(mix, weights, self.attributes)

    def outputs(self, response: torch.Tensor, prompt: torch.Tensor, weights: AttributeWeights | None) -> HeadOutput:
        logits = self.logits(response)  # (N, L)
        n = logits.shape[0]
        mix = self._mix(n, weights)  # (N, L)
        score = (logits * mix).sum(dim=-1)  # (N,); L == 1: the logit itself
        none = logits.new_zeros((n, 0))
        if self.num_labels == 1:  # the score alone: no attributes to name
            return HeadOutput(rewards=none, debiased=none, gating=none, coefficients=none, score=score)
        return HeadOutput(rewards=logits, debiased=logits, gating=none, coefficients=mix, score=score)

    def weights_for(self, prompt: torch.Tensor | None, weights: AttributeWeights | None) -> tuple[torch.Tensor, torch.Tensor]:
        n = 1 if prompt is None else prompt.shape[0]
        mix = self._mix(n, weights)
        none = mix.new_zeros((n, 0))
        return none, (mix if self.num_labels > 1 else none)

    def weights_source(self, weights: AttributeWeights | None) -> str:
        return "fixed" if weights is None else weights.mode

    def describe(self) -> dict[str, Any]:
        score = "logit" if self.num_labels == 1 else {"mix": dict(self.mix_weights or {})}
        return {"model_kind": KIND, "num_labels": self.num_labels, "labels": list(self.labels), "score": score,
                "pad_token_id": self.pad_token_id}  # fmt: skip


def _check_loadable(directory: Path, raw: dict[str, Any]) -> str:
    """The architecture name, after refusing what would need remote code or pickled weights."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    architecture = next(str(a) for a in raw["architectures"] if str(a).endswith(ARCHITECTURE_SUFFIX))
    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING or MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(model_type) != architecture:
        raise CheckpointError(
            f"{directory / 'config.json'}: {architecture} (model_type {model_type!r}) is not a sequence-classification "
            f"model built into transformers; rewardsvc never runs code shipped with a model (trust_remote_code)"
        )
    if not any(directory.glob("*.safetensors")):
        raise CheckpointError(f"{directory}: no .safetensors weights (pickled .bin weights are refused)")
    return architecture


def _labels(config) -> tuple[str, ...]:
    id2label = getattr(config, "id2label", None) or {}
    return tuple(str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(int(config.num_labels)))


def load_sequence_classification(
    directory: Path, name: str, backbone: BackboneConfig | None = None, score_mix: ScoreMix | None = None
) -> tuple[Backbone, SequenceClassificationHeads, dict[str, Any]]:
    """(the decoder as a Backbone, the score layer as heads, provenance) of a sequence-classification directory.
    `name`: what the user named (a hub id or the directory), for the model id. `backbone` may set the device and
    dtype; the weights always come from `directory`."""
    from transformers import AutoModelForSequenceClassification

    raw = _config_json(directory) or {}
    architecture = _check_loadable(directory, raw)
    backbone = backbone or BackboneConfig(model=str(directory))
    if backbone.model != str(directory) or backbone.quantization or backbone.adapter or backbone.device_map:
        raise CheckpointError(
            f"{directory} is a sequence-classification model: its backbone is its own (--backbone, --adapter, "
            f"--quantization and --device-map apply to ArmoRM heads only; --device and --dtype work)"
        )
    device = resolve_device(backbone.device)
    dtype = resolve_dtype(backbone.dtype, device)
    tokenizer = load_tokenizer(str(directory))
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(directory), dtype=dtype, trust_remote_code=False, use_safetensors=True
        )
    except Exception as exc:  # transformers raises many types here; name the directory
        raise CheckpointError(f"cannot load the sequence-classification model {directory}: {exc}") from exc
    decoder = getattr(model, model.base_model_prefix, None)
    score = getattr(model, "score", None)
    if decoder is None or not isinstance(score, nn.Linear):
        raise CheckpointError(f"{directory}: {architecture} has no decoder `{model.base_model_prefix}` and linear `score` layer")
    text_config = model.config.get_text_config()
    heads = SequenceClassificationHeads(
        _labels(model.config), score.weight.detach(), None if score.bias is None else score.bias.detach(),
        text_config.pad_token_id, score_mix,
    )  # fmt: skip
    decoder.to(device).eval().requires_grad_(False)
    model_id = f"seqcls:{name}"
    loaded = Backbone(model=decoder, tokenizer=tokenizer, model_id=model_id, device=device, dtype=dtype)
    provenance = {**heads.describe(), "architecture": architecture, "source": name}
    return loaded, heads, provenance
