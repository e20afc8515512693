"""Command line: `rewardsvc score | inspect | serve | train | eval | eval-attributes`.

Each subcommand is a thin edge: parse flags into the frozen configs, call the library, print or write.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import BackboneConfig, ScorerConfig
from ..errors import InvalidInputError, RewardError
from ..types import AttributeWeights
from .rows import conversation_of, read_jsonl

log = logging.getLogger("rewardsvc")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="heads checkpoint or reference ArmoRM directory (default: the packaged default)")
    group.add_argument("--backbone", help="override the checkpoint's backbone: directory, hub id or .gguf file")
    group.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    group.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")
    group.add_argument("--quantization", choices=["8bit", "4bit"], help="bitsandbytes quantization (CUDA only)")
    group.add_argument("--adapter", help="PEFT (LoRA) adapter directory, merged into the backbone")
    group.add_argument("--max-tokens", type=int, default=ScorerConfig.max_tokens, help="most tokens per conversation")
    group.add_argument("--truncation", choices=["error", "left"], default="error",
                       help="error: reject over-long conversations; left: cut the prompt from the left")  # fmt: skip
    group.add_argument("--token-budget", type=int, default=ScorerConfig.token_budget, help="padded tokens per forward pass")
    group.add_argument("--batch-plan", choices=["auto", "padded", "packed"], default=ScorerConfig.batch_plan,
                       help="padded or packed (padding-free) forward passes; auto: packed on CUDA, padded on CPU")
    group.add_argument("--batch-invariant", action="store_true",
                       help="a conversation's score is bitwise the same whatever its batch neighbours (one per forward)")
    group.add_argument("--no-share-prompts", dest="share_prompts", action="store_false",
                       help="run every conversation whole (by default conversations with the same prompt in one "
                            "batch run it once and reuse its key/value cache)")  # fmt: skip


def backbone_override(args: argparse.Namespace) -> BackboneConfig | None:
    """None keeps the checkpoint's own backbone reference; any flag given builds an explicit config."""
    if args.backbone is None and args.device == "auto" and args.dtype == "auto" and not args.quantization and not args.adapter:
        return None
    if args.backbone is None:
        from ..model.checkpoint import is_heads_checkpoint, load_heads
        from ..model.scorer import DEFAULT_MODEL_DIR

        directory = Path(args.model) if args.model else DEFAULT_MODEL_DIR
        base = load_heads(directory).backbone if is_heads_checkpoint(directory) else {"model": str(directory)}
    else:
        base = {"model": args.backbone}
    return BackboneConfig(**{**base, "device": args.device, "dtype": args.dtype,
                             "quantization": args.quantization, "adapter": args.adapter})  # fmt: skip


def quiet_transformers() -> None:
    """No progress bars from transformers on stderr. Called by the commands as they load a model (not by
    main), so that a command that fails on its input first never pays the seconds of importing transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_scorer(args: argparse.Namespace):
    from ..model.scorer import Scorer

    quiet_transformers()
    config = ScorerConfig(
        max_tokens=args.max_tokens, truncation=args.truncation, token_budget=args.token_budget,
        batch_plan=args.batch_plan, batch_invariant=args.batch_invariant, share_prompts=args.share_prompts,
    )  # fmt: skip
    scorer = Scorer.load(args.model, backbone=backbone_override(args), config=config)
    if not scorer.trained:
        print(f"warning: {scorer.model_id}: the heads are NOT trained; scores are meaningless", file=sys.stderr)
    return scorer


def parse_weights(text: str | None) -> AttributeWeights | None:
    """`--weights '{"mode": "mask", "values": {"safety": 0}}'`."""
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"--weights is not valid JSON: {exc}", field="weights") from exc
    if not isinstance(data, dict) or "mode" not in data:
        raise InvalidInputError('--weights must be {"mode": "override"|"mask", "values": {name: number}}', field="weights")
    return AttributeWeights(mode=data["mode"], values=data.get("values") or {})


def result_row(row_id: Any, result) -> dict[str, Any]:
    """One output row: the row's id and every ScoreResult field."""
    return {"id": row_id, **asdict(result)}


