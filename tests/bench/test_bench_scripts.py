"""The benchmark scripts run end to end with `--tiny` on CPU (a tiny random model; the same code as the real
runs) and print the JSON lines docs/PERFORMANCE.md is built from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *args: str) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--tiny", *args], capture_output=True,
                          text=True, env=env, timeout=600, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_gpu_bench_tiny():
    rows = run("gpu.py")
    modes = {r["mode"]: r for r in rows if r.get("kind") == "mode"}
    assert {"one_per_forward", "padded", "packed", "groups_flat", "groups_shared", "int8", "nf4"} <= set(modes)
    assert modes["one_per_forward"]["bitwise_batch_invariant"] is True
    for name in ("padded", "packed", "groups_shared"):
        row = modes[name]
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] and row["max_score_deviation"] <= 1e-5
    assert "CUDA" in modes["int8"]["skipped"] and "CUDA" in modes["nf4"]["skipped"]
    assert any(r.get("kind") == "ratio" and r["groups_shared_vs_flat"] > 0 for r in rows)


def test_cpu_bench_tiny():
    rows = run("cpu.py", "--pairs", "4", "--chunk", "2", "--only", "fp32_padded,int8_per_channel_all,mixed_padded")
    by_name = {r["candidate"]: r for r in rows if r.get("bench") == "cpu" and "candidate" in r}
    base = by_name["fp32_one_per_forward"]
    assert base["ratio_vs_fp32_one_per_forward"] == 1.0 and base["max_score_deviation"] == 0.0
    assert base["preferences_unchanged"] == 1.0
    assert by_name["fp32_padded"]["max_score_deviation"] <= 1e-5
    quant = by_name["int8_per_channel_all"]
    assert quant["tokens_per_s"] > 0 and 0 <= quant["preferences_unchanged"] <= 1 and quant["pairs"] == 4
    # auto's own decision (the load-time measurement) and the rule applied to this run's figures; the plans
    # depend on timing, so only their form is checked.
    [auto] = [r for r in rows if "auto_decision" in r and "candidate" not in r and "auto_rule_on_bench" not in r]
    assert auto["source"] == "measured" and auto["batch_plan"] in ("padded", "packed", "one-per-forward")
    assert {m["plan"] for m in auto["measurements"] if m["stage"] == 1} == {
        "float32/padded", "float32/packed", "float32/one-per-forward"}
    [rule] = [r for r in rows if "auto_rule_on_bench" in r]
    assert rule["auto_rule_on_bench"].split("/")[0] in ("float32", "bfloat16", "mixed")
    assert by_name["fp32_padded"]["admissible"] is True and by_name["fp32_padded"]["plan"] == "float32/padded"
    assert "skipped" in by_name["mixed_padded"] or by_name["mixed_padded"]["plan"] == "mixed/padded"


def test_groups_bench_tiny():
    rows = run("groups.py", "--groups", "1", "--n", "3", "--rounds", "1")
    summary = rows[-1]
    assert summary["max_score_deviation"] <= 1e-5 and summary["speedup_shared_vs_flat"] > 0
    assert {r.get("mode") for r in rows} >= {"flat", "shared"}


def test_multihead_bench_tiny():
    rows = run("multihead.py", "--conversations", "4", "--rounds", "1")
    summary = rows[-1]
    assert summary["max_score_deviation_a"] == 0.0 and summary["second_head_set_cost"] > 0
    assert {r.get("mode") for r in rows} >= {"one_head_set", "two_head_sets_shared_forward", "two_head_sets_separate_forwards"}
    assert summary["commit"] and summary["date"] and summary["cores"]
