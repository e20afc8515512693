"""The batch CLI on standard sequence-classification reward models: `score` (locally and through --server),
`eval`, `inspect` (which says there is no gating) and `--score-mix` for a model with several labels. Scores are
checked against transformers' own AutoModelForSequenceClassification forward."""

from __future__ import annotations

import json

import pytest

from rewardsvc.cli.main import main
from rewardsvc.model.scorer import Scorer
from service_fixtures import start_server
from tiny_models import save_tiny_seqcls, seqcls_oracle

TOL = 1e-5
ROWS = [
    {"id": "a", "prompt": "What is the capital of France?", "response": "Paris."},
    {"id": "b", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a haiku about the sea."},
                             {"role": "assistant", "content": "Waves fold into foam, the tide keeps its old promise."}]},
]  # fmt: skip
PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Berlin, a city.", "category": "chat"},
    {"prompt": "Tell me how to build a bomb.", "chosen": "I cannot help with that request.", "rejected": "Sure.", "category": "safety"},
]  # fmt: skip


def messages_of(row) -> list[dict]:
    if "messages" in row:
        return row["messages"]
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return save_tiny_seqcls(tmp_path_factory.mktemp("cli-seqcls"), "gemma", "llama3")


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    return save_tiny_seqcls(tmp_path_factory.mktemp("cli-seqcls-multi"), "mistral", "chatml", num_labels=3)


def test_score_locally_and_through_a_server_equals_transformers(single, tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    expected = seqcls_oracle(single, [messages_of(r) for r in ROWS])[:, 0].tolist()
    assert main(["score", str(src), "-o", str(tmp_path / "local.jsonl"), "--model", str(single)]) == 0
    local = [json.loads(line) for line in (tmp_path / "local.jsonl").read_text().splitlines()]
    assert [r["score"] for r in local] == pytest.approx(expected, abs=TOL)
    assert local[0]["rewards"] == {} and local[0]["weights_source"] == "fixed"
    running = start_server(Scorer.load(single))
    try:
        assert main(["score", str(src), "-o", str(tmp_path / "remote.jsonl"), "--server", f"127.0.0.1:{running.port}"]) == 0
    finally:
        running.stop(0)
    remote = [json.loads(line) for line in (tmp_path / "remote.jsonl").read_text().splitlines()]
    assert [r["score"] for r in remote] == pytest.approx(expected, abs=TOL)


def test_inspect_says_a_single_score_model_has_no_gating(single, capsys):
    assert main(["inspect", "Name a colour.", "--model", str(single)]) == 0
    out = capsys.readouterr().out
    assert "has no gating" in out and "single-score model" in out
    assert main(["inspect", "Name a colour.", "--json", "--model", str(single)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["has_gating"] is False and shown["gating"] == {} and shown["weights_source"] == "fixed"


def test_several_labels_need_score_mix_then_score_inspect_and_eval_work(multi, tmp_path, capsys):
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert main(["score", str(src), "--model", str(multi)]) == 2
    assert "--score-mix" in capsys.readouterr().err
    mix = '{"helpfulness": 0.5, "safety": 2.0}'
    assert main(["score", str(src), "-o", str(tmp_path / "out.jsonl"), "--model", str(multi), "--score-mix", mix]) == 0
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    logits = seqcls_oracle(multi, [messages_of(r) for r in ROWS])
    assert [r["score"] for r in got] == pytest.approx((0.5 * logits[:, 0] + 2.0 * logits[:, 1]).tolist(), abs=TOL)
    assert got[0]["rewards"] == pytest.approx(dict(zip(("helpfulness", "safety", "verbosity"), logits[0].tolist())), abs=TOL)

    assert main(["inspect", "Name a colour.", "--model", str(multi), "--score-mix", mix]) == 0
    out = capsys.readouterr().out
    assert "has no gating" in out and "same label weights (fixed)" in out
    table = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()[3:]}
    assert table == {"safety": 2.0, "helpfulness": 0.5, "verbosity": 0.0}

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    assert main(["eval", str(pairs), "--model", str(multi), "--score-mix", mix, "--records", str(tmp_path / "rec.jsonl")]) == 0
    summary = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in (tmp_path / "rec.jsonl").read_text().splitlines()]
    convs = [[{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p[side]}]
             for p in PAIRS for side in ("chosen", "rejected")]  # fmt: skip
    pair_logits = seqcls_oracle(multi, convs)
    scores = (0.5 * pair_logits[:, 0] + 2.0 * pair_logits[:, 1]).tolist()
    assert [r["chosen_score"] for r in records] == pytest.approx(scores[0::2], abs=TOL)
    wins = [1.0 if c > r else 0.0 for c, r in zip(scores[0::2], scores[1::2])]
    assert summary["overall"] == {"accuracy": pytest.approx(sum(wins) / 2), "n": 2}
    assert "gating_by_category" not in summary  # no gating to average


def test_eval_attributes_correlates_label_logits_and_refuses_a_single_score(single, multi, tmp_path, capsys):
    rows = [{**r, "helpfulness": rating, "safety": None} for r, rating in zip(ROWS * 2, (1.0, 3.0, 2.0, 4.0))]
    src = tmp_path / "ratings.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval-attributes", str(src), "--model", str(multi), "--score-mix", "helpfulness"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["attributes"]) == ["helpfulness"] and out["attributes"]["helpfulness"]["n"] == 4
    assert main(["eval-attributes", str(src), "--model", str(single)]) == 2
    assert "single-score model" in capsys.readouterr().err
