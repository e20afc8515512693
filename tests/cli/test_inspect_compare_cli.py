"""`rewardsvc inspect` (table, --json, --plot) and `rewardsvc compare` (local) on the tiny random model,
checked against the library's Scorer.inspect / Scorer.score."""

from __future__ import annotations

import json
import math

import pytest

from rewardsvc.cli import main as cli
from rewardsvc.config import ScorerConfig
from rewardsvc.model.scorer import Scorer
from tiny_models import save_tiny_heads

PROMPT = [{"role": "user", "content": "How do I sort a list in Python?"}]


@pytest.fixture(scope="module")
def heads_dir(tiny_llama_dir, tmp_path_factory):
    return save_tiny_heads(tmp_path_factory.mktemp("inspect-heads"), tiny_llama_dir)


@pytest.fixture(scope="module")
def scorer(heads_dir):
    return Scorer.load(heads_dir, config=ScorerConfig())


def test_inspect_prints_a_sorted_table_json_and_a_plot(heads_dir, scorer, tmp_path, capsys):
    want = scorer.inspect(PROMPT)
    png = tmp_path / "gating.png"
    assert cli.main(["inspect", json.dumps(PROMPT), "--model", str(heads_dir), "--plot", str(png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["attribute", "gating", "weight", "coefficient"]
    table = [line.split() for line in lines[3:]]
    assert [t[0] for t in table] == sorted(want.gating, key=lambda n: -want.gating[n])  # largest weight first
    for name, gating, coefficient in table:
        assert abs(float(gating) - want.gating[name]) <= 1e-4 and abs(float(coefficient) - want.coefficients[name]) <= 1e-4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000

    assert cli.main(["inspect", PROMPT[0]["content"], "--json", "--model", str(heads_dir)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["gating"] == pytest.approx(want.gating, abs=1e-6) and shown["model_id"] == want.model_id

    assert cli.main(["inspect", "hi", "--plot", str(tmp_path / "g.svg"), "--model", str(tmp_path / "none")]) == 2
    assert "--plot" in capsys.readouterr().err and not (tmp_path / "g.svg").exists()


def test_compare_gives_the_preference_probability(heads_dir, scorer, tmp_path, capsys):
    pairs = [
        {"id": 1, "prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."},
        {"id": 2, "chosen": [*PROMPT, {"role": "assistant", "content": "Use sorted(items)."}], "rejected": "?"},
        {"id": 3, "prompt": "Name a colour.", "chosen": "Blue."},
    ]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = tmp_path / "p.jsonl"
    assert cli.main(["compare", str(src), "-o", str(out), "--model", str(heads_dir)]) == 1  # row 3 has no rejected
    got = [json.loads(line) for line in out.read_text().splitlines()]
    prompts = [[{"role": "user", "content": "Name a colour."}], PROMPT]
    chosen = ["Blue.", "Use sorted(items)."]
    for g, p, prompt, c in zip(got, pairs, prompts, chosen):
        sc, sr = (s.score for s in scorer.score([[*prompt, {"role": "assistant", "content": t}] for t in (c, p["rejected"])]))
        assert g["id"] == p["id"] and abs(g["p_chosen"] - 1 / (1 + math.exp(sr - sc))) <= 1e-5
    assert got[2]["id"] == 3 and "'rejected'" in got[2]["error"]
    assert "3 pairs, 1 errors" in capsys.readouterr().err

    assert cli.main(["compare", str(src), "--format", "table", "--model", str(heads_dir)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["id", "P(chosen)"] and abs(float(lines[2].split()[1]) - got[0]["p_chosen"]) <= 1e-3
