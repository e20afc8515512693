"""The Python client (sync and asyncio) and its TRL adapter against a real server."""

from __future__ import annotations

import asyncio
import math
import threading

import grpc
import pytest

from rewardsvc._proto.rewardsvc.v1 import reward_pb2_grpc as pb_grpc
from rewardsvc.client import (
    AsyncRewardClient,
    ClientTLS,
    CompareResult,
    GroupResult,
    RetryPolicy,
    RewardClient,
    StreamResult,
)
from rewardsvc.errors import DeadlineExceededError, InvalidInputError, UnauthenticatedError
from rewardsvc.types import InspectResult, ScoreResult
from rewardsvc.serving.config import ServerConfig
from rewardsvc.serving.server import build_server
from service_fixtures import (  # noqa: F401  (fixtures)
    long_conversation,
    make_certs,
    metric_value,
    score_request,
    served,
    settled_requests,
    short_conversation,
    start_server,
    wait_until,
)

pytestmark = pytest.mark.slow
TOL = 1e-5
PROMPT = [{"role": "system", "content": ""}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture()
def client(served):
    with RewardClient(f"127.0.0.1:{served.port}", timeout=300) as c:
        yield c


def test_typed_results_for_every_call(client, embedded_scorer):
    conversation = short_conversation(3)
    [result] = client.score([conversation])
    assert isinstance(result, ScoreResult)
    assert result.score == pytest.approx(embedded_scorer.score([conversation])[0].score, abs=TOL)
    assert set(result.rewards) == set(embedded_scorer.attributes) and result.weights_source == "gating"

    steered = client.score([conversation], {"mode": "mask", "values": {embedded_scorer.attributes[0]: 0.0}})
    assert steered[0].weights_source == "mask" and steered[0].gating[embedded_scorer.attributes[0]] == 0.0

    group = client.score_group("Name a colour.", ["Red.", {"role": "assistant", "content": "Seven."}])
    assert isinstance(group, GroupResult) and len(group.results) == 2 and sorted(group.ranks) == [1, 2]
    assert group.mean == pytest.approx(sum(group.scores) / 2)

    [pair] = client.compare([{"prompt": PROMPT, "chosen": "Red.", "rejected": "Seven."}])
    assert isinstance(pair, CompareResult)
    assert pair.p_chosen == pytest.approx(1 / (1 + math.exp(pair.score_rejected - pair.score_chosen)))

    inspected = client.inspect(PROMPT, top_k=4)
    assert isinstance(inspected, InspectResult) and len(inspected.gating) == 4
    assert list(inspected.gating.values()) == sorted(inspected.gating.values(), reverse=True)

    info = client.model_info()
    assert info["attributes"] == list(embedded_scorer.attributes) and info["limits"]["max_group_size"] == 256
    assert client.health() == "SERVING" and client.health("") == "SERVING"


def test_score_stream(client, embedded_scorer):
    requests = [("a", [short_conversation(1)]), ("b", [[{"role": "user", "content": "no answer"}]]), ("c", [short_conversation(2)])]
    results = {r.request_id: r for r in client.score_stream(iter(requests))}
    assert set(results) == {"a", "b", "c"} and all(isinstance(r, StreamResult) for r in results.values())
    assert isinstance(results["b"].error, InvalidInputError) and results["b"].error.code == "INVALID_ARGUMENT"
    assert results["a"].results[0].score == pytest.approx(embedded_scorer.score([short_conversation(1)])[0].score, abs=TOL)


def test_typed_errors(client):
    with pytest.raises(InvalidInputError) as info:
        client.score([short_conversation(0), [{"role": "user", "content": "no answer"}]])
    assert info.value.code == "INVALID_ARGUMENT" and info.value.field == "conversations[1]"
    with pytest.raises(DeadlineExceededError):
        client.score([long_conversation(i) for i in range(8)], timeout=0.05)  # seconds of compute on any CPU


def test_retries_resource_exhausted_after_the_hint(embedded_scorer):
    running = start_server(embedded_scorer, max_tokens_in_flight=100, max_tokens_per_conversation=64, metrics_port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            first = pb_grpc.RewardServiceStub(channel).Score.future(
                score_request([short_conversation(i) for i in range(4)]), timeout=300
            )
            assert wait_until(lambda: running.batcher.tokens_in_flight > 0, timeout=60)
            with RewardClient(f"127.0.0.1:{running.port}", timeout=300, retry=RetryPolicy(max_attempts=50)) as client:
                results = client.score([short_conversation(8), short_conversation(9)])
            assert len(results) == 2 and len(first.result().results) == 4
        refused = metric_value(running.metrics_port, "rewardsvc_requests_total", {"code": "RESOURCE_EXHAUSTED"})
        assert refused >= 1, "the retry path was not exercised"
    finally:
        running.stop(0)


def test_retries_unavailable_while_the_model_loads(embedded_scorer):
    release = threading.Event()

    def loader():
        release.wait(30)
        return embedded_scorer

    running = build_server(loader, ServerConfig(port=0, grace_s=5), wait_ready=False)
    try:
        with RewardClient(f"dns:///localhost:{running.port}", timeout=120, retry=RetryPolicy(max_attempts=100, max_backoff_s=0.2)) as client:
            assert client.health() == "NOT_SERVING"
            threading.Timer(0.5, release.set).start()
            info = client.model_info()  # UNAVAILABLE ("still loading") until the load ends, then answered
            assert info["model_id"] == embedded_scorer.model_id
            assert running.wait_ready(60) and client.health() == "SERVING"
    finally:
        release.set()
        running.stop(0)


def test_async_client(served, embedded_scorer):
    async def main():
        async with AsyncRewardClient(f"127.0.0.1:{served.port}", timeout=300) as client:
            scores, group, pairs, inspected, info, health = await asyncio.gather(
                client.score([short_conversation(4)]),
                client.score_group(PROMPT, ["Red.", "Blue."]),
                client.compare([(PROMPT, "Red.", "Seven.")]),
                client.inspect("Name a colour.", top_k=2),
                client.model_info(),
                client.health(),
            )
            with pytest.raises(InvalidInputError):
                await client.score([[{"role": "user", "content": "no answer"}]])
            return scores, group, pairs, inspected, info, health

    scores, group, pairs, inspected, info, health = asyncio.run(main())
    assert scores[0].score == pytest.approx(embedded_scorer.score([short_conversation(4)])[0].score, abs=TOL)
    assert len(group.results) == 2 and 0 < pairs[0].p_chosen < 1 and len(inspected.gating) == 2
    assert info["model_id"] == embedded_scorer.model_id and health == "SERVING"


def test_trl_reward_funcs_share_one_rpc_per_batch(client, served, embedded_scorer):
    attribute = embedded_scorer.attributes[0]
    score_func, attribute_func = client.trl_reward_funcs([None, attribute])
    assert score_func.__name__ == "rewardsvc_score" and attribute_func.__name__ == f"rewardsvc_{attribute}"
    prompts = [PROMPT, PROMPT, [{"role": "user", "content": "Hi"}]]  # G completions of one prompt are contiguous
    completions = [[{"role": "assistant", "content": "Red."}], [{"role": "assistant", "content": "Seven."}],
                   [{"role": "assistant", "content": "Hello!"}]]  # fmt: skip
    before = settled_requests(served.metrics_port, {"method": "Score"})
    scores = score_func(prompts=prompts, completions=completions, completion_ids=None, trainer_state=None)
    attribute_values = attribute_func(prompts=prompts, completions=completions)
    assert settled_requests(served.metrics_port, {"method": "Score"}) == before + 1
    offline = embedded_scorer.score([p + c for p, c in zip(prompts, completions)])
    assert scores == pytest.approx([r.score for r in offline], abs=TOL)
    assert attribute_values == pytest.approx([r.rewards[attribute] for r in offline], abs=TOL)
    assert all(isinstance(x, float) for x in scores)


def test_trl_reward_func_with_plain_strings(client, embedded_scorer):
    reward_func = client.trl_reward_func()
    scores = reward_func(["Name a colour."], ["Red."])
    want = embedded_scorer.score([[{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]])
    assert scores == pytest.approx([want[0].score], abs=TOL)


def test_client_over_mutual_tls_with_a_token(embedded_scorer, tmp_path):
    certs = make_certs(tmp_path)
    running = start_server(embedded_scorer, auth_token="tok", tls_cert=str(certs["server_cert"]),
                           tls_key=str(certs["server_key"]), tls_client_ca=str(certs["ca"]))  # fmt: skip
    tls = ClientTLS(root_certificates=str(certs["ca"]), certificate_chain=str(certs["client_cert"]),
                    private_key=str(certs["client_key"]))  # fmt: skip
    try:
        with RewardClient(f"localhost:{running.port}", token="tok", tls=tls, timeout=30) as client:
            assert client.model_info()["model_id"] == embedded_scorer.model_id
        with RewardClient(f"localhost:{running.port}", tls=tls, timeout=30) as client:
            with pytest.raises(UnauthenticatedError):
                client.model_info()
            assert client.health() == "SERVING"
    finally:
        running.stop(0)
