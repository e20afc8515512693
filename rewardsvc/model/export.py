"""Export a heads checkpoint and its backbone as one ArmoRM-layout Hugging Face directory (`rewardsvc export`).

The directory holds what the published ArmoRM holds, so RewardBench, TRL, OpenRLHF and plain transformers load
it with `AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)`:
  config.json                 the backbone's config + num_objectives, gating_*, attribute_names, regression_bias,
                              the two anchor fields of the modeling file, `auto_map` -> our modeling file
  model.safetensors           `model.*` (the backbone as loaded: adapter merged, early exit applied) and the heads
                              (`regression_layer.*`, `reward_transform_matrix`, `gating.layers.*`, `gating.logit_scale`)
  modeling_rewardsvc_armorm.py  model/armorm_modeling.py, copied
  tokenizer files             the backbone's tokenizer and chat template
rewardsvc itself loads the directory back through its reference-format loader (model/checkpoint.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import DTYPES
from ..errors import CheckpointError, InvalidInputError
from .checkpoint import json_safe
from .conversation import validate_conversation
from .encoding import ChatEncoder

MODELING_FILE = "modeling_rewardsvc_armorm.py"
MODEL_CLASS = "RewardModelWithGating"
WEIGHTS_FILE = "model.safetensors"
EXPORT_DTYPES = tuple(d for d in DTYPES if d != "auto")

# Two conversations that differ only in the response: the tokens after the prompt anchor that they share are the
# header of the assistant turn, whatever the template.
_PROBES = (
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "No"}],
)


def anchor_fields(tokenizer) -> dict[str, list[int]]:
    """The modeling file's anchor fields, read off this tokenizer's chat template through rewardsvc's own encoder
    (so the exported model finds the same anchors): `assistant_header_ids`, the tokens between the prompt anchor
    and the response content; `trailing_token_ids`, the whitespace-only tokens of the vocabulary (the encoder
    strips what the template appends after the end-of-turn token)."""
    encoder = ChatEncoder(tokenizer, max_tokens=1 << 30)
    a, b = (encoder.encode(validate_conversation(p), "probe") for p in _PROBES)
    if a.prompt_anchor != b.prompt_anchor or a.input_ids[: a.prompt_anchor + 1] != b.input_ids[: b.prompt_anchor + 1]:
        raise CheckpointError("export: the chat template renders the same prompt differently for two responses")
    start = a.prompt_anchor + 1
    end = start
    while end < min(len(a.input_ids), len(b.input_ids)) and a.input_ids[end] == b.input_ids[end]:
        end += 1
    header = list(a.input_ids[start:end])
    if not header:
        raise CheckpointError("export: the chat template puts no tokens between the prompt and the response")
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    trailing = [
        i for i in range(len(tokenizer))
        if i not in specials and (text := tokenizer.decode([i])) and not text.strip()
    ]  # fmt: skip
    return {"assistant_header_ids": header, "trailing_token_ids": trailing}


def export_config(backbone_config: dict[str, Any], heads_config, anchors: dict, name: str, dtype: str, extra: dict) -> dict:
    """config.json of the export: the backbone's own fields, then the ArmoRM ones."""
    config = {k: v for k, v in backbone_config.items() if k not in ("quantization_config", "auto_map", "architectures")}
    config.update(
        architectures=[MODEL_CLASS],
        auto_map={"AutoModelForSequenceClassification": f"{MODELING_FILE[:-3]}.{MODEL_CLASS}"},
        _name_or_path=name,
        num_objectives=heads_config.num_attributes,
        attribute_names=list(heads_config.attributes),
        gating_temperature=heads_config.gating_temperature,
        gating_hidden_dim=heads_config.gating_hidden_dim,
        gating_n_hidden=heads_config.gating_n_hidden,
        regression_bias=heads_config.regression_bias,
        id2label={"0": "score"},
        label2id={"score": 0},
        dtype=dtype,
        rewardsvc=extra,
        **anchors,
    )
    return config


def export_armorm(scorer, out: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write `scorer` (a loaded rewardsvc Scorer: heads on their backbone, any adapter merged and early exit
    applied at load) as an ArmoRM-layout directory. Written to a temporary directory first, then moved, so a
    failed export leaves nothing half-written at `out`."""
    out = Path(out)
    if dtype not in EXPORT_DTYPES:
        raise InvalidInputError(f"--dtype must be one of {EXPORT_DTYPES}, got {dtype!r}", field="dtype")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InvalidInputError(f"OUT: {out} exists and is not empty (pass --overwrite to replace it)", field="out")
    backbone = scorer.backbone
    if "+8bit" in backbone.model_id or "+4bit" in backbone.model_id:
        raise InvalidInputError("export: a quantized backbone cannot be exported; load it unquantized", field="backbone")
    heads = scorer.heads
    torch_dtype = getattr(torch, dtype)
    tensors = {f"model.{k}": v.detach().to("cpu", torch_dtype).contiguous() for k, v in backbone.model.state_dict().items()}
    # Heads stay float32 (the modeling file keeps them so, as rewardsvc computes them).
    tensors.update({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in heads.state_dict().items()})
    extra = {
        "model_id": scorer.model_id,
        "backbone": scorer.backbone_description(),
        "trained": scorer.trained,
        "label_scales": scorer.label_scales,
        "provenance": scorer.provenance,
    }
    config = export_config(backbone.model.config.to_dict(), heads.config, anchor_fields(backbone.tokenizer),
                           scorer.model_id, dtype, json_safe(extra))  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(json_safe(config), indent=2, allow_nan=False) + "\n")
        shutil.copyfile(Path(__file__).with_name("armorm_modeling.py"), tmp / MODELING_FILE)
        backbone.tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
