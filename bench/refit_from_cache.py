"""The refit's embedding pass for a stage-0 adapter: features from the state cache vs the full forward.

Baseline: the refit's full pass (pipeline.features_at_layers on the adapted backbone, padded batches, every block
up to the feature layer). Against it, training.adapted_features: `from_cache` runs only the adapted blocks from
the states stage 0 cached below them (the expectation is a little under (L - s)/L, s the adapter's first block);
`added_to_cache` is a conversation the cache lacks, which runs the blocks below the adapter once, is stored, and
then runs the adapted blocks (the expectation is about 1.0: no dearer than the full pass). The same conversations
(both sides of the first --pairs stage-2 training pairs that fit --max-tokens) in every mode, interleaved round by
round so other load hits all alike; the ratio is what counts. The cache is filled here, in a temporary directory
(its own seconds are printed: stage 0 has paid them already). Also printed for each mode: how far its features
are from the full forward's (float16 cache), relative to the features' scale.

    python bench/refit_from_cache.py --adapter WORK/stage0-top2/adapter [--pairs 16] [--layer 16] [--out ...]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine  # noqa: E402

from rewardsvc.config import BackboneConfig  # noqa: E402
from rewardsvc.model.backbone import truncate_backbone  # noqa: E402
from rewardsvc.model.backbone_loading import load_backbone  # noqa: E402
from rewardsvc.training.adapted_features import CachedAdaptedFeatures, first_adapted_block  # noqa: E402
from rewardsvc.training.data import default_data_dir  # noqa: E402
from rewardsvc.training.data.build import build_training_sets, round_robin  # noqa: E402
from rewardsvc.training.pipeline import features_at_layers  # noqa: E402
from rewardsvc.training.stage0 import encode_pairs  # noqa: E402
from rewardsvc.training.stage0_cached import fill_cache  # noqa: E402


def fresh_cache(like: Path) -> Path:
    """An empty state cache directory with the manifest of `like` (same backbone, dtype)."""
    directory = Path(tempfile.mkdtemp(prefix="rewardsvc-refit-fresh-"))
    shutil.copy(like / "cache.json", directory / "cache.json")
    return directory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True, help="a train-backbone --top-blocks adapter directory")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--layer", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", help="append the JSON lines to this file")
    args = parser.parse_args()
    plain = BackboneConfig()
    start = first_adapted_block(args.adapter)
    backbone = load_backbone(BackboneConfig(adapter=args.adapter))
    truncate_backbone(backbone, args.layer)
    sets = build_training_sets(args.data_dir or default_data_dir(), seed=0)
    pairs = []
    for pair in round_robin(sets.stage2_train, 0):
        if len(pairs) == args.pairs:
            break
        if encode_pairs(backbone.tokenizer, [pair], args.max_tokens)[0]:
            pairs.append(pair)
    encoded = [e for pair in encode_pairs(backbone.tokenizer, pairs, args.max_tokens)[0] for e in pair]
    tokens = sum(e.num_tokens for e in encoded)
    cache_dir = Path(tempfile.mkdtemp(prefix="rewardsvc-refit-cache-"))
    cached = fill_cache(cache_dir, plain, pairs, [start], args.max_tokens)
    full = features_at_layers(backbone, [args.layer], 4096)
    from_cache = CachedAdaptedFeatures(backbone, plain, cache_dir, args.adapter, [args.layer])
    modes = {
        "full": lambda: full(encoded),
        "from_cache": lambda: from_cache(encoded),
        # A conversation the cache lacks: the blocks below the adapter once, its states stored, the adapted blocks.
        "added_to_cache": lambda: CachedAdaptedFeatures(backbone, plain, fresh_cache(cache_dir), args.adapter, [args.layer])(encoded),
    }
    times: dict[str, list[float]] = {name: [] for name in modes}
    out: dict[str, torch.Tensor] = {}
    for _ in range(args.rounds):
        for name, fn in modes.items():
            started = time.perf_counter()
            response, prompt = fn()
            times[name].append(time.perf_counter() - started)
            out[name] = torch.cat([response, prompt])
    assert from_cache.added_to_cache == 0, "every conversation was cached above"
    base = statistics.median(times["full"])
    common = {"bench": "refit_from_cache", "layer": args.layer, "adapter_first_block": start, "conversations": len(encoded),
              "tokens": tokens, "rounds": args.rounds, "caching_pass_s": cached["seconds"], **machine()}  # fmt: skip
    scale = out["full"].abs().max().item()
    for name, values in times.items():
        median = statistics.median(values)
        deviation = (out[name] - out["full"]).abs().max().item() / scale
        cosine = torch.nn.functional.cosine_similarity(out[name].flatten(1), out["full"].flatten(1)).min().item()
        emit({**common, "mode": name, "median_s": round(median, 3), "tokens_per_s": round(tokens / median, 1),
              "ratio_vs_full": round(median / base, 3), "blocks_run": args.layer - (start if name == "from_cache" else 0),
              "max_deviation_over_scale": round(deviation, 6), "min_cosine": round(cosine, 8)}, args.out)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
