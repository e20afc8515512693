"""`rewardsvc train-backbone`: stage 0, a LoRA adapter that makes the backbone a Bradley-Terry reward model.

    rewardsvc train-backbone --work-dir artifacts/train --layer 16 --steps 500 [--max-seconds 3600]
    rewardsvc train --work-dir artifacts/train --adapter artifacts/train/stage0/adapter --layers 16 --out DIR

Resumable: run the same command again and it continues from the last saved step (a CPU can spread the
schedule over many runs; --max-seconds bounds one run). The pairs are the stage-2 training pairs of
`rewardsvc train` (same data directory, same split, so evaluation prompts never enter).

With --top-blocks K (stage 0 that fits a CPU, training/stage0_cached.py): LoRA on the top K blocks below
--layer only, trained from a cache of every token's state after layer-K blocks (--cache-dir; filled first, one
pass, resumable), for --epochs passes; the adapter goes to WORK_DIR/stage0-top<K>/adapter. Several K
(--top-blocks 2,4) are cached in one pass and trained one after the other, and the output compares each K's
validation accuracy with a logistic probe on the frozen block-L states of the same pairs:

    rewardsvc train-backbone --work-dir W --cache-dir C --layer 16 --top-blocks 2,4 --epochs 3 --max-tokens 384
    rewardsvc train --work-dir artifacts/train --adapter W/stage0-top2/adapter --layers 16 --state-cache C --out DIR

The refit's --state-cache C embeds the conversations the cache holds by running only the K adapted blocks, and
adds the others to it (training/adapted_features.py), so a later refit of another K-block adapter is cheap.
"""

from __future__ import annotations

import argparse
import json
import math

from ..config import BackboneConfig


