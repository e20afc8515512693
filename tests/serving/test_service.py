"""The data plane (RewardService) with its batcher over the tiny scorer: the same answers as the scorer
offline, limits that name the field and the limit, group / pairwise maths, inspection, deadlines."""

from __future__ import annotations

import math
import time

import pytest

from rewardsvc import __version__
from rewardsvc.config import Limits
from rewardsvc.errors import DeadlineExceededError, InvalidConversationError, InvalidInputError, NotReadyError
from rewardsvc.serving.batching import Batcher
from rewardsvc.serving.service import CallContext, RewardService
from rewardsvc.types import group_statistics, sigmoid
from rewardsvc.types import AttributeWeights
from tiny_models import TINY_ATTRIBUTES

PROMPT = [{"role": "user", "content": "Name a colour."}]
RESPONSES = ["Red.", "Seven.", "Blue, the colour of the sea."]


def conversation(response: str) -> list[dict[str, str]]:
    return [*PROMPT, {"role": "assistant", "content": response}]


@pytest.fixture(scope="module")
def service(tiny_scorer):
    service = RewardService(Limits(max_conversations_per_request=4, max_group_size=3, max_message_bytes=1000))
    batcher = Batcher(tiny_scorer).start()
    service.attach(tiny_scorer, batcher)
    yield service
    batcher.close(timeout=5)


def test_not_ready_until_attached():
    service = RewardService()
    assert not service.ready and service.model_id == ""
    with pytest.raises(NotReadyError):
        service.score([conversation("Red.")], None)
    with pytest.raises(NotReadyError):
        service.model_info()


def test_scores_equal_the_scorer_offline(service, tiny_scorer):
    conversations = [conversation(r) for r in RESPONSES]
    served = service.score(conversations, None)
    offline = tiny_scorer.score(conversations)
    assert [r.score for r in served] == pytest.approx([r.score for r in offline], abs=1e-5)
    assert served[0].model_id == "tiny" and served[0].weights_source == "gating"
    assert service.score([], None) == []


def test_steering_reaches_the_scorer(service, tiny_scorer):
    weights = AttributeWeights("override", {"safe": 1.0})
    [served] = service.score([conversation("Red.")], weights)
    [offline] = tiny_scorer.score([conversation("Red.")], weights)
    assert served.weights_source == "override" and served.gating == offline.gating
    with pytest.raises(InvalidInputError, match="unknown attributes") as info:
        service.score([conversation("Red.")], AttributeWeights("mask", {"nope": 0.0}))
    assert info.value.field == "weights.values"


def test_limits_name_the_field_and_the_limit(service, tiny_scorer):
    with pytest.raises(InvalidInputError, match="conversations: 5 conversations, over max_conversations_per_request=4"):
        service.score([conversation("Red.")] * 5, None)
    with pytest.raises(InvalidInputError, match=r"pairs: 3 pairs \(6 conversations\), over max_conversations_per_request=4"):
        service.compare([(PROMPT, "a", "b")] * 3, None)
    with pytest.raises(InvalidInputError, match="responses: 4 responses, over max_group_size=3"):
        service.score_group(PROMPT, ["a"] * 4, None)
    with pytest.raises(InvalidInputError, match="request: 1001 bytes, over max_message_bytes=1000") as info:
        service.check_message_bytes(1001)
    assert info.value.field == "request"
    # attach() takes the per-conversation token limit from the scorer it serves.
    assert service.limits.max_tokens_per_conversation == tiny_scorer.config.max_tokens


def test_malformed_input_names_the_field(service):
    with pytest.raises(InvalidConversationError, match=r"conversations\[1\]") as info:
        service.score([conversation("Red."), [{"role": "user", "content": "no response"}]], None)
    assert info.value.field == "conversations[1]"
    with pytest.raises(InvalidInputError, match="at least one response"):
        service.score_group(PROMPT, [], None)
    with pytest.raises(InvalidConversationError, match=r"responses\[0\]"):
        service.score_group(PROMPT, [{"role": "user", "content": "not the assistant"}], None)


def test_group_statistics_and_scores(service, tiny_scorer):
    group = service.score_group(PROMPT, RESPONSES, None)
    offline = [r.score for r in tiny_scorer.score([conversation(r) for r in RESPONSES])]
    assert group.scores == pytest.approx(offline, abs=1e-5)
    mean, std, ranks = group_statistics(group.scores)
    assert (group.mean, group.std, group.ranks) == (mean, std, ranks)
    assert sorted(group.ranks) == [1, 2, 3] and group.scores[group.ranks.index(1)] == max(group.scores)


def test_group_statistics_function():
    assert group_statistics([]) == (0.0, 0.0, [])
    assert group_statistics([2.0]) == (2.0, 0.0, [1])
    mean, std, ranks = group_statistics([1.0, 3.0, 3.0])
    assert mean == pytest.approx(7 / 3) and std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + 2 * (3 - 7 / 3) ** 2) / 2))
    assert ranks == [3, 1, 2]  # ties broken by position


def test_compare_is_the_sigmoid_of_the_margin(service):
    [result] = service.compare([("Name a colour.", "Red.", "Seven.")], None)
    assert result.p_chosen == pytest.approx(sigmoid(result.score_chosen - result.score_rejected))
    assert result.chosen.score == result.score_chosen and result.rejected.score == result.score_rejected
    with pytest.raises(InvalidInputError, match="at least one pair") as info:
        service.compare([], None)
    assert info.value.field == "pairs"
    assert sigmoid(-1000.0) == 0.0 and sigmoid(1000.0) == 1.0 and sigmoid(0.0) == 0.5


def test_inspect_sorts_and_cuts(service, tiny_scorer):
    everything = service.inspect(PROMPT, None)
    offline = tiny_scorer.inspect(PROMPT)
    assert set(everything.gating) == set(TINY_ATTRIBUTES)
    weights = list(everything.gating.values())
    assert weights == sorted(weights, reverse=True)
    assert everything.gating == pytest.approx(offline.gating, abs=1e-6)
    top = service.inspect(PROMPT, None, top_k=1)
    assert list(top.gating) == list(everything.gating)[:1] and list(top.coefficients) == list(top.gating)
    with pytest.raises(InvalidInputError, match="top_k") as info:
        service.inspect(PROMPT, None, top_k=-1)
    assert info.value.field == "top_k"


def test_a_passed_deadline_is_deadline_exceeded(service):
    with pytest.raises(DeadlineExceededError):
        service.score([conversation("Red.")], None, CallContext(deadline=time.monotonic() - 1))


def test_cancel_callback_is_registered(service):
    registered = []
    service.score([conversation("Red.")], None, CallContext(on_cancel=registered.append))
    assert len(registered) == 1 and callable(registered[0])


def test_model_info_carries_the_limits_and_version(service, tiny_scorer):
    info = service.model_info()
    assert info["model_id"] == "tiny" and info["attributes"] == list(TINY_ATTRIBUTES)
    assert info["server_version"] == __version__ and info["metrics"] == {}
    assert info["limits"] == Limits(max_conversations_per_request=4, max_group_size=3, max_message_bytes=1000,
                                    max_tokens_per_conversation=tiny_scorer.config.max_tokens)  # fmt: skip
