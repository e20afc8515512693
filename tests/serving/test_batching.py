"""The batcher: grouping, token budget, admission control, deadlines, cancellation, split-and-retry.

Most tests drive it with a tiny test double of the scorer (instant, records its calls) because they test
the batcher's policy, not the model; the last test runs the real embedded scorer through it.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError

import pytest

from rewardsvc.serving.batching import Batcher, BatcherConfig
from rewardsvc.model.encoding import EncodedConversation
from rewardsvc.errors import DeadlineExceededError, InvalidInputError, NotReadyError, OverloadedError
from rewardsvc.types import InspectResult, ScoreResult
from rewardsvc.types import AttributeWeights

POISON = -1  # a token id that makes the double raise, as a forward pass running out of memory would


def enc(*ids: int) -> EncodedConversation:
    return EncodedConversation(input_ids=tuple(ids), prompt_anchor=0, original_tokens=len(ids), truncated=False)


class FakeScorer:
    """score = sum of token ids. Raises RuntimeError("out of memory") on a batch holding POISON: an OOM
    cannot be produced for real on CPU, and this is exactly the failure the split-and-retry exists for."""

    attributes = ("a", "b")

    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None):
        self.calls: list[tuple[list[EncodedConversation], AttributeWeights | None]] = []
        self.delay_s = delay_s
        self.gate = gate

    def score_encoded(self, encoded, weights=None):
        if self.gate is not None:
            self.gate.wait(10)
        self.calls.append((list(encoded), weights))
        time.sleep(self.delay_s)
        if any(POISON in e.input_ids for e in encoded):
            raise RuntimeError("CUDA out of memory (simulated)")
        source = "gating" if weights is None else weights.mode
        return [
            ScoreResult(float(sum(e.input_ids)), {}, {}, {}, e.num_tokens, False, source, "fake") for e in encoded
        ]

    def inspect_encoded(self, encoded, weights=None):
        self.calls.append(([encoded], weights))
        return InspectResult({"a": 0.7, "b": 0.3}, {"a": 0.7, "b": 0.3}, encoded.num_tokens, False, "gating", "fake")


def test_groups_work_from_many_submitters_into_one_call():
    scorer = FakeScorer()
    batcher = Batcher(scorer, BatcherConfig(max_wait_s=0.2))
    items = [batcher.submit_score([enc(i, 1)]) for i in range(10)]  # queued before the thread starts
    batcher.start()
    assert [item.future.result(5)[0].score for item in items] == [i + 1.0 for i in range(10)]
    assert len(scorer.calls) == 1 and len(scorer.calls[0][0]) == 10
    batcher.close(5)


def test_token_budget_splits_calls_and_a_large_request_goes_alone():
    scorer = FakeScorer()
    batcher = Batcher(scorer, BatcherConfig(token_budget=10, max_wait_s=0.05))
    small = [batcher.submit_score([enc(*[1] * 4)]) for _ in range(5)]  # 4 tokens each
    large = batcher.submit_score([enc(*[1] * 25)])  # over the budget by itself
    batcher.start()
    for item in [*small, large]:
        item.future.result(5)
    sizes = [sum(e.num_tokens for e in call[0]) for call in scorer.calls]
    assert 25 in sizes
    assert all(size <= 10 for size in sizes if size != 25), sizes
    batcher.close(5)


def test_items_with_different_weights_are_never_mixed():
    scorer = FakeScorer()
    batcher = Batcher(scorer, BatcherConfig(max_wait_s=0.1))
    mask = AttributeWeights("mask", {"a": 0.0})
    a = batcher.submit_score([enc(1)])
    b = batcher.submit_score([enc(2)], mask)
    c = batcher.submit_score([enc(3)])
    batcher.start()
    assert [x.future.result(5)[0].weights_source for x in (a, b, c)] == ["gating", "mask", "gating"]
    assert sorted(len(call[0]) for call in scorer.calls) == [1, 2]
    batcher.close(5)


def test_identical_conversations_in_one_call_are_computed_once():
    scorer = FakeScorer()
    batcher = Batcher(scorer, BatcherConfig(max_wait_s=0.1))
    items = [batcher.submit_score([enc(7, 7), enc(1)]) for _ in range(4)]
    batcher.start()
    for item in items:
        assert [r.score for r in item.future.result(5)] == [14.0, 1.0]
    assert len(scorer.calls) == 1 and len(scorer.calls[0][0]) == 2
    batcher.close(5)


def test_admission_control_refuses_with_a_retry_hint_and_releases_tokens():
    gate = threading.Event()
    scorer = FakeScorer(gate=gate)
    batcher = Batcher(scorer, BatcherConfig(max_tokens_in_flight=10, max_wait_s=0)).start()
    first = batcher.submit_score([enc(*[1] * 8)])
    with pytest.raises(OverloadedError) as info:
        batcher.submit_score([enc(1, 1, 1)])
    assert info.value.retry_after_s > 0
    assert "max_tokens_in_flight=10" in str(info.value)
    gate.set()
    first.future.result(5)
    assert batcher.tokens_in_flight == 0
    batcher.submit_score([enc(1, 1, 1)]).future.result(5)  # admitted again once the first finished
    batcher.close(5)


def test_a_request_larger_than_the_admission_limit_is_invalid_not_overloaded():
    batcher = Batcher(FakeScorer(), BatcherConfig(max_tokens_in_flight=4))
    with pytest.raises(InvalidInputError, match="max_tokens_in_flight=4"):
        batcher.submit_score([enc(1, 2, 3, 4, 5)])
    batcher.close(1)


def test_expired_and_cancelled_items_are_dropped_before_compute():
    scorer = FakeScorer()
    batcher = Batcher(scorer, BatcherConfig(max_wait_s=0.05))
    expired = batcher.submit_score([enc(1)], deadline=time.monotonic() - 1)
    cancelled = batcher.submit_score([enc(2)])
    cancelled.cancel()
    alive = batcher.submit_score([enc(3)], deadline=time.monotonic() + 60)
    batcher.start()
    assert alive.future.result(5)[0].score == 3.0
    with pytest.raises(DeadlineExceededError):
        expired.future.result(5)
    with pytest.raises(CancelledError):
        cancelled.future.result(5)
    computed = [e.input_ids for call in scorer.calls for e in call[0]]
    assert computed == [(3,)]
    assert batcher.tokens_in_flight == 0
    batcher.close(5)


def test_a_failing_batch_is_split_so_only_the_bad_request_fails():
    scorer = FakeScorer()
    splits = []

    class Observer:
        def on_batch(self, *a):
            pass

        def on_load(self, *a):
            pass

        def on_drop(self, *a):
            pass

        def on_split(self):
            splits.append(1)

    batcher = Batcher(scorer, BatcherConfig(max_wait_s=0.2), Observer())
    items = [batcher.submit_score([enc(i + 1, 1)]) for i in range(8)]
    bad = batcher.submit_score([enc(5, POISON)])
    items.insert(3, bad)
    batcher.start()
    for item in items:
        if item is bad:
            with pytest.raises(RuntimeError, match="out of memory"):
                item.future.result(5)
        else:
            assert item.future.result(5)[0].score == float(sum(item.encoded[0].input_ids))
    assert splits, "the failing batch was not split"
    # log2(9) rounds of halving at most: the good items were retried, not dropped.
    assert len(scorer.calls) <= 2 * 9
    batcher.close(5)


def test_inspect_items_go_through_the_same_thread():
    scorer = FakeScorer()
    batcher = Batcher(scorer).start()
    result = batcher.submit_inspect(enc(1, 2, 3)).future.result(5)
    assert result.gating == {"a": 0.7, "b": 0.3} and result.num_tokens == 3
    batcher.close(5)


def test_close_finishes_admitted_work_then_refuses():
    scorer = FakeScorer(delay_s=0.05)
    batcher = Batcher(scorer, BatcherConfig(max_wait_s=0, token_budget=1))
    items = [batcher.submit_score([enc(i)]) for i in range(5)]
    batcher.start()
    assert batcher.close(10) is True
    assert [item.future.result(0)[0].score for item in items] == [float(i) for i in range(5)]
    with pytest.raises(NotReadyError):
        batcher.submit_score([enc(1)])


@pytest.mark.slow
def test_real_scorer_scores_do_not_depend_on_batch_neighbours(embedded_scorer):
    from service_fixtures import short_conversation

    encoded = [embedded_scorer.encode(short_conversation(i)) for i in range(4)]
    offline = [embedded_scorer.score_encoded([e])[0].score for e in encoded]
    batcher = Batcher(embedded_scorer, BatcherConfig(max_wait_s=0.2))
    items = [batcher.submit_score([e]) for e in encoded]
    batcher.start()
    served = [item.future.result(120)[0].score for item in items]
    batcher.close(60)
    assert served == pytest.approx(offline, abs=1e-5)
