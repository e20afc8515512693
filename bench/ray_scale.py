"""Ray Data batch scoring against the local CLI, in one run: rows/s of `rewardsvc score` (one process) and of
`rewardsvc score --ray --ray-actors K` for K = 1 and 2 (a local Ray started by the command), same input.

Each mode is the whole command as a user runs it (a subprocess, wall clock): model load, Ray start, actor start,
scoring, writing Parquet. The ratio `rows_per_s / local rows_per_s` is the overhead (below 1) or the speed-up.
On a machine with N free cores, K CPU actors can at best share those N cores: on the 2-core development machine
two actors do not speed anything up; the figure records what Ray costs there. Outputs are compared row by row
(max |score difference| against the local run).

    python bench/ray_scale.py --out bench/results/ray-scale-DATE.jsonl            # the packaged default model
    python bench/ray_scale.py --tiny --rows 64                                    # tiny random model (smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, emit  # noqa: E402


def tiny_model(root: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import save_tiny_heads, save_tiny_llama

    return save_tiny_heads(root / "heads", save_tiny_llama(root / "llama", "chatml"))


def write_input(path: Path, rows: int) -> None:
    """`rows` distinct conversations of a few dozen tokens (no repeats: nothing is deduplicated)."""
    with open(path, "w") as f:
        for i in range(rows):
            prompt = f"Question {i}: how would you explain topic number {i} to a new colleague in two sentences?"
            response = f"Answer {i}: start from what they already know, then give one concrete example of topic {i}."
            f.write(json.dumps({"id": f"r{i}", "prompt": prompt, "response": response}) + "\n")


def run(args: list[str]) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "rewardsvc", "score", *args, "--no-progress"], env=env,
                          capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"rewardsvc score {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random model instead of the packaged default")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=32, help="rows per Ray batch (and per local chunk)")
    parser.add_argument("--actors", default="1,2", help="actor counts to run (default %(default)s)")
    parser.add_argument("--out", help="append the JSON lines here (with machine, date, commit)")
    opts = parser.parse_args()
    from rewardsvc.cli.batch_io import read_output

    root = Path(tempfile.mkdtemp(prefix="rewardsvc-ray-bench-"))
    model = ["--model", str(tiny_model(root))] if opts.tiny else []
    source = root / "in.jsonl"
    write_input(source, opts.rows)
    common = [str(source), "--chunk-size", str(opts.chunk_size), *model]
    local_out = root / "local.parquet"
    local_s = run([*common, "-o", str(local_out)])
    local = {r["id"]: r["score"] for r in read_output(local_out)}
    base = {"bench": "ray_scale", "model": "tiny" if opts.tiny else "default", "rows": opts.rows,
            "chunk_size": opts.chunk_size, "cpus": os.cpu_count()}  # fmt: skip
    emit({**base, "mode": "local", "actors": 0, "seconds": round(local_s, 2), "rows_per_s": round(opts.rows / local_s, 2),
          "ratio_vs_local": 1.0, "max_score_deviation": 0.0}, opts.out)  # fmt: skip
    for actors in (int(a) for a in opts.actors.split(",")):
        out = root / f"ray-{actors}.parquet"
        seconds = run([*common, "-o", str(out), "--ray", "--ray-actors", str(actors)])
        got = {r["id"]: r["score"] for r in read_output(out)}
        assert got.keys() == local.keys(), "the Ray run lost or added rows"
        deviation = max(abs(got[k] - local[k]) for k in local)
        emit({**base, "mode": "ray", "actors": actors, "seconds": round(seconds, 2),
              "rows_per_s": round(opts.rows / seconds, 2), "ratio_vs_local": round(local_s / seconds, 3),
              "max_score_deviation": float(f"{deviation:.2g}")}, opts.out)  # fmt: skip


if __name__ == "__main__":
    main()
