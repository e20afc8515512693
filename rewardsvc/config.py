"""Frozen, validated configuration dataclasses. CLI flags map onto these fields one to one."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidInputError

DTYPES = ("auto", "float32", "bfloat16", "float16", "mixed")
QUANTIZATIONS = (None, "8bit", "4bit")
BATCH_PLANS = ("auto", "padded", "packed", "one-per-forward")
TRUNCATION_POLICIES = ("error", "left")
EMBEDDED_DEFAULT_BACKBONE = "embedded:smollm2-135m-instruct"


@dataclass(frozen=True)
class BackboneConfig:
    """How to load the frozen decoder backbone."""

    model: str = EMBEDDED_DEFAULT_BACKBONE
    """Local directory, Hugging Face hub id, path to a .gguf file, or `embedded:smollm2-135m-instruct`."""
    gguf_file: str | None = None
    """GGUF file name inside `model` (a directory or hub repo), when the weights come as GGUF."""
    dtype: str = "auto"
    """Compute dtype: `auto` = bfloat16 on CUDA; on a CPU float32, or bfloat16 / mixed where a short measurement
    at load shows them faster and close enough to float32 (model/plan_measurement.py). `mixed` = bfloat16 for
    the lower blocks, float32 for the top quarter of the blocks and the heads (model/precision.py)."""
    device: str = "auto"
    """`auto` = cuda if available else cpu; or any torch device string."""
    quantization: str | None = None
    """None, `8bit` or `4bit` (bitsandbytes, CUDA only)."""
    adapter: str | None = None
    """Directory of a PEFT (LoRA) adapter to apply to the backbone and merge for inference."""
    device_map: str | None = None
    """Spread a backbone larger than one GPU over several devices (accelerate): `auto`, `balanced`,
    `balanced_low_0`, `sequential`, or a JSON object {module name: device}, e.g. '{"": "cpu"}'. None = the whole
    model on `device`. Inputs go to the device of the embedding layer; the heads stay on the CPU."""

    def __post_init__(self) -> None:
        if self.device_map is not None:
            device_map_value(self.device_map)  # raises naming the field
        if not self.model:
            raise InvalidInputError("backbone.model must be a non-empty string", field="backbone.model")
        if self.dtype not in DTYPES:
            raise InvalidInputError(f"backbone.dtype must be one of {DTYPES}, got {self.dtype!r}", field="backbone.dtype")
        if self.quantization not in QUANTIZATIONS:
            raise InvalidInputError(
                f"backbone.quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}",
                field="backbone.quantization",
            )


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def device_map_value(text: str) -> str | dict[str, str | int]:
    """backbone.device_map as from_pretrained takes it: a strategy name, or the parsed JSON map."""
    if text in DEVICE_MAP_STRATEGIES:
        return text
    import json

    try:
        value = json.loads(text)
    except (TypeError, json.JSONDecodeError):
        value = None
    if not isinstance(value, dict) or not value or not all(
        isinstance(k, str) and isinstance(v, (str, int)) and not isinstance(v, bool) for k, v in value.items()
    ):
        raise InvalidInputError(
            f"backbone.device_map must be one of {DEVICE_MAP_STRATEGIES} or a non-empty JSON object "
            f'{{module name: device}} such as \'{{"": "cuda:0"}}\', got {text!r}',
            field="backbone.device_map",
        )
    return value


@dataclass(frozen=True)
class HeadsConfig:
    """Shapes and hyper-parameters of the ArmoRM heads (regression, transform, gating)."""

    attributes: tuple[str, ...]
    """Attribute names, in head order (K of them)."""
    hidden_size: int
    """Backbone hidden size H."""
    gating_hidden_dim: int = 1024
    """Width of each hidden layer of the gating MLP."""
    gating_n_hidden: int = 3
    """Number of hidden ReLU layers of the gating MLP."""
    gating_temperature: float = 10.0
    """Softmax temperature tau of the gating."""
    verbosity_attribute: str | None = None
    """Name of the attribute used as the verbosity signal when debiasing, if any."""
    regression_bias: bool = False
    """Whether the regression heads carry a bias: r = W h + b. Checkpoints written before this field have none
    (r = W h, as in the reference ArmoRM)."""
    feature_layer: int | None = None
    """Number of backbone blocks whose output, after the decoder's final norm, feeds the heads (both the
    response and the prompt embedding); None = all blocks. When smaller than the backbone's depth the backbone
    is truncated at load, so the later blocks never run (early exit)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", tuple(self.attributes))
        if not self.attributes:
            raise InvalidInputError("heads.attributes must name at least one attribute", field="heads.attributes")
        if len(set(self.attributes)) != len(self.attributes):
            raise InvalidInputError(f"heads.attributes has duplicates: {self.attributes}", field="heads.attributes")
        for name, value in (("hidden_size", self.hidden_size), ("gating_hidden_dim", self.gating_hidden_dim)):
            if int(value) < 1:
                raise InvalidInputError(f"heads.{name} must be >= 1, got {value}", field=f"heads.{name}")
        if self.gating_n_hidden < 0:
            raise InvalidInputError(f"heads.gating_n_hidden must be >= 0, got {self.gating_n_hidden}", field="heads.gating_n_hidden")
        if not self.gating_temperature > 0:
            raise InvalidInputError(
                f"heads.gating_temperature must be > 0, got {self.gating_temperature}", field="heads.gating_temperature"
            )
        if self.verbosity_attribute is not None and self.verbosity_attribute not in self.attributes:
            raise InvalidInputError(
                f"heads.verbosity_attribute {self.verbosity_attribute!r} is not one of the attributes",
                field="heads.verbosity_attribute",
            )
        if not isinstance(self.regression_bias, bool):
            raise InvalidInputError(
                f"heads.regression_bias must be true or false, got {self.regression_bias!r}", field="heads.regression_bias"
            )
        if self.feature_layer is not None and (
            isinstance(self.feature_layer, bool) or not isinstance(self.feature_layer, int) or self.feature_layer < 1
        ):
            raise InvalidInputError(
                f"heads.feature_layer must be None or an integer >= 1, got {self.feature_layer!r}", field="heads.feature_layer"
            )

    @property
    def num_attributes(self) -> int:
        return len(self.attributes)


