"""Write the packaged calibration reference set, rewardsvc/samples/calibration_reference.jsonl: the conversations
`rewardsvc calibrate` measures by default (docs/SERVING.md, "Reward normalization").

Which conversations, and why: both responses (chosen and rejected) of pairs from the default recipe's stage-2
*validation* split.
- Held out from fitting the heads' regression and gating, so the statistics are not those of data the model
  was fitted to.
- Chat and safety prompts, with a preferred and a dispreferred answer to each: the range of quality a policy's
  samples span during RL, not only good answers (which would make the mean too high and the spread too small).
- Sources taken in turn (a round-robin over sources, pairs in a seeded hash order within each), so that no one
  source dominates (the split itself is 46 % hh-harmless).
- The evaluation pairs (docs/EVALUATION.md) are never used.

    python training/build_calibration_reference.py [--pairs 128] [--seed 0] [--data-dir ../shared/data]

Deterministic: the same data and arguments write the same file.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from rewardsvc.training.data.build import build_training_sets
from rewardsvc.training.data.splits import unit_hash

OUT = Path(__file__).resolve().parents[1] / "rewardsvc" / "samples" / "calibration_reference.jsonl"


def select_pairs(pairs, n: int, seed: int):
    """Up to n pairs, sources in turn (alphabetical), each source's pairs in a seeded hash order."""
    salt = f"rewardsvc-calibration-{seed}"
    by_source = defaultdict(list)
    for p in pairs:
        by_source[p.source].append(p)
    queues = [sorted(v, key=lambda p: (unit_hash(p.id, salt), p.id)) for _, v in sorted(by_source.items())]
    chosen, k = [], 0
    while len(chosen) < n and any(k < len(q) for q in queues):
        chosen += [q[k] for q in queues if k < len(q)][: n - len(chosen)]
        k += 1
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=128, help="pairs taken (two conversations each; default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="the shared data directory (default ../shared/data)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    sets = build_training_sets(args.data_dir)
    rows = []
    for p in select_pairs(sets.stage2_val, args.pairs, args.seed):
        for side in ("chosen", "rejected"):
            rows.append({"id": f"{p.id}:{side}", "source": p.source, "category": p.category, "side": side,
                         "prompt": p.prompt, "response": getattr(p, side)})  # fmt: skip
    with open(args.out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[row["source"]] += 1
    print(f"wrote {len(rows)} conversations to {args.out}: {dict(sorted(counts.items()))}")


if __name__ == "__main__":
    main()