INPUT_FORMAT = """\
input: the data directory (--data-dir, default ../shared/data): the stage-2 training pairs of `rewardsvc train`
  (same adapters and split; evaluation prompts never enter). output: WORK_DIR/stage0/adapter (a PEFT adapter
  for `rewardsvc train --adapter`), head.safetensors, optimizer.pt and state.json (step, losses, validation);
  with --top-blocks K: WORK_DIR/stage0-top<K>/ (the same files, the frozen and adapted probes in state.json)
  and the state cache in --cache-dir.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", default="artifacts/train", help="the adapter and its resumable state go to WORK_DIR/stage0")
    parser.add_argument("--data-dir", help="the shared data directory (default: ../shared/data)")
    parser.add_argument("--backbone", default=BackboneConfig.model, help="backbone: embedded default, directory or .gguf")
    parser.add_argument("--layer", type=int, required=True, help="feature layer (blocks) the heads will read; LoRA covers blocks below it")
    parser.add_argument("--steps", type=int, default=500, help="length of the whole schedule (pairs_per_step pairs a step)")
    parser.add_argument("--max-steps", type=int, help="stop this run after this many more steps (resume later)")
    parser.add_argument("--max-seconds", type=float, help="stop this run after this much training time (resume later)")
    parser.add_argument("--pairs-per-step", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--max-tokens", type=int, default=1024, help="pairs with a longer conversation are left out (counted)")
    parser.add_argument("--val-pairs", type=int, default=200, help="validation pairs scored at each save (0: none)")
    parser.add_argument("--save-every", type=int, default=10, help="save every N steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage0-share", type=float, default=1.0,
                        help="train on this share of the training prompt groups (seeded hash); `rewardsvc train --adapter` "
                             "fits stage 2 on the pairs left (training/stage0_pairs.py); default all")  # fmt: skip
    parser.add_argument("--top-blocks", help="K or K,K,...: train LoRA on the top K blocks below --layer only, from a state "
                        "cache (several K: cached in one pass, trained in turn, compared on validation)")
    parser.add_argument("--cache-dir", help="with --top-blocks: the state cache (default WORK_DIR/stage0-cache)")
    parser.add_argument("--epochs", type=int, default=3, help="with --top-blocks: the schedule's length in epochs")
    parser.add_argument("--max-pairs", type=int, help="with --top-blocks: train on the first N training pairs that fit "
                        "--max-tokens (spread over prompt groups); default all")
    parser.add_argument("--cache-seconds", type=float, help="with --top-blocks: stop the caching pass after this long (resume later)")
    parser.add_argument("--cache-only", action="store_true", help="with --top-blocks: fill the cache, train nothing")


def run(args: argparse.Namespace) -> int:
    from ..errors import InvalidInputError
    from .train import existing_data_dir

    data_dir = existing_data_dir(args)
    for flag in ("max_steps", "val_pairs"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise InvalidInputError(f"--{flag.replace('_', '-')} must be >= 0, got {value}", field=flag)
    from ..training.data.build import build_training_sets, round_robin
    from ..training.stage0 import Stage0Config, adapter_dir, train_stage0
    from ..training.stage0_pairs import check_share, stage0_share
    from .main import quiet_transformers

    quiet_transformers()
    check_share(args.stage0_share)
    if args.top_blocks is not None:
        return _run_cached(args, data_dir)
    config = Stage0Config(
        feature_layer=args.layer, rank=args.rank, alpha=2 * args.rank, learning_rate=args.learning_rate,
        pairs_per_step=args.pairs_per_step, total_steps=args.steps, max_tokens=args.max_tokens, seed=args.seed,
    )  # fmt: skip
    sets = build_training_sets(data_dir, seed=args.seed)
    val = round_robin(sets.stage2_val, args.seed)[: args.val_pairs]  # spread over prompt groups, not the first source
    train = stage0_share(sets.stage2_train, args.stage0_share, args.seed)
    state = train_stage0(
        args.work_dir, BackboneConfig(model=args.backbone), config, train, val,
        max_steps=args.max_steps, max_seconds=args.max_seconds, save_every=args.save_every,
    )  # fmt: skip
    recent = state.losses[-20:]
    print(json.dumps({
        "adapter": str(adapter_dir(args.work_dir)), "step": state.step, "of": config.total_steps,
        "mean_loss_last_20": sum(recent) / len(recent) if recent else None,
        "validation": state.validation[-1] if state.validation else None, "train_seconds": state.seconds,
    }, indent=2))  # fmt: skip
    return 0


def _top_blocks(text: str, layer: int) -> list[int]:
    """--top-blocks K[,K...] -> the distinct K, each in 1..layer (an error names the flag and the limit)."""
    from ..errors import InvalidInputError

    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise InvalidInputError(f"--top-blocks must be integers separated by commas, got {text!r}", field="top_blocks") from None
    bad = [k for k in values if not 1 <= k <= layer]
    if bad:
        raise InvalidInputError(f"--top-blocks must each be in 1..{layer} (the feature layer --layer {layer}), got {bad}", field="top_blocks")
    return sorted(set(values))


def _run_cached(args: argparse.Namespace, data_dir) -> int:
    """Stage 0 from a state cache, for each K of --top-blocks: fill the cache (one pass), then train in turn."""
    from pathlib import Path

    from ..errors import InvalidInputError
    from ..training.data.build import build_training_sets, round_robin
    from ..training.stage0 import encode_pairs
    from ..training.stage0_cached import CachedStage0Config, cached_adapter_dir, fill_cache, train_stage0_cached
    from ..training.stage0_pairs import stage0_share

    ks = _top_blocks(args.top_blocks, args.layer)
    if args.max_pairs is not None and args.max_pairs < 1:
        raise InvalidInputError(f"--max-pairs must be >= 1, got {args.max_pairs}", field="max_pairs")
    configs = [
        CachedStage0Config(
            feature_layer=args.layer, top_blocks=k, rank=args.rank, alpha=2 * args.rank, learning_rate=args.learning_rate,
            pairs_per_step=args.pairs_per_step, epochs=args.epochs, max_tokens=args.max_tokens, seed=args.seed,
        ) for k in ks
    ]  # fmt: skip
    backbone = BackboneConfig(model=args.backbone)
    cache_dir = Path(args.cache_dir) if args.cache_dir else Path(args.work_dir) / "stage0-cache"
    sets = build_training_sets(data_dir, seed=args.seed)
    # spread over prompt groups, so a --max-pairs prefix is too
    train = round_robin(stage0_share(sets.stage2_train, args.stage0_share, args.seed), args.seed)
    val = _first_that_fit(round_robin(sets.stage2_val, args.seed), args.val_pairs, backbone, args.max_tokens, encode_pairs)
    if args.max_pairs is not None:
        train = _first_that_fit(train, args.max_pairs, backbone, args.max_tokens, encode_pairs)
    filled = fill_cache(cache_dir, backbone, [*train, *val], [c.cache_block for c in configs], args.max_tokens,
                        max_seconds=args.cache_seconds, bar=True)  # fmt: skip
    report: dict = {"cache": {"dir": str(cache_dir), **filled}, "stage0_share": args.stage0_share, "runs": []}
    if filled["done"] and not args.cache_only:
        for config in configs:
            state = train_stage0_cached(
                args.work_dir, cache_dir, backbone, config, train, val,
                max_steps=args.max_steps, max_seconds=args.max_seconds, save_every=args.save_every,
            )  # fmt: skip
            steps_per_epoch = math.ceil(state.train_pairs / config.pairs_per_step)
            report["runs"].append({
                "top_blocks": config.top_blocks, "adapter": str(cached_adapter_dir(args.work_dir, config.top_blocks)),
                "step": state.step, "of": state.total_steps, "train_pairs": state.train_pairs,
                "seconds_per_epoch": round(state.seconds / state.step * steps_per_epoch, 1) if state.step else None,
                "validation": state.validation[-1] if state.validation else None,
                "frozen_probe": state.frozen_probe or None, "adapted_probe": state.adapted_probe or None,
            })  # fmt: skip
    print(json.dumps(report, indent=2))
    return 0


def _first_that_fit(pairs, n: int, backbone: BackboneConfig, max_tokens: int, encode_pairs) -> list:
    """The first n pairs whose both conversations fit max_tokens (those that do not are skipped anyway)."""
    from ..model.backbone_loading import backbone_source, load_tokenizer

    tokenizer = load_tokenizer(backbone_source(backbone)[0])
    kept = []
    for pair in pairs:
        if len(kept) == n:
            break
        if encode_pairs(tokenizer, [pair], max_tokens)[0]:
            kept.append(pair)
    return kept
