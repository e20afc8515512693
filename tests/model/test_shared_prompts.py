"""Shared-prompt groups: the prompt runs once and the responses continue from its key/value cache. Scores
equal the flat path's (every conversation run whole) within 1e-5 in fp32; a response whose tokens do not
continue the shared prompt falls back to the flat path."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rewardsvc.config import ScorerConfig
from rewardsvc.model.backbone import truncate_backbone
from rewardsvc.model.batch_plan import plan_shared_prompts
from rewardsvc.model.scorer import Scorer
from group_fixtures import PROMPT, RESPONSES, PromptCounter


def variants(scorer):
    flat = scorer.with_config(replace(scorer.config, share_prompts=False))
    shared = scorer.with_config(replace(scorer.config, share_prompts=True))
    return flat, shared


def assert_same(a, b, tol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x.score - y.score) <= tol, (x.score, y.score)
        for name in x.rewards:
            assert abs(x.rewards[name] - y.rewards[name]) <= tol
            assert abs(x.gating[name] - y.gating[name]) <= tol
        assert (x.num_tokens, x.truncated) == (y.num_tokens, y.truncated)


def test_plan_shared_prompts_groups_identical_prefixes_only():
    groups, rest = plan_shared_prompts([(1, 2), (1, 2), (1, 3), (1, 2), (4,)])
    assert groups == [[0, 1, 3]] and rest == [2, 4]
    assert plan_shared_prompts([(1,), (2,)]) == ([], [0, 1])


def test_group_scores_equal_flat_and_the_prompt_runs_once(tiny_scorer):
    flat, shared = variants(tiny_scorer)
    first = shared.encode(PROMPT + [{"role": "assistant", "content": RESPONSES[0]}])
    counts = {}
    for name, scorer in (("flat", flat), ("shared", shared)):
        counter = PromptCounter(tiny_scorer, first.input_ids[: first.prompt_anchor + 1])
        try:
            results = scorer.score_group(PROMPT, RESPONSES)
        finally:
            counter.close()
        counts[name] = (counter.rows, results)
    assert counts["flat"][0] == len(RESPONSES) and counts["shared"][0] == 1
    assert_same(counts["shared"][1], counts["flat"][1])


def test_mixed_call_groups_and_singles_in_input_order(tiny_scorer):
    flat, shared = variants(tiny_scorer)
    other = [{"role": "user", "content": "Write a haiku about the sea."}]
    conversations = []
    for i, r in enumerate(RESPONSES):
        conversations.append(PROMPT + [{"role": "assistant", "content": r}])
        if i % 2:
            conversations.append(other + [{"role": "assistant", "content": r}])
    conversations.append([{"role": "user", "content": "Alone?"}, {"role": "assistant", "content": "Yes."}])
    assert_same(shared.score(conversations), flat.score(conversations))


def test_truncated_members_fall_back_to_the_flat_path(tiny_scorer):
    # With left truncation the longest response cuts prompt tokens: its token list no longer starts with the
    # shared prompt, so it must be scored whole (and the others still share).
    prompt = [PROMPT[0], {"role": "user", "content": "How do I sort a list in Python? " * 8}]
    lengths = [tiny_scorer.encode(prompt + [{"role": "assistant", "content": r}]).num_tokens for r in RESPONSES]
    limit = sorted(lengths)[-2]  # only the longest is over it
    config = replace(tiny_scorer.config, max_tokens=limit, truncation="left")
    flat = tiny_scorer.with_config(replace(config, share_prompts=False))
    shared = tiny_scorer.with_config(config)
    encoded = [shared.encode(prompt + [{"role": "assistant", "content": r}]) for r in RESPONSES]
    groups, rest = plan_shared_prompts([e.input_ids[: e.prompt_anchor + 1] for e in encoded])
    assert [encoded[i].truncated for i in rest] == [True] and len(groups) == 1 and len(groups[0]) == len(RESPONSES) - 1
    got = shared.score_group(prompt, RESPONSES)
    assert sum(r.truncated for r in got) == 1
    assert_same(got, flat.score_group(prompt, RESPONSES))


def test_shared_prompts_after_early_exit(tiny_llama_dir, tmp_path):
    from tiny_models import save_tiny_heads

    scorer = Scorer.load(save_tiny_heads(tmp_path, tiny_llama_dir), config=ScorerConfig(token_budget=64, max_batch_size=2))
    truncate_backbone(scorer.backbone, 1)
    flat, shared = variants(scorer)
    assert_same(shared.score_group(PROMPT, RESPONSES), flat.score_group(PROMPT, RESPONSES))


@pytest.mark.slow
def test_embedded_default_group_equals_flat(embedded_scorer):
    assert embedded_scorer.backbone.full_depth is not None  # the default runs early exit: the cache path must too
    flat, shared = variants(embedded_scorer)
    assert_same(shared.score_group(PROMPT, RESPONSES), flat.score_group(PROMPT, RESPONSES))