@dataclass(frozen=True)
class Limits:
    """Per-request limits of the service: the one definition. The server's flags and ServerConfig, the
    batcher's admission control and the scorer's max_tokens take their defaults from here; the data plane
    enforces them; GetModelInfo reports them as the proto's ServerLimits (the same fields, checked by a test),
    and docs/SERVING.md lists them (checked too). Over a limit a request is INVALID_ARGUMENT naming the field
    and the limit, except max_tokens_in_flight (RESOURCE_EXHAUSTED with a retry hint)."""

    max_message_bytes: int = 4 * 1024 * 1024
    """Largest request accepted. gRPC itself refuses messages over twice this size before parsing them."""
    max_conversations_per_request: int = 256
    """Most conversations in one Score (or ScoreStream message); a Compare pair counts as two."""
    max_tokens_per_conversation: int = 4096
    """Most tokens per templated conversation (the scorer's max_tokens)."""
    max_group_size: int = 256
    """Most responses in one ScoreGroup."""
    max_tokens_in_flight: int = 262_144
    """Admission control: most tokens queued or computing; beyond it, RESOURCE_EXHAUSTED + retry-after-ms."""


@dataclass(frozen=True)
class ScorerConfig:
    """Length limits and batching of the scorer."""

    max_tokens: int = Limits.max_tokens_per_conversation
    """Most tokens one templated conversation may have."""
    truncation: str = "error"
    """`error`: an over-long conversation raises ConversationTooLongError. `left`: cut the prompt from the
    left (after any system message), keeping the prompt anchor and the whole response; sets truncated=True."""
    token_budget: int = 8192
    """Most padded tokens (rows x longest row) in one forward pass."""
    max_batch_size: int = 64
    """Most conversations in one forward pass."""
    batch_plan: str = "auto"
    """How conversations share a forward pass: `padded` (length-sorted, right-padded), `packed` (concatenated,
    no padding, per-sequence position ids), `one-per-forward` (each conversation alone, no shared prompts), or
    `auto`: packed on CUDA; on a CPU the fastest by a short measurement at load, cached on disk
    (model/plan_measurement.py; REWARDSVC_AUTO_PLAN=device keeps padded without measuring)."""
    share_prompts: bool = True
    """Conversations in one call whose tokens start with the same prompt (a ScoreGroup, a Compare pair) run
    that prompt once and continue from its key/value cache (equal to the flat path up to rounding)."""
    batch_invariant: bool = False
    """A conversation's score is bitwise the same whatever else is in its batch: one conversation per forward,
    heads one row at a time, no shared prompts (costs throughput on GPU; see docs/PERFORMANCE.md)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 2:
            raise InvalidInputError(f"scorer.max_tokens must be >= 2, got {self.max_tokens}", field="scorer.max_tokens")
        if self.truncation not in TRUNCATION_POLICIES:
            raise InvalidInputError(
                f"scorer.truncation must be one of {TRUNCATION_POLICIES}, got {self.truncation!r}", field="scorer.truncation"
            )
        if self.batch_plan not in BATCH_PLANS:
            raise InvalidInputError(
                f"scorer.batch_plan must be one of {BATCH_PLANS}, got {self.batch_plan!r}", field="scorer.batch_plan"
            )
        if self.token_budget < 1:
            raise InvalidInputError(f"scorer.token_budget must be >= 1, got {self.token_budget}", field="scorer.token_budget")
        if self.max_batch_size < 1:
            raise InvalidInputError(
                f"scorer.max_batch_size must be >= 1, got {self.max_batch_size}", field="scorer.max_batch_size"
            )


@dataclass(frozen=True)
class ScoreMix:
    """The score of a sequence-classification model with several labels: sum_k weights[k] * logit_k, over the
    labels the model's `id2label` names. The model card says which label (or mix) is the score; a single label
    is {label: 1.0}. Unnamed labels get weight 0."""

    weights: tuple[tuple[str, float], ...]

    def __post_init__(self) -> None:
        import math

        if not self.weights:
            raise InvalidInputError("score_mix must name at least one label", field="score_mix")
        names = [name for name, _ in self.weights]
        if len(set(names)) != len(names):
            raise InvalidInputError(f"score_mix names a label twice: {names}", field="score_mix")
        for name, value in self.weights:
            if not isinstance(name, str) or not name:
                raise InvalidInputError(f"score_mix: label names must be non-empty strings, got {name!r}", field="score_mix")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidInputError(f"score_mix[{name!r}] must be a finite number, got {value!r}", field="score_mix")

    @classmethod
    def parse(cls, text: str) -> "ScoreMix":
        """`LABEL` (that label's logit is the score) or a JSON object {label: weight} (`--score-mix`)."""
        import json

        text = text.strip()
        if not text.startswith("{"):
            return cls(weights=((text, 1.0),))
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"score_mix is neither a label nor a JSON object: {exc}", field="score_mix") from exc
        if not isinstance(data, dict):
            raise InvalidInputError("score_mix must be a label or a JSON object {label: weight}", field="score_mix")
        return cls(weights=tuple(data.items()))

    def as_dict(self) -> dict[str, float]:
        return {name: float(value) for name, value in self.weights}
