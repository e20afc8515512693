"""Checkpoints: our heads-only format and the reference ArmoRM format. Safetensors only, no pickle, and
no code shipped with a checkpoint is ever executed.

Our format (a directory):
  rewardsvc.json      config: backbone reference, heads config, attribute names, label scales, provenance
  heads.safetensors   regression_layer.weight (K,H), regression_layer.bias (K,) iff heads.regression_bias,
                      reward_transform_matrix (K,K), gating.layers.*, gating.logit_scale
Heads can be swapped without copying the backbone.

Format versions: `save_heads` writes FORMAT_VERSION (2); `load_heads` reads 1 and 2.
  1  the heads section has no `regression_bias` and no `feature_layer` (no bias, features after all blocks);
     a version-1 file that names either field is refused.
  2  adds heads.regression_bias (bool) and heads.feature_layer (int or null), see config.HeadsConfig.
The tensor check is strict in both: `regression_layer.bias` must be present exactly when regression_bias.

Reference format (`RLHFlow/ArmoRM-Llama3-8B-v0.1`): a Llama config with `num_objectives`, `gating_*` fields
and safetensors (single file or sharded with an index) holding `model.*` plus the head tensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..config import HeadsConfig
from ..errors import CheckpointError, InvalidInputError
from .heads import ArmoHeads

CONFIG_FILE = "rewardsvc.json"
WEIGHTS_FILE = "heads.safetensors"
FORMAT = "rewardsvc.heads"
FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)
FIELDS_SINCE_VERSION_2 = ("regression_bias", "feature_layer")

REFERENCE_ATTRIBUTES = (
    "helpsteer-helpfulness", "helpsteer-correctness", "helpsteer-coherence", "helpsteer-complexity",
    "helpsteer-verbosity", "ultrafeedback-overall_score", "ultrafeedback-instruction_following",
    "ultrafeedback-truthfulness", "ultrafeedback-honesty", "ultrafeedback-helpfulness", "beavertails-is_safe",
    "prometheus-score", "argilla-overall_quality", "argilla-judge_lm", "code-complexity", "code-style",
    "code-explanation", "code-instruction-following", "code-readability",
)  # fmt: skip


@dataclass
class HeadsCheckpoint:
    """What our format holds besides the backbone."""

    heads: ArmoHeads
    backbone: dict[str, Any]  # BackboneConfig fields: where the backbone comes from
    name: str
    trained: bool
    label_scales: dict[str, dict[str, float]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], where: str) -> None:
    """Strict key and shape check with a message naming what is missing, unexpected or mis-shaped."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(found[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if tuple(expected[k].shape) != tuple(found[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if wrong:
        problems.append(f"wrong shapes {wrong[:8]}")
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is missing") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def json_safe(value: Any) -> Any:
    """Non-finite floats (an undefined correlation, say) become null: the config stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def save_heads(directory: str | Path, checkpoint: HeadsCheckpoint) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": checkpoint.name,
        "trained": checkpoint.trained,
        "backbone": checkpoint.backbone,
        "heads": asdict(checkpoint.heads.config),
        "label_scales": checkpoint.label_scales,
        "provenance": checkpoint.provenance,
    }
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in checkpoint.heads.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
    (directory / CONFIG_FILE).write_text(json.dumps(json_safe(config), indent=2, allow_nan=False) + "\n")
    return directory


def is_heads_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / CONFIG_FILE).is_file()


def load_heads(directory: str | Path) -> HeadsCheckpoint:
    directory = Path(directory)
    config = _read_json(directory / CONFIG_FILE)
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{directory / CONFIG_FILE}: 'format' must be {FORMAT!r}, got {config.get('format')!r}")
    version = config.get("format_version")
    if isinstance(version, bool) or version not in SUPPORTED_FORMAT_VERSIONS:
        raise CheckpointError(
            f"{directory / CONFIG_FILE}: format_version {version!r} is not supported "
            f"(expected one of {list(SUPPORTED_FORMAT_VERSIONS)})"
        )
    for key in ("name", "backbone", "heads"):
        if key not in config:
            raise CheckpointError(f"{directory / CONFIG_FILE}: missing key {key!r}")
    if not isinstance(config["heads"], dict):
        raise CheckpointError(f"{directory / CONFIG_FILE}: 'heads' must be an object")
    if version == 1:
        newer = [k for k in FIELDS_SINCE_VERSION_2 if k in config["heads"]]
        if newer:
            raise CheckpointError(
                f"{directory / CONFIG_FILE}: format_version 1 has no heads field {newer}; these need format_version 2"
            )
    try:
        heads_config = HeadsConfig(**config["heads"])
    except (TypeError, InvalidInputError) as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE}: bad 'heads' section: {exc}") from exc
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path} is missing")
    heads = ArmoHeads(heads_config)
    tensors = load_file(str(weights_path))
    check_state_dict(heads.state_dict(), tensors, str(weights_path))
    heads.load_state_dict(tensors)
    heads.eval()
    return HeadsCheckpoint(
        heads=heads,
        backbone=dict(config["backbone"]),
        name=str(config["name"]),
        trained=bool(config.get("trained", False)),
        label_scales=dict(config.get("label_scales") or {}),
        provenance=dict(config.get("provenance") or {}),
    )


# ---- reference format ------------------------------------------------------------------------------


def is_reference_checkpoint(directory: str | Path) -> bool:
    path = Path(directory) / "config.json"
    return path.is_file() and "num_objectives" in _read_json(path)


def _reference_tensor_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: missing 'weight_map'")
        files = sorted({directory / name for name in weight_map.values()})
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no .safetensors weights (pickled .bin weights are refused)")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f} is listed in the index but missing")
    return files


def reference_heads_config(config: dict[str, Any]) -> HeadsConfig:
    for key in ("num_objectives", "hidden_size"):
        if key not in config:
            raise CheckpointError(f"reference config.json: missing key {key!r}")
    K = int(config["num_objectives"])
    names = config.get("attribute_names")
    if names is None:
        names = REFERENCE_ATTRIBUTES if K == len(REFERENCE_ATTRIBUTES) else tuple(f"attribute_{i}" for i in range(K))
    if len(names) != K:
        raise CheckpointError(f"reference config.json: attribute_names has {len(names)} names, num_objectives is {K}")
    return HeadsConfig(
        attributes=tuple(names),
        hidden_size=int(config["hidden_size"]),
        gating_hidden_dim=int(config.get("gating_hidden_dim", 1024)),
        gating_n_hidden=int(config.get("gating_n_hidden", 3)),
        gating_temperature=float(config.get("gating_temperature", 10.0)),
        # The published checkpoint has no bias; a rewardsvc export of heads with one says so (model/export.py).
        regression_bias=bool(config.get("regression_bias", False)),
    )


def _rebuild_non_persistent_buffers(model, hf_config, device: torch.device) -> None:
    """Modules built on the meta device keep their non-persistent buffers (rotary inv_freq) on meta after
    a state-dict assign; rotary embeddings are rebuilt from the config, anything else is an error."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if type(module).__name__.endswith("RotaryEmbedding"):
                with torch.device(device):
                    rebuilt = type(module)(config=hf_config)
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, rebuilt)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"reference checkpoint: tensors not initialised after loading: {left[:8]}")


