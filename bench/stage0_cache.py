"""Stage 0 from a state cache vs full stage 0: seconds of one training step (forward + backward + AdamW).

Baseline: stage0.py's step, LoRA on all L blocks below the feature layer, the decoder run from the token ids.
Against it: stage0_cached.py's step for each k, LoRA on the top k blocks only, run from the states cached after
L-k blocks. The same stage-2 training pairs (the first --pairs that fit --max-tokens, spread over prompt groups)
in every mode, pairs_per_step at a time, modes interleaved round by round so load from other jobs hits all
alike; the ratio is what counts (the expectation is about k/L). The caching pass's own seconds are printed too:
it is paid once per conversation, not per epoch.

    python bench/stage0_cache.py [--pairs 8] [--layer 16] [--top-blocks 2,4] [--rounds 2] [--out bench/results/...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine  # noqa: E402

from rewardsvc.config import BackboneConfig  # noqa: E402
from rewardsvc.training.data import default_data_dir  # noqa: E402
from rewardsvc.training.data.build import build_training_sets, round_robin  # noqa: E402
from rewardsvc.training.stage0 import Stage0Config, build_model, encode_pairs  # noqa: E402
from rewardsvc.training.stage0_cached import CachedRewards, CachedStage0Config, fill_cache  # noqa: E402
from rewardsvc.training.state_cache import StateCache  # noqa: E402


def step_seconds(rewards_fn, params, batches) -> float:
    """Seconds of one optimizer step per batch (mean over the batches)."""
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    started = time.perf_counter()
    for chosen, rejected in batches:
        r = rewards_fn([*chosen, *rejected])
        loss = -torch.nn.functional.logsigmoid(r[: len(chosen)] - r[len(chosen) :]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - started) / len(batches)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--pairs-per-step", type=int, default=4)
    parser.add_argument("--layer", type=int, default=16)
    parser.add_argument("--top-blocks", default="2,4")
    parser.add_argument("--max-tokens", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", help="append the JSON lines to this file")
    args = parser.parse_args()
    ks = [int(k) for k in args.top_blocks.split(",")]
    backbone = BackboneConfig()
    sets = build_training_sets(args.data_dir or default_data_dir(), seed=0)
    full, tokenizer, _ = build_model(backbone, Stage0Config(feature_layer=args.layer, max_tokens=args.max_tokens))
    pairs = []
    for pair in round_robin(sets.stage2_train, 0):
        if len(pairs) == args.pairs:
            break
        if encode_pairs(tokenizer, [pair], args.max_tokens)[0]:
            pairs.append(pair)
    encoded, _ = encode_pairs(tokenizer, pairs, args.max_tokens)
    tokens = sum(e.num_tokens for pair in encoded for e in pair)
    step = args.pairs_per_step
    batches = [([c for c, _ in encoded[i : i + step]], [r for _, r in encoded[i : i + step]]) for i in range(0, len(encoded), step)]
    cache_dir = Path(tempfile.mkdtemp(prefix="rewardsvc-stage0-cache-"))
    configs = [CachedStage0Config(feature_layer=args.layer, top_blocks=k, max_tokens=args.max_tokens) for k in ks]
    cached = fill_cache(cache_dir, backbone, pairs, [c.cache_block for c in configs], args.max_tokens)
    modes = {"full": (full, [p for p in full.parameters() if p.requires_grad])}
    for config in configs:
        model, _, backbone_id = build_model(backbone, config.as_stage0(), blocks=config.trained_blocks)
        rewards = CachedRewards(model, StateCache(cache_dir, backbone_id, model.backbone.hidden_size), config, backbone_id)
        modes[f"top{config.top_blocks}"] = (rewards, [p for p in model.parameters() if p.requires_grad])
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, (fn, params) in modes.items():
            times[name].append(step_seconds(fn, params, batches))
    base = statistics.median(times["full"])
    common = {"bench": "stage0_cache", "layer": args.layer, "pairs": len(encoded), "pairs_per_step": step, "tokens": tokens,
              "rounds": args.rounds, "caching_pass_s": cached["seconds"], "cached_blocks": [c.cache_block for c in configs], **machine()}  # fmt: skip
    for name, values in times.items():
        k = args.layer if name == "full" else int(name[3:])
        emit({**common, "mode": name, "trained_blocks": k, "median_step_s": round(statistics.median(values), 3),
              "ratio_vs_full": round(statistics.median(values) / base, 3), "k_over_L": round(k / args.layer, 3)}, args.out)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
