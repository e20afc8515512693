"""First load vs later loads of the packaged default, each in a new process (what a server start costs).

    python bench/load.py [--rounds 3] [--out bench/results/load-DATE.jsonl]

A fresh process imports rewardsvc and torch/transformers, then `Scorer.load()` (embedded SmolLM2-135M, the
GGUF converted to fp32 once and cached under $REWARDSVC_CACHE). Modes, interleaved round by round so that the
load of a shared machine hits both alike:
- `first`: an empty cache directory (a new machine or a new transformers version): the conversion runs;
- `warm`: the cache populated by the first load (every later start).
Each row: seconds for the imports and for `Scorer.load()` separately, and the process's wall time. The last row
is the ratio first / warm of the load time, measured in the same run (absolute seconds on a shared 2-core VM
move with the other jobs; the ratio is what compares).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, emit, stamp  # noqa: E402

CHILD = """
import json, time
t0 = time.perf_counter()
import torch, transformers  # noqa: F401
from rewardsvc.model.scorer import Scorer
t1 = time.perf_counter()
scorer = Scorer.load()
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "model": scorer.model_id}))
"""


def run_child(cache: Path) -> dict:
    env = {**os.environ, "REWARDSVC_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return {**row, "process_wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args = parser.parse_args()
    first, warm = [], []
    for r in range(args.rounds):
        cache = Path(tempfile.mkdtemp(prefix="rewardsvc-load-bench-"))
        try:
            row = run_child(cache)  # empty cache: converts
            first.append(row)
            emit({"bench": "load", "mode": "first", "round": r, **{k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, **stamp()}, args.out)
            row = run_child(cache)  # the same cache, now populated
            warm.append(row)
            emit({"bench": "load", "mode": "warm", "round": r, **{k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, **stamp()}, args.out)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    summary = {
        "bench": "load", "mode": "summary", "rounds": args.rounds,
        "first_load_s_median": round(median([r["load_s"] for r in first]), 2),
        "warm_load_s_median": round(median([r["load_s"] for r in warm]), 2),
        "import_s_median": round(median([r["import_s"] for r in first + warm]), 2),
        "first_vs_warm_load": round(median([r["load_s"] for r in first]) / median([r["load_s"] for r in warm]), 2),
        **stamp(),
    }  # fmt: skip
    emit(summary, args.out)


if __name__ == "__main__":
    main()
