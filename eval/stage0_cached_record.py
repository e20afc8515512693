"""Record stage 0 from a state cache (`rewardsvc train-backbone --top-blocks K`): one JSON line per trained k.

    python eval/stage0_cached_record.py --work-dir W --cache-dir C [--cache-summary cache.out] \
        [--cache-summary FILE ...] [--top-blocks K ...] --out eval/results/stage0-cached-<date>.jsonl [--note TEXT]

Reads W/stage0-top<K>/state.json (written by the training run: losses, validation accuracy and training
seconds at each save, the frozen and adapted probes) and the cache directory, and writes per k: the training
pairs, steps done of the schedule, training seconds, seconds per epoch (training seconds / steps x steps per
epoch: measured, not extrapolated, once an epoch is done), the mean online loss of each epoch, the stage-0
head's validation accuracy at each epoch end and at the last save, the frozen- and adapted-feature probes'
validation accuracy, and the cache's size. With --cache-summary (the JSON each caching process printed), the
caching passes' conversations, tokens and seconds. docs/TRAINING.md quotes this file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _common import stamp  # noqa: E402

from rewardsvc.training.stage0_cached import stage0_dir  # noqa: E402
from rewardsvc.training.stage0_report import stage0_summary  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--cache-summary", action="append", default=[],
                        help="the JSON a caching run printed (train-backbone --top-blocks ... --cache-only, or fill_cache's "
                        "summary); repeat for a pass split over several processes")
    parser.add_argument("--top-blocks", type=int, action="append", default=[],
                        help="record only the run with this k (repeatable); default every stage0-top<K> in the work dir, "
                        "so that a k recorded before is not written twice when another k is trained in the same dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--note", default="", help="the conditions of the run (machine load, threads)")
    args = parser.parse_args()
    cache = Path(args.cache_dir)
    parts = sorted(cache.glob("part-*.safetensors"))
    cache_row = {"dir": str(cache), "parts": len(parts), "bytes": sum(p.stat().st_size for p in parts),
                 "manifest": json.loads((cache / "cache.json").read_text())}  # fmt: skip
    passes = []
    for summary in args.cache_summary:
        text = Path(summary).read_text()
        data = json.loads(text[text.index("{") :])
        passes.append({"file": Path(summary).name, **data.get("cache", data)})  # the CLI's report, or fill_cache's own
    if passes:
        cache_row["passes"] = passes
    if args.top_blocks:
        directories = [stage0_dir(args.work_dir, k) for k in sorted(set(args.top_blocks))]
        missing = [str(d) for d in directories if not d.is_dir()]
        if missing:
            parser.error(f"--top-blocks: no run in {', '.join(missing)}")
    else:
        directories = sorted(Path(args.work_dir).glob("stage0-top*"))
    stamped = stamp()
    with open(args.out, "a") as out:
        for directory in directories:
            summary = stage0_summary(directory / "adapter")  # what a checkpoint fit on this adapter records
            config, last = summary["config"], summary["validation_last"]
            row = {
                "script": "eval/stage0_cached_record.py", **stamped, "note": args.note,
                "feature_layer": config["feature_layer"], "top_blocks": config["top_blocks"], "config": config,
                "backbone_id": summary["backbone_id"], "train_pairs": summary["train_pairs"],
                "val_pairs": last["pairs"] if last else 0, "step": summary["step"], "total_steps": summary["total_steps"],
                "steps_per_epoch": summary["steps_per_epoch"], "train_seconds": summary["train_seconds"],
                "seconds_per_step": round(summary["train_seconds"] / summary["step"], 3) if summary["step"] else None,
                "seconds_per_epoch": summary["seconds_per_epoch"], "epochs": summary["epochs"], "head_val_accuracy_last": last,
                "frozen_probe": summary["frozen_probe"], "adapted_probe": summary["adapted_probe"], "cache": cache_row,
            }  # fmt: skip
            line = json.dumps(row)
            print(line)
            out.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
