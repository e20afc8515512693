"""Command line: `rewardsvc score | inspect | compare | serve | train | eval | eval-attributes | calibrate`.

Each subcommand is a thin edge: parse flags into the frozen configs, call the library, print or write.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from .. import __version__
from ..config import BATCH_PLANS, BackboneConfig, ScoreMix, ScorerConfig
from ..errors import InvalidInputError, RewardError
from ..types import AttributeWeights

log = logging.getLogger("rewardsvc")


def add_model_arguments(parser: argparse.ArgumentParser, multiple_models: bool = False) -> None:
    """The model flags; with multiple_models (serve) `--model` is repeatable and takes NAME=PATH."""
    group = parser.add_argument_group("model")
    model_help = ("heads checkpoint, reference ArmoRM directory or Hugging Face sequence-classification model; a "
                  "directory or a cached hub id (default: the packaged default; docs/MODELS.md)")
    if multiple_models:
        group.add_argument("--model", action="append", metavar="[NAME=]PATH",
                           help=model_help + ". Repeat to serve several models, requests choose one by NAME (the "
                                "proto's `model` field; default: the first); head sets on the same backbone share its "
                                "forward pass. Without NAME= a model is named by its model_id")  # fmt: skip
    else:
        group.add_argument("--model", help=model_help)
    group.add_argument("--score-mix", metavar="LABEL|JSON",
                       help="a sequence-classification model with several labels: the label whose logit is the score, "
                            "or a JSON mix {label: weight} (what its model card defines)")  # fmt: skip
    group.add_argument("--backbone", help="override the checkpoint's backbone: directory, hub id or .gguf file")
    group.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    group.add_argument("--device-map", help='spread a backbone over several GPUs: auto, balanced, sequential, or JSON '
                                            '{module: device} (accelerate; see docs/DEPLOY.md)')  # fmt: skip
    group.add_argument("--dtype", default="auto",
                       help="auto (bfloat16 on GPU; on CPU float32, or bfloat16 / mixed where a short measurement at "
                            "load finds them faster and within 5%% of the float32 score std), float32, bfloat16, float16, "
                            "mixed (bfloat16 lower blocks, float32 top quarter and heads)")  # fmt: skip
    group.add_argument("--quantization", choices=["8bit", "4bit"], help="bitsandbytes quantization (CUDA only)")
    group.add_argument("--adapter", help="PEFT (LoRA) adapter directory, merged into the backbone")
    group.add_argument("--max-tokens", type=int, default=ScorerConfig.max_tokens, help="most tokens per conversation")
    group.add_argument("--truncation", choices=["error", "left"], default="error",
                       help="error: reject over-long conversations; left: cut the prompt from the left")  # fmt: skip
    group.add_argument("--token-budget", type=int, default=ScorerConfig.token_budget, help="padded tokens per forward pass")
    group.add_argument("--batch-plan", choices=list(BATCH_PLANS), default=ScorerConfig.batch_plan,
                       help="padded, packed (padding-free) or one-per-forward passes; auto: packed on CUDA, on CPU the "
                            "fastest by a short measurement at load, cached on disk (REWARDSVC_AUTO_PLAN=device: padded)")
    group.add_argument("--batch-invariant", action="store_true",
                       help="a conversation's score is bitwise the same whatever its batch neighbours (one per forward)")
    group.add_argument("--no-share-prompts", dest="share_prompts", action="store_false",
                       help="run every conversation whole (by default conversations with the same prompt in one "
                            "batch run it once and reuse its key/value cache)")  # fmt: skip


def backbone_override(args: argparse.Namespace) -> BackboneConfig | None:
    """None keeps the checkpoint's own backbone reference; any flag given builds an explicit config."""
    device_map = getattr(args, "device_map", None)
    if (args.backbone is None and args.device == "auto" and args.dtype == "auto" and not args.quantization
            and not args.adapter and device_map is None):  # fmt: skip
        return None
    if args.backbone is None:
        from ..model.checkpoint import is_heads_checkpoint, load_heads
        from ..model.hub import resolve_model_path
        from ..model.scorer import DEFAULT_MODEL_DIR

        directory = resolve_model_path(args.model) if args.model else DEFAULT_MODEL_DIR
        base = load_heads(directory).backbone if is_heads_checkpoint(directory) else {"model": str(directory)}  # seq-cls too
    else:
        base = {"model": args.backbone}
    return BackboneConfig(**{**base, "device": args.device, "dtype": args.dtype, "quantization": args.quantization,
                             "adapter": args.adapter, "device_map": device_map})  # fmt: skip