def _reference_parts(directory: str | Path, read_backbone: bool):
    """Read and strictly check a reference-format checkpoint: every key and shape of the backbone part and of
    the heads. Returns (hf config, backbone model on the meta device, loaded ArmoHeads, raw config dict,
    backbone tensors keyed without the `model.` prefix). With read_backbone=False the backbone tensors are
    meta tensors of the stored shapes (read from the safetensors headers only)."""
    from transformers import CONFIG_MAPPING, AutoModel

    directory = Path(directory)
    raw = _read_json(directory / "config.json")
    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"{directory / 'config.json'}: model_type {model_type!r} is not a built-in transformers model")
    fields = {k: v for k, v in raw.items() if k not in ("auto_map", "architectures", "model_type")}
    hf_config = CONFIG_MAPPING[model_type](**fields)
    heads = ArmoHeads(reference_heads_config(raw))
    with torch.device("meta"):
        model = AutoModel.from_config(hf_config, trust_remote_code=False)
    heads_expected = heads.state_dict()
    backbone_found: dict[str, torch.Tensor] = {}
    heads_found: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for path in _reference_tensor_files(directory):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.startswith("model."):
                    backbone_found[key[len("model."):]] = (
                        f.get_tensor(key) if read_backbone else torch.empty(f.get_slice(key).get_shape(), device="meta")
                    )
                elif key in heads_expected:
                    heads_found[key] = f.get_tensor(key)
                else:
                    unexpected.append(key)
    if unexpected:
        raise CheckpointError(f"{directory}: unexpected keys {sorted(unexpected)[:8]}")
    check_state_dict({f"model.{k}": v for k, v in model.state_dict().items()},
                     {f"model.{k}": v for k, v in backbone_found.items()}, str(directory))  # fmt: skip
    check_state_dict(heads_expected, heads_found, str(directory))
    heads.load_state_dict({k: v.float() for k, v in heads_found.items()})
    return hf_config, model, heads.eval(), raw, backbone_found


def load_reference(directory: str | Path, device: torch.device, dtype: torch.dtype):
    """Load a reference-format checkpoint: returns (hidden-state model, ArmoHeads, hf config dict)."""
    hf_config, model, heads, raw, backbone = _reference_parts(directory, read_backbone=True)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in backbone.items()}, assign=True)
    _rebuild_non_persistent_buffers(model, hf_config, device)
    model.eval().requires_grad_(False)
    return model, heads, raw


def load_reference_heads(directory: str | Path):
    """The heads of a reference-format checkpoint, with the same strict key and shape checks as
    `load_reference` over the backbone part too, but without reading the backbone's tensors (shapes come
    from the safetensors headers). Used when the backbone loads through `backbone.load_backbone`
    (quantization, adapters), as heads-format checkpoints' backbones do. Returns (ArmoHeads, raw config)."""
    _, _, heads, raw, _ = _reference_parts(directory, read_backbone=False)
    return heads, raw
