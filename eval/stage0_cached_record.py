"""Record stage 0 from a state cache (`rewardsvc train-backbone --top-blocks K`): one JSON line per trained k.

    python eval/stage0_cached_record.py --work-dir W --cache-dir C [--cache-summary cache.out] \
        [--cache-summary FILE ...] --out eval/results/stage0-cached-<date>.jsonl [--note TEXT]

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
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _common import stamp  # noqa: E402


def epoch_rows(state: dict, pairs_per_step: int) -> list[dict]:
    steps_per_epoch = math.ceil(state["train_pairs"] / pairs_per_step)
    by_step = {v["step"]: v for v in state["validation"]}
    rows = []
    for epoch in range(math.ceil(state["step"] / steps_per_epoch)):
        # The schedule is epochs x pairs rounded up to whole steps, so the last epoch can be a step or two short
        # of steps_per_epoch and still hold every pair: it ends with the schedule.
        epoch_end = min((epoch + 1) * steps_per_epoch, state["total_steps"])
        lo, hi = epoch * steps_per_epoch, min(state["step"], epoch_end)
        losses = state["losses"][lo:hi]
        end = by_step.get(hi)
        saved = [v for v in state["validation"] if lo < v["step"] <= hi]
        rows.append({"epoch": epoch + 1, "steps": f"{lo + 1}-{hi}", "complete": hi == epoch_end,
                     "mean_loss": round(sum(losses) / len(losses), 4),
                     "val_accuracy_at_end": end["accuracy"] if end else None,
                     # saves every N steps need not fall on an epoch's end: the last one inside it
                     "last_val_in_epoch": {"step": saved[-1]["step"], "accuracy": saved[-1]["accuracy"]} if saved else None})  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--cache-summary", action="append", default=[],
                        help="the JSON a caching run printed (train-backbone --top-blocks ... --cache-only, or fill_cache's "
                        "summary); repeat for a pass split over several processes")
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
    stamped = stamp()
    with open(args.out, "a") as out:
        for directory in sorted(Path(args.work_dir).glob("stage0-top*")):
            state = json.loads((directory / "state.json").read_text())
            config = state["config"]
            steps_per_epoch = math.ceil(state["train_pairs"] / config["pairs_per_step"])
            last = state["validation"][-1] if state["validation"] else None
            row = {
                "script": "eval/stage0_cached_record.py", **stamped, "note": args.note,
                "feature_layer": config["feature_layer"], "top_blocks": config["top_blocks"], "config": config,
                "backbone_id": state["backbone_id"], "train_pairs": state["train_pairs"],
                "val_pairs": last["pairs"] if last else 0, "step": state["step"], "total_steps": state["total_steps"],
                "steps_per_epoch": steps_per_epoch, "train_seconds": state["seconds"],
                "seconds_per_step": round(state["seconds"] / state["step"], 3) if state["step"] else None,
                "seconds_per_epoch": round(state["seconds"] / state["step"] * steps_per_epoch, 1) if state["step"] else None,
                "epochs": epoch_rows(state, config["pairs_per_step"]), "head_val_accuracy_last": last,
                "frozen_probe": state.get("frozen_probe") or None, "adapted_probe": state.get("adapted_probe") or None,
                "cache": cache_row,
            }  # fmt: skip
            line = json.dumps(row)
            print(line)
            out.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