def quiet_transformers() -> None:
    """No progress bars from transformers on stderr. Called by the commands as they load a model (not by
    main), so that a command that fails on its input first never pays the seconds of importing transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_scorer(args: argparse.Namespace, shared_backbones: dict | None = None):
    """shared_backbones: see Scorer.load (several head sets loading onto one backbone)."""
    from ..model.scorer import Scorer

    quiet_transformers()
    config = ScorerConfig(
        max_tokens=args.max_tokens, truncation=args.truncation, token_budget=args.token_budget,
        batch_plan=args.batch_plan, batch_invariant=args.batch_invariant, share_prompts=args.share_prompts,
    )  # fmt: skip
    score_mix = ScoreMix.parse(args.score_mix) if getattr(args, "score_mix", None) else None
    scorer = Scorer.load(args.model, backbone=backbone_override(args), config=config, score_mix=score_mix,
                         shared_backbones=shared_backbones)
    if not scorer.trained:
        print(f"warning: {scorer.model_id}: the heads are NOT trained; scores are meaningless", file=sys.stderr)
    return scorer


def parse_weights(text: str | None, flag: str = "--weights") -> AttributeWeights | None:
    """`--weights '{"mode": "mask", "values": {"safety": 0}}'` (or another flag of that form)."""
    if not text:
        return None
    field = flag.lstrip("-").replace("-", "_")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{flag} is not valid JSON: {exc}", field=field) from exc
    return AttributeWeights.of(data)


def add_normalization_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("normalization")
    group.add_argument("--normalize", action="store_true",
                       help="add z-scores against the model's calibration (`rewardsvc calibrate`) beside the raw values")
    group.add_argument("--normalize-clip", type=float, default=None, metavar="C",
                       help="with --normalize: clip the z-scores to [-C, C] (default: no clip)")  # fmt: skip


def parse_normalization(args: argparse.Namespace):
    """--normalize [--normalize-clip C] -> a Normalization; neither -> None (with --server: the server's default)."""
    from ..normalization import Normalization

    if args.normalize_clip is not None and not args.normalize:
        raise InvalidInputError("--normalize-clip needs --normalize", field="normalize_clip")
    return Normalization(clip=args.normalize_clip) if args.normalize else None


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """(the parser, each subcommand's parser by name)."""
    parser = argparse.ArgumentParser(prog="rewardsvc", description="Multi-objective interpretable reward model (ArmoRM)")
    parser.add_argument("--version", action="version", version=f"rewardsvc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {}
    for name, module, help_text in EXTENSIONS:
        # No `except ImportError`: a broken subcommand must fail loudly, not vanish from the CLI. The modules
        # are light (heavy imports live inside their run()), so importing them all keeps --help fast.
        ext = importlib.import_module(f"{__package__}.{module}")
        # Each subcommand's --help ends with its input format (the module's INPUT_FORMAT), verbatim.
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=getattr(ext, "INPUT_FORMAT", None),
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        ext.add_arguments(p)
        if getattr(ext, "uses_model", False):
            add_model_arguments(p)
        p.set_defaults(func=ext.run)
        commands[name] = p
    return parser, commands


# Subcommands, each in its own module (add_arguments(parser), run(args) -> int, optional INPUT_FORMAT text and
# uses_model flag).
EXTENSIONS: list[tuple[str, str, str]] = [
    ("score", "score", "score conversations (JSONL or Parquet), resumable; locally or through --server"),
    ("inspect", "inspect_cmd", "show the attribute weights the gating chooses for a prompt"),
    ("compare", "compare", "P(chosen preferred) for each (prompt, chosen, rejected) row"),
    ("serve", "serve", "serve the reward model over gRPC"),
    ("export", "export", "write a heads checkpoint and its backbone as one ArmoRM-layout Hugging Face directory"),
    ("train", "train", "train heads with the default ArmoRM recipe on ../shared/data"),
    ("train-backbone", "train_backbone", "stage 0: LoRA-fine-tune the backbone as a Bradley-Terry reward model"),
    ("eval", "eval", "pairwise accuracy on a pairs JSONL, per category, against the length baseline"),
    ("eval-attributes", "eval_attributes", "per-attribute correlations on rated conversations"),
    ("calibrate", "calibrate", "measure score/reward mean and std on a reference set and store them with the model"),
]


def main(argv: list[str] | None = None) -> int:
    parser, commands = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would blame the top-level parser; the subcommand's usage is the useful one
        commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except RewardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
