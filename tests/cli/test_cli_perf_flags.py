"""The scoring-mode flags shared by `score` and `serve`: --batch-invariant, --batch-plan, --no-share-prompts."""

from __future__ import annotations

import json
from dataclasses import replace

from rewardsvc.cli import main as cli
from rewardsvc.model.scorer import Scorer
from tiny_models import save_tiny_heads


def test_score_flags_reach_the_scorer(tmp_path, tiny_llama_dir):
    heads = save_tiny_heads(tmp_path / "heads", tiny_llama_dir)
    rows = [{"id": i, "prompt": "How do I sort a list in Python?", "response": "Use sorted(items). " * (1 + i)} for i in range(4)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    args = ["score", str(src), "-o", str(out), "--model", str(heads), "--batch-invariant", "--batch-plan", "packed",
            "--no-share-prompts"]  # fmt: skip
    assert cli.main(args) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    scorer = Scorer.load(heads)
    invariant = scorer.with_config(replace(scorer.config, batch_invariant=True))
    for row, result in zip(got, invariant.score([[{"role": "user", "content": r["prompt"]},
                                                  {"role": "assistant", "content": r["response"]}] for r in rows])):  # fmt: skip
        assert row["score"] == result.score  # bitwise: the same one-per-forward computation
    defaults = cli.build_parser()[0].parse_args(["score", "x"])
    assert (defaults.share_prompts, defaults.batch_invariant, defaults.batch_plan) == (True, False, "auto")
