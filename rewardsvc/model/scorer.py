"""Pure scoring: conversations -> ScoreResult (rewardsvc.types). No I/O beyond loading, no protobuf.

Not thread-safe: one thread (the server's batcher, or the CLI) owns a Scorer.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import tracing
from ..config import BackboneConfig, ScoreMix, ScorerConfig
from ..errors import CheckpointError
from ..normalization import Calibration
from ..types import AttributeWeights, InspectResult, ScoreResult
from .backbone import Backbone, truncate_backbone
from .backbone_loading import load_backbone, load_tokenizer, resolve_device, resolve_dtype
from .calibration import calibration_summary, load_calibration
from .checkpoint import is_heads_checkpoint, is_reference_checkpoint, load_heads, load_reference, load_reference_heads
from .conversation import as_prompt, validate_conversation, validate_prompt, with_response
from .embedding import Embeddings, embed_encoded
from .encoding import ChatEncoder, EncodedConversation
from .hub import looks_like_hub_id, resolve_model_path
from .plan_measurement import resolve_auto_plan
from .precision import apply_precision, precision_name
from .reward_heads import RewardHeads
from .seqcls import is_sequence_classification_checkpoint, load_sequence_classification

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "default_model"


class Scorer:
    """A backbone and the heads of one model kind (model/reward_heads.RewardHeads: ArmoRM heads or a
    sequence-classification score layer)."""

    def __init__(
        self,
        backbone: Backbone,
        heads: RewardHeads,
        *,
        model_id: str,
        config: ScorerConfig = ScorerConfig(),
        trained: bool = True,
        label_scales: dict[str, Any] | None = None,
        provenance: dict[str, Any] | None = None,
    ):
        if heads.hidden_size != backbone.hidden_size:
            raise CheckpointError(
                f"heads expect hidden size {heads.hidden_size}, backbone {backbone.model_id} has {backbone.hidden_size}"
            )
        feature_layer = heads.feature_layer
        if feature_layer is not None and feature_layer != backbone.depth:
            raise CheckpointError(
                f"heads expect features after {feature_layer} backbone blocks, backbone {backbone.model_id} runs "
                f"{backbone.depth} (Scorer.load truncates the backbone to the heads' feature_layer)"
            )
        self.backbone = backbone
        self.heads = heads.eval()
        self.config = config
        self.trained = trained
        self.model_id = model_id if trained else f"{model_id}+UNTRAINED"
        self.label_scales = label_scales or {}
        self.provenance = provenance or {}
        self.encoder = ChatEncoder(backbone.tokenizer, config.max_tokens, config.truncation, heads.response_anchor)
        # Normalization statistics stored with the model (model/calibration.py); None until attach_calibration.
        self.calibration: Calibration | None = None
        self.calibration_note = "no calibration loaded"
        # The plan `auto` settled on at load (model/scoring_plan.PlanDecision); None off CPU or before load ends.
        self.plan_decision = None

    # ---- loading -----------------------------------------------------------------------------------

    @classmethod
    def load(
        cls, model: str | Path | None = None, *, backbone: BackboneConfig | None = None, config: ScorerConfig = ScorerConfig(),
        score_mix: ScoreMix | None = None, shared_backbones: dict | None = None,
    ) -> "Scorer":
        """Load a model (see _load_model for what `model` may be) and settle its scoring plan: `--dtype mixed`
        converts the (truncated) backbone, and what the flags leave `auto` on a CPU is chosen by a short
        measurement, cached on disk (model/plan_measurement.py); `plan_decision` records the choice."""
        scorer = cls._load_model(model, backbone=backbone, config=config, score_mix=score_mix, shared_backbones=shared_backbones)
        requested_dtype = backbone.dtype if backbone is not None else "auto"
        if requested_dtype == "mixed":
            apply_precision(scorer.backbone, "mixed")
        return resolve_auto_plan(scorer, requested_dtype)

    @classmethod
    def _load_model(
        cls, model: str | Path | None = None, *, backbone: BackboneConfig | None = None, config: ScorerConfig = ScorerConfig(),
        score_mix: ScoreMix | None = None, shared_backbones: dict | None = None,
    ) -> "Scorer":
        """model: None (the packaged default heads on the embedded backbone), a directory in our heads format, in
        the reference ArmoRM format, or a standard Hugging Face *ForSequenceClassification model (model/seqcls.py),
        or the hub id of any of them (resolved in the local HF cache). `backbone` overrides where/how the backbone
        loads (a sequence-classification model: device and dtype only). `score_mix`: the score of a
        sequence-classification model with several labels.

        shared_backbones: a dict the caller keeps across loads; heads-format checkpoints whose backbone (config
        and feature layer) is already in it reuse that loaded Backbone instead of loading another copy, so
        several head sets serve from one backbone (and one forward per batch, serving/models.py)."""
        directory = resolve_model_path(model, "--model") if model is not None else DEFAULT_MODEL_DIR  # dir or hub id
        if not directory.exists():
            raise CheckpointError(f"model directory {directory} does not exist")
        if score_mix is not None and not is_sequence_classification_checkpoint(directory):
            raise CheckpointError(f"--score-mix applies to sequence-classification models; {directory} is not one")
        if is_heads_checkpoint(directory):
            ckpt = load_heads(directory)
            backbone_config = backbone or BackboneConfig(**_shipped_adapter_resolved(ckpt.backbone, directory))
            key = (backbone_config, ckpt.heads.config.feature_layer)
            loaded = shared_backbones.get(key) if shared_backbones is not None else None
            if loaded is None:
                loaded = load_backbone(backbone_config)
                _apply_feature_layer(loaded, ckpt.heads.config.feature_layer, directory)
                if shared_backbones is not None:
                    shared_backbones[key] = loaded
            return cls(
                loaded, ckpt.heads, model_id=ckpt.name, config=config, trained=ckpt.trained,
                label_scales=ckpt.label_scales, provenance=ckpt.provenance,
            ).attach_calibration(directory)  # fmt: skip
        if is_reference_checkpoint(directory):
            backbone_config = backbone or BackboneConfig(model=str(directory))
            if backbone_config.quantization or backbone_config.adapter or backbone_config.model != str(directory):
                # The backbone part loads like a heads-format checkpoint's backbone (bitsandbytes, PEFT, another
                # backbone); the heads come from the checkpoint, checked as strictly as the direct path.
                heads, raw = load_reference_heads(directory)
                loaded = load_backbone(backbone_config)
                model_id = f"reference:{raw.get('_name_or_path') or directory.name}"
                own = backbone_config.model == str(directory)
                suffix = loaded.model_id[len(str(directory)) :] if own else f"+backbone:{loaded.model_id}"  # +8bit, +adapter:..
                return cls(loaded, heads, model_id=model_id + suffix, config=config, trained=True).attach_calibration(directory)
            device = resolve_device(backbone_config.device)
            dtype = resolve_dtype(backbone_config.dtype, device)
            hf_model, heads, raw = load_reference(directory, device, dtype)
            tokenizer = load_tokenizer(str(directory))
            model_id = f"reference:{raw.get('_name_or_path') or directory.name}"
            loaded = Backbone(model=hf_model, tokenizer=tokenizer, model_id=model_id, device=device, dtype=dtype)
            return cls(loaded, heads, model_id=model_id, config=config, trained=True).attach_calibration(directory)
        if is_sequence_classification_checkpoint(directory):
            name = str(model) if looks_like_hub_id(str(model)) else directory.name
            loaded, heads, provenance = load_sequence_classification(directory, name, backbone, score_mix)
            return cls(
                loaded, heads, model_id=loaded.model_id, config=config, trained=True, provenance=provenance
            ).attach_calibration(directory)
        raise CheckpointError(
            f"{directory} is neither a rewardsvc heads checkpoint (rewardsvc.json), a reference ArmoRM checkpoint "
            f"(config.json with num_objectives) nor a sequence-classification model (config.json architectures "
            f"*ForSequenceClassification)"
        )

    def attach_calibration(self, directory: str | Path) -> "Scorer":
        """Use the calibration stored in `directory` if it was measured on this very model (see
        model/calibration.py); otherwise keep none and remember why (a normalization request says it)."""
        self.calibration, self.calibration_note = load_calibration(directory, self)
        if self.calibration is None:
            log.info("normalization unavailable: %s", self.calibration_note)
        return self

    @property
    def attributes(self) -> tuple[str, ...]:
        return self.heads.attributes

    def weights_source(self, weights: AttributeWeights | None) -> str:
        """What results computed with `weights` report as their weights_source ("fixed" without gating)."""
        return self.heads.weights_source(weights)

    # ---- encoding ----------------------------------------------------------------------------------

    def encode(self, messages: Any, field: str = "messages") -> EncodedConversation:
        """Validate, template and tokenize one conversation (last message = the response to score)."""
        return self.encoder.encode(validate_conversation(messages, field), field)

    def encode_prompt(self, messages: Any, field: str = "prompt") -> EncodedConversation:
        return self.encoder.encode_prompt(validate_prompt(messages, field), field)

    def encode_group(self, prompt: Any, responses: Sequence[Any]) -> list[EncodedConversation]:
        """N responses to one prompt (GRPO / RLOO groups): the prompt is validated once, each response appended
        to it and encoded; an error names `prompt` or `responses[i]`."""
        prompt_messages = validate_prompt(prompt, "prompt")
        return [self.encoder.encode(with_response(prompt_messages, r, f"responses[{i}]"), f"responses[{i}]")
                for i, r in enumerate(responses)]  # fmt: skip

    def encode_pairs(self, pairs: Sequence[tuple[Any, Any, Any]]) -> list[EncodedConversation]:
        """(prompt, chosen, rejected) triples -> 2N encoded conversations, each pair's chosen then rejected; an
        error names `pairs[i].prompt`, `pairs[i].chosen` or `pairs[i].rejected`."""
        encoded = []
        for i, (prompt, chosen, rejected) in enumerate(pairs):
            prompt_messages = as_prompt(prompt, f"pairs[{i}].prompt")
            for name, response in (("chosen", chosen), ("rejected", rejected)):
                field = f"pairs[{i}].{name}"
                encoded.append(self.encoder.encode(with_response(prompt_messages, response, field), field))
        return encoded

    # ---- compute -----------------------------------------------------------------------------------

    def embed(self, encoded: Sequence[EncodedConversation]) -> Embeddings:
        """Response and prompt embeddings (N, H), in input order, from length-sorted padded batches."""
        c = self.config
        alone = c.batch_invariant or c.batch_plan == "one-per-forward"
        return embed_encoded(
            self.backbone, encoded, c.token_budget, c.max_batch_size,
            share_prompts=c.share_prompts and not alone, batch_invariant=alone,
            packed=c.batch_plan == "packed" or (c.batch_plan == "auto" and self.backbone.device.type == "cuda"),
        )  # fmt: skip

    @torch.inference_mode()
    def _head_outputs(self, embeddings: Embeddings, weights: AttributeWeights | None):
        if self.config.batch_invariant:
            # A matmul's kernel (and so its rounding) can depend on the row count: one row at a time.
            rows = [
                self._head_rows(Embeddings(response=embeddings.response[i : i + 1], prompt=embeddings.prompt[i : i + 1]), weights)
                for i in range(embeddings.response.shape[0])
            ]
            return type(rows[0])(**{f.name: torch.cat([getattr(r, f.name) for r in rows]) for f in fields(rows[0])})
        return self._head_rows(embeddings, weights)

    def _head_rows(self, embeddings: Embeddings, weights: AttributeWeights | None):
        return self.heads.outputs(embeddings.response, embeddings.prompt, weights)

    def _named(self, row: torch.Tensor) -> dict[str, float]:
        return {name: float(v) for name, v in zip(self.attributes, row.tolist())}

    def score_encoded(
        self, encoded: Sequence[EncodedConversation], weights: AttributeWeights | None = None
    ) -> list[ScoreResult]:
        if weights is not None:
            weights.check_attributes(self.attributes)
        if not encoded:
            return []
        return self.score_embedded(encoded, self.embed(encoded), weights)

    def score_embedded(
        self, encoded: Sequence[EncodedConversation], embeddings: Embeddings, weights: AttributeWeights | None = None
    ) -> list[ScoreResult]:
        """The heads on embeddings already computed (row i is encoded[i]) by `embed` of this scorer or of another
        head set on the same backbone: several head sets share one backbone forward (serving/models.py)."""
        with tracing.span(tracing.HEADS, conversations=len(encoded)):
            out = self._head_outputs(embeddings, weights)
        source = self.weights_source(weights)
        return [
            ScoreResult(
                score=float(out.score[i]),
                rewards=self._named(out.rewards[i]),
                gating=self._named(out.gating[i]),
                coefficients=self._named(out.coefficients[i]),
                num_tokens=e.num_tokens,
                truncated=e.truncated,
                weights_source=source,
                model_id=self.model_id,
            )
            for i, e in enumerate(encoded)
        ]

    def score(self, conversations: Sequence[Any], weights: AttributeWeights | None = None) -> list[ScoreResult]:
        """Score conversations (OpenAI-style message lists whose last message is the response), in input order.
        An invalid conversation raises a typed error naming `conversations[i]`."""
        encoded = [self.encode(c, f"conversations[{i}]") for i, c in enumerate(conversations)]
        return self.score_encoded(encoded, weights)

    def score_group(
        self, prompt: Any, responses: Sequence[Any], weights: AttributeWeights | None = None
    ) -> list[ScoreResult]:
        """N responses to one prompt (GRPO / RLOO groups); the prompt is validated once."""
        return self.score_encoded(self.encode_group(prompt, responses), weights)

    @torch.inference_mode()
    def inspect(self, prompt: Any, weights: AttributeWeights | None = None) -> InspectResult:
        """The attribute weights the gating chooses for a prompt (and the effective coefficients). A model
        kind without gating answers with an empty `gating` and its fixed coefficients, without a forward pass."""
        return self.inspect_encoded(self.encode_prompt(prompt), weights)

    @torch.inference_mode()
    def inspect_encoded(self, encoded: EncodedConversation, weights: AttributeWeights | None = None) -> InspectResult:
        """`inspect` on a prompt already encoded with `encode_prompt` (the server tokenizes in its handler
        threads and leaves only the model to its batcher thread)."""
        if weights is not None:
            weights.check_attributes(self.attributes)
        prompt = None
        if self.heads.has_gating:
            prompt = self.backbone.hidden_at([list(encoded.input_ids)], [[encoded.prompt_anchor]])[:, 0]  # (1, H)
        gating, coefficients = self.heads.weights_for(prompt, weights)  # (1, K or 0), (1, K)
        return InspectResult(
            gating=self._named(gating[0]),
            coefficients=self._named(coefficients[0]),
            num_tokens=encoded.num_tokens,
            truncated=encoded.truncated,
            weights_source=self.weights_source(weights),
            model_id=self.model_id,
        )

    def model_info(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "model_kind": self.heads.kind,
            "has_gating": self.heads.has_gating,
            "trained": self.trained,
            "attributes": list(self.attributes),
            "backbone": self.backbone_description(),
            "feature_layer": self.heads.feature_layer,
            "dtype": precision_name(self.backbone),
            "device": str(self.backbone.device),
            "scoring_plan": self.plan_decision.as_dict() if self.plan_decision is not None else {},
            "max_tokens": self.config.max_tokens,
            "truncation": self.config.truncation,
            "label_scales": self.label_scales,
            "provenance": self.provenance,
            "calibration": calibration_summary(self.calibration, self.calibration_note),
        }

    def backbone_description(self) -> str:
        """The backbone's model_id, plus `+blocks:{kept}/{depth}` when early exit truncated it."""
        b = self.backbone
        return b.model_id if b.full_depth is None else f"{b.model_id}+blocks:{b.depth}/{b.full_depth}"

    def with_config(self, config: ScorerConfig) -> "Scorer":
        """The same loaded model under other limits (no reload)."""
        clone = Scorer.__new__(Scorer)
        clone.__dict__.update(self.__dict__)
        clone.config = config
        clone.encoder = ChatEncoder(self.backbone.tokenizer, config.max_tokens, config.truncation, self.heads.response_anchor)
        return clone


