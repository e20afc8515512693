"""`rewardsvc train-backbone`: stage 0, a LoRA adapter that makes the backbone a Bradley-Terry reward model.

    rewardsvc train-backbone --work-dir artifacts/train --layer 16 --steps 500 [--max-seconds 3600]
    rewardsvc train --work-dir artifacts/train --adapter artifacts/train/stage0/adapter --layers 16 --out DIR

Resumable: run the same command again and it continues from the last saved step (a CPU can spread the
schedule over many runs; --max-seconds bounds one run). The pairs are the stage-2 training pairs of
`rewardsvc train` (same data directory, same split, so evaluation prompts never enter).
"""

from __future__ import annotations

import argparse
import json

from ..config import BackboneConfig


INPUT_FORMAT = """\
input: the data directory (--data-dir, default ../shared/data): the stage-2 training pairs of `rewardsvc train`
  (same adapters and split; evaluation prompts never enter). output: WORK_DIR/stage0/adapter (a PEFT adapter
  for `rewardsvc train --adapter`), head.safetensors, optimizer.pt and state.json (step, losses, validation).
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
    from .main import quiet_transformers

    quiet_transformers()
    config = Stage0Config(
        feature_layer=args.layer, rank=args.rank, alpha=2 * args.rank, learning_rate=args.learning_rate,
        pairs_per_step=args.pairs_per_step, total_steps=args.steps, max_tokens=args.max_tokens, seed=args.seed,
    )  # fmt: skip
    sets = build_training_sets(data_dir, seed=args.seed)
    val = round_robin(sets.stage2_val, args.seed)[: args.val_pairs]  # spread over prompt groups, not the first source
    state = train_stage0(
        args.work_dir, BackboneConfig(model=args.backbone), config, sets.stage2_train, val,
        max_steps=args.max_steps, max_seconds=args.max_seconds, save_every=args.save_every,
    )  # fmt: skip
    recent = state.losses[-20:]
    print(json.dumps({
        "adapter": str(adapter_dir(args.work_dir)), "step": state.step, "of": config.total_steps,
        "mean_loss_last_20": sum(recent) / len(recent) if recent else None,
        "validation": state.validation[-1] if state.validation else None, "train_seconds": state.seconds,
    }, indent=2))  # fmt: skip
    return 0
