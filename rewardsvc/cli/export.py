"""`rewardsvc export HEADS_DIR OUT`: one ArmoRM-layout Hugging Face directory (backbone, heads, gating,
transform, tokenizer, config with auto_map, our modeling file) that plain transformers, RewardBench, TRL and
OpenRLHF load with `AutoModelForSequenceClassification.from_pretrained(OUT, trust_remote_code=True)`."""

from __future__ import annotations

import argparse

INPUT_FORMAT = """\
HEADS_DIR: a rewardsvc heads checkpoint (rewardsvc.json + heads.safetensors; default_model is one), or its hub id;
  its backbone loads as serving loads it (a shipped stage-0 adapter merged, early exit applied)
OUT: a new (or empty) directory; docs/MODELS.md shows how to load and evaluate it
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config import DTYPES  # not model.export: --help must not import torch

    parser.add_argument("heads_dir", metavar="HEADS_DIR", help="heads checkpoint directory (or hub id)")
    parser.add_argument("out", metavar="OUT", help="directory to write")
    parser.add_argument("--backbone", help="override the checkpoint's backbone: directory, hub id or .gguf file")
    parser.add_argument("--dtype", choices=[d for d in DTYPES if d not in ("auto", "mixed")], default="float32",
                        help="dtype of the backbone weights written (heads stay float32; default %(default)s)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")


def run(args: argparse.Namespace) -> int:
    from ..config import BackboneConfig
    from ..errors import InvalidInputError
    from ..model.checkpoint import is_heads_checkpoint, load_heads
    from ..model.export import export_armorm
    from ..model.hub import resolve_model_path
    from ..model.scorer import Scorer
    from .main import quiet_transformers

    quiet_transformers()
    directory = resolve_model_path(args.heads_dir, "HEADS_DIR")
    if not is_heads_checkpoint(directory):
        raise InvalidInputError(f"HEADS_DIR: {directory} is not a rewardsvc heads checkpoint (no rewardsvc.json)", "heads_dir")
    backbone = None
    if args.backbone:  # float32 on the CPU: the export's dtype is applied when writing
        backbone = BackboneConfig(**{**load_heads(directory).backbone, "model": args.backbone, "device": "cpu", "dtype": "float32"})
    else:
        from ..model.scorer import shipped_backbone_config

        backbone = BackboneConfig(**{**shipped_backbone_config(directory), "device": "cpu", "dtype": "float32"})
    scorer = Scorer.load(directory, backbone=backbone)
    out = export_armorm(scorer, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"exported {scorer.model_id} ({scorer.backbone_description()}, {len(scorer.attributes)} attributes) to {out}")
    return 0