def _shipped_adapter_resolved(backbone: dict, directory: Path) -> dict:
    """A checkpoint may ship its stage-0 LoRA adapter inside itself (`"adapter": "adapter"`): a relative
    adapter path is relative to the checkpoint directory, so the checkpoint can move as one piece."""
    adapter = backbone.get("adapter")
    if not adapter or Path(adapter).is_absolute():
        return dict(backbone)
    shipped = directory / adapter
    if not shipped.is_dir():
        raise CheckpointError(f"{directory}: the backbone adapter {adapter!r} is missing (expected {shipped})")
    return {**backbone, "adapter": str(shipped)}


def _apply_feature_layer(backbone: Backbone, feature_layer: int | None, directory: Path) -> None:
    """Early exit: truncate the backbone to the heads' feature_layer (None or the full depth: nothing to do)."""
    if feature_layer is None:
        return
    depth = backbone.depth
    if feature_layer > depth:
        raise CheckpointError(
            f"{directory}: heads.feature_layer is {feature_layer} but backbone {backbone.model_id} has only {depth} blocks"
        )
    if feature_layer < depth:
        truncate_backbone(backbone, feature_layer)
        log.info("early exit: backbone truncated to %d of %d blocks for heads %s", feature_layer, depth, directory)


def shipped_backbone_config(directory: str | Path) -> dict:
    """The BackboneConfig fields a heads checkpoint names, its shipped adapter resolved (as Scorer.load does)."""
    directory = Path(directory)
    return _shipped_adapter_resolved(load_heads(directory).backbone, directory)
