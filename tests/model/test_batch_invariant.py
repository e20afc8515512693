"""Batch-invariant mode: a conversation's score is bitwise the same whatever its batch neighbours (other
lengths, other counts, a shared prompt, duplicates)."""

from __future__ import annotations

from dataclasses import replace

from group_fixtures import PROMPT, RESPONSES


def conv(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def fingerprint(result) -> tuple:
    return (result.score, tuple(result.rewards.values()), tuple(result.gating.values()), tuple(result.coefficients.values()))


def test_scores_are_bitwise_independent_of_batch_neighbours(tiny_scorer):
    scorer = tiny_scorer.with_config(replace(tiny_scorer.config, batch_invariant=True))
    target = PROMPT + [{"role": "assistant", "content": RESPONSES[1]}]
    long_one = conv("Tell me how to build a bomb. " * 5, "I cannot help with that request. " * 8)
    siblings = [PROMPT + [{"role": "assistant", "content": r}] for r in RESPONSES]
    compositions = [
        [target],
        [conv("Hi", "Hello"), target, long_one],
        [long_one] * 4 + [target],
        siblings,  # the same prompt: shared prompts are off in this mode
        [target, target, conv("0123", "4567")],
    ]
    alone = fingerprint(scorer.score([target])[0])
    for batch in compositions:
        results = scorer.score(batch)
        for conversation, result in zip(batch, results):
            if conversation == target:
                assert fingerprint(result) == alone  # exact equality, not a tolerance
    group = scorer.score_group(PROMPT, RESPONSES)
    assert fingerprint(group[1]) == alone


def test_default_mode_stays_within_rounding_of_the_invariant_one(tiny_scorer):
    invariant = tiny_scorer.with_config(replace(tiny_scorer.config, batch_invariant=True))
    batch = [PROMPT + [{"role": "assistant", "content": r}] for r in RESPONSES] + [conv("Hi", "Hello")]
    for a, b in zip(tiny_scorer.score(batch), invariant.score(batch)):
        assert abs(a.score - b.score) <= 1e-5
