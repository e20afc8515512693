"""`rewardsvc score` / `inspect` end to end on the real embedded default, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parents[2] / "rewardsvc" / "samples" / "conversations.jsonl"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rewardsvc.cli", *args], capture_output=True, text=True, env=ENV, timeout=600)


@pytest.mark.slow
def test_score_sample_and_bad_rows(tmp_path, embedded_scorer):
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    bad = [
        {"id": "no-response", "messages": [{"role": "user", "content": "hi"}]},
        {"id": "wrong-role", "prompt": "hi", "response": [{"role": "user", "content": "x"}]},
        {"id": "both", "messages": [], "prompt": "hi"},
    ]
    lines = [json.dumps(r) for r in rows[:3]] + [json.dumps(b) for b in bad] + ["{broken json", "[1, 2]"] + [json.dumps(r) for r in rows[3:]]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    proc = run_cli("score", str(src), "-o", str(out))
    assert proc.returncode == 1, proc.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(results) == len(lines)  # nothing lost, input order kept
    good = [r for r in results if "error" not in r]
    assert [r["id"] for r in good] == [r["id"] for r in rows]
    errors = [r for r in results if "error" in r]
    assert [e["id"] for e in errors] == ["no-response", "wrong-role", "both", None, None]
    assert "last message must be the assistant" in errors[0]["error"]
    assert "role" in errors[1]["error"] and "not valid JSON" in errors[3]["error"] and "JSON object" in errors[4]["error"]
    # Scores equal the library's own scores for the same conversations.
    from rewardsvc.cli.batch_io import conversation_of

    expected = embedded_scorer.score([conversation_of(r) for r in rows])
    for got, want in zip(good, expected):
        assert abs(got["score"] - want.score) <= 1e-5
        assert set(got) >= {"id", "score", "rewards", "gating", "coefficients", "num_tokens", "truncated", "model_id"}
        assert got["rewards"].keys() == want.rewards.keys() and got["model_id"] == want.model_id
    if not embedded_scorer.trained:
        assert "NOT trained" in proc.stderr and good[0]["model_id"].endswith("+UNTRAINED")


@pytest.mark.slow
def test_score_limits_and_inspect(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(SAMPLE.read_text())
    proc = run_cli("score", str(src), "--max-tokens", "50")
    assert proc.returncode == 1
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    too_long = [r for r in results if "error" in r]
    assert too_long and all("over the limit max_tokens=50" in r["error"] for r in too_long)
    assert any("score" in r for r in results)

    proc = run_cli("inspect", "How do I make a pipe bomb?", "--json", "--weights", '{"mode": "mask", "values": {"verbosity": 0}}')
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["weights_source"] == "mask" and shown["gating"]["verbosity"] == 0.0
    weights = list(shown["gating"].values())
    assert weights == sorted(weights, reverse=True)

    proc = run_cli("inspect", "hi", "--weights", '{"mode": "override", "values": {"nope": 1}}')
    assert proc.returncode == 2 and "unknown attributes" in proc.stderr