def cmd_score(args: argparse.Namespace) -> int:
    # Checked before the model loads (seconds) and before the output file is created (never left empty).
    if not Path(args.input).is_file():
        raise InvalidInputError(f"input: {args.input} does not exist or is not a file", field="input")
    weights = parse_weights(args.weights)
    scorer = load_scorer(args)
    if weights is not None:
        weights.check_attributes(scorer.attributes)
    failed = 0
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        chunk: list = []

        def flush() -> None:
            nonlocal failed
            encoded, outputs = [], []
            for raw in chunk:
                if raw.error is not None:
                    outputs.append({"id": None, "line": raw.line, "error": raw.error})
                    continue
                try:
                    enc = scorer.encoder.encode(conversation_of(raw.data), f"line {raw.line}")
                except RewardError as exc:
                    outputs.append({"id": raw.id, "line": raw.line, "error": str(exc)})
                    continue
                outputs.append(len(encoded))
                encoded.append((raw, enc))
            results = scorer.score_encoded([e for _, e in encoded], weights)
            for item in outputs:
                if isinstance(item, dict):
                    failed += 1
                    row = item
                else:
                    raw, _ = encoded[item]
                    row = result_row(raw.id, results[item])
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
            chunk.clear()

        for raw in read_jsonl(args.input):
            chunk.append(raw)
            if len(chunk) >= args.chunk_size:
                flush()
        flush()
    finally:
        if out is not sys.stdout:
            out.close()
    if failed:
        print(f"{failed} row(s) failed; see their 'error' fields", file=sys.stderr)
    return 1 if failed else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..model.conversation import as_prompt

    scorer = load_scorer(args)
    try:
        prompt = json.loads(args.prompt)
    except json.JSONDecodeError:
        prompt = args.prompt  # a plain string prompt
    result = scorer.inspect(as_prompt(prompt), parse_weights(args.weights))
    ranked = sorted(result.gating.items(), key=lambda kv: -kv[1])
    print(json.dumps({
        "model_id": result.model_id,
        "weights_source": result.weights_source,
        "num_tokens": result.num_tokens,
        "gating": dict(ranked),
        "coefficients": result.coefficients,
    }, indent=2))  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rewardsvc", description="Multi-objective interpretable reward model (ArmoRM)")
    parser.add_argument("--version", action="version", version=f"rewardsvc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    score = sub.add_parser("score", help="score a JSONL file of conversations")
    score.add_argument("input", help='JSONL rows {"id", "messages"} or {"id", "prompt", "response"}')
    score.add_argument("-o", "--output", help="output JSONL (default: stdout)")
    score.add_argument("--weights", help='steer: {"mode": "override"|"mask", "values": {attribute: weight}}')
    score.add_argument("--chunk-size", type=int, default=256, help="rows read and scored together")
    add_model_arguments(score)
    score.set_defaults(func=cmd_score)

    inspect = sub.add_parser("inspect", help="show the attribute weights the gating chooses for a prompt")
    inspect.add_argument("prompt", help="a prompt string, or a JSON list of messages ending with a user message")
    inspect.add_argument("--weights", help="optional steering, as for score")
    add_model_arguments(inspect)
    inspect.set_defaults(func=cmd_inspect)

    for name, module, help_text in EXTENSIONS:
        # No `except ImportError`: a broken subcommand must fail loudly, not vanish from the CLI. The modules
        # are light (heavy imports live inside their run()), so importing them all keeps --help fast.
        ext = importlib.import_module(f"{__package__}.{module}")
        p = sub.add_parser(name, help=help_text)
        ext.add_arguments(p)
        if hasattr(ext, "uses_model") and ext.uses_model:
            add_model_arguments(p)
        p.set_defaults(func=ext.run)
    return parser


# Subcommands that live in their own modules (each exposes add_arguments(parser) and run(args) -> int).
EXTENSIONS: list[tuple[str, str, str]] = [
    ("serve", "serve", "serve the reward model over gRPC"),
    ("train", "train", "train heads with the default ArmoRM recipe on ../shared/data"),
    ("eval", "eval", "pairwise accuracy on a pairs JSONL, per category, against the length baseline"),
    ("eval-attributes", "eval_attributes", "per-attribute correlations on rated conversations"),
]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except RewardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
