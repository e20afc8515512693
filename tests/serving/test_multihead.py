"""Several models in one server (`serve --model NAME=PATH`, repeated), on a real gRPC server on 127.0.0.1:
head sets on one backbone load it once and share one backbone forward per batch (forwards counted with a
forward hook on the real model), each scores as it does served alone, requests choose a model by name, an
unknown name is INVALID_ARGUMENT naming the field, GetModelInfo lists every model."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import grpc
import pytest
import torch

from rewardsvc._proto.rewardsvc.v1 import reward_pb2 as pb
from rewardsvc._proto.rewardsvc.v1 import reward_pb2_grpc as pb_grpc
from rewardsvc.cli.main import build_parser
from rewardsvc.cli.serve import load_models, model_specs
from rewardsvc.client import RewardClient
from rewardsvc.errors import InvalidInputError
from service_fixtures import score_request, start_server
from tiny_models import save_tiny_heads, save_tiny_llama

CONVERSATIONS = [
    [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}, kindly."}]
    for i in range(4)
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_llama_dir):
    """Two head sets on the tiny Llama (a, b) and one on another tiny Llama (c)."""
    root = tmp_path_factory.mktemp("multihead")
    other_backbone = save_tiny_llama(root / "other-llama", seed=7)
    return {
        "a": save_tiny_heads(root / "a", tiny_llama_dir, seed=1),
        "b": save_tiny_heads(root / "b", tiny_llama_dir, seed=2),
        "c": save_tiny_heads(root / "c", other_backbone, seed=3),
    }


def serve_args(*specs: str):
    return build_parser()[0].parse_args(["serve", *[x for spec in specs for x in ("--model", spec)]])


@pytest.fixture(scope="module")
def models(checkpoints):
    return load_models(serve_args(*(f"{name}={path}" for name, path in checkpoints.items())))


@pytest.fixture(scope="module")
def served(models):
    running = start_server(models, http_port=0)
    yield running
    running.stop(0)


@pytest.fixture()
def stub(served):
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        yield pb_grpc.RewardServiceStub(channel)


def scores(response) -> list[float]:
    return [r.score for r in response.results]


def test_head_sets_on_one_backbone_load_it_once(models):
    a, b, c = (models.get(name) for name in ("a", "b", "c"))
    assert a.backbone is b.backbone and a.backbone is not c.backbone
    assert models.default == "a" and models.names == ["a", "b", "c"]
    assert models.forward_key("a") == models.forward_key("b") != models.forward_key("c")


def test_each_head_set_scores_as_it_does_served_alone(stub, checkpoints):
    together = {name: scores(stub.Score(score_request(CONVERSATIONS, model=name))) for name in checkpoints}
    assert len({tuple(s) for s in together.values()}) == 3  # three different models
    for name, path in checkpoints.items():
        alone = start_server(load_models(serve_args(str(path))))
        try:
            with grpc.insecure_channel(f"127.0.0.1:{alone.port}") as channel:
                response = pb_grpc.RewardServiceStub(channel).Score(score_request(CONVERSATIONS))
        finally:
            alone.stop(0)
        torch.testing.assert_close(torch.tensor(together[name]), torch.tensor(scores(response)), atol=1e-5, rtol=0)


def test_responses_say_which_model_answered(stub, models):
    response = stub.Score(score_request(CONVERSATIONS[:1], model="b"))
    assert response.model == "b" and response.model_id == models.get("b").model_id
    assert stub.Score(score_request(CONVERSATIONS[:1])).model == "a"  # empty = the default
    group = stub.ScoreGroup(pb.ScoreGroupRequest(prompt=[pb.Message(role="user", content="Hi")], responses=["x", "y"], model="c"))
    assert group.model == "c"
    pair = pb.ComparePair(prompt=[pb.Message(role="user", content="Hi")], chosen="Hello!", rejected="Go away.")
    assert stub.Compare(pb.CompareRequest(pairs=[pair], model="b")).model == "b"
    inspect = stub.InspectWeights(pb.InspectWeightsRequest(prompt=[pb.Message(role="user", content="Hi")], model="c"))
    assert inspect.model == "c"


def test_an_unknown_model_is_invalid_argument_naming_the_field(stub):
    for call in (
        lambda: stub.Score(score_request(CONVERSATIONS[:1], model="nope")),
        lambda: stub.InspectWeights(pb.InspectWeightsRequest(prompt=[pb.Message(role="user", content="Hi")], model="nope")),
        lambda: stub.GetModelInfo(pb.GetModelInfoRequest(model="nope")),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "model: unknown model 'nope'" in err.value.details() and "['a', 'b', 'c']" in err.value.details()
        assert ("rewardsvc-field", "model") in tuple(err.value.trailing_metadata())


def test_get_model_info_lists_every_model(stub, models):
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.name == "a" and [m.name for m in info.models] == ["a", "b", "c"]
    assert [m.is_default for m in info.models] == [True, False, False]
    assert info.models[2].backbone == models.get("c").backbone_description()
    described = stub.GetModelInfo(pb.GetModelInfoRequest(model="c"))
    assert described.name == "c" and described.backbone == models.get("c").backbone_description()


def test_the_client_chooses_a_model(served, stub):
    with RewardClient(f"127.0.0.1:{served.port}", model="b") as client:
        got = [r.score for r in client.score(CONVERSATIONS[:2])]
        assert [m["name"] for m in client.model_info()["models"]] == ["a", "b", "c"]
    assert got == scores(stub.Score(score_request(CONVERSATIONS[:2], model="b")))


def test_two_head_sets_share_one_backbone_forward_per_batch(served, stub, models):
    """Requests for a and b queued together (the batcher is held inside a forward of model c's backbone while
    they arrive) form one batch: one forward of the shared backbone serves both head sets."""
    forwards = {"a": 0, "c": 0}
    release, holding = threading.Event(), threading.Event()

    def count(_module, _args, _out):
        forwards["a"] += 1

    def hold(_module, _args):
        forwards["c"] += 1
        holding.set()
        release.wait(30)

    shared_model, other_model = models.get("a").backbone.model, models.get("c").backbone.model
    hooks = [shared_model.register_forward_hook(count), other_model.register_forward_pre_hook(hold)]
    try:
        results = {}
        blocker = threading.Thread(target=lambda: stub.Score(score_request(CONVERSATIONS[:1], model="c")))
        blocker.start()
        assert holding.wait(30)
        threads = [
            threading.Thread(target=lambda n=name: results.__setitem__(n, stub.Score(score_request(CONVERSATIONS, model=n))))
            for name in ("a", "b")
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while served.batcher.queue_depth < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert served.batcher.queue_depth == 2
        release.set()
        for t in threads + [blocker]:
            t.join(30)
    finally:
        release.set()
        for h in hooks:
            h.remove()
    assert forwards == {"a": 1, "c": 1}  # 4 conversations for a + the same 4 for b: one forward
    assert results["a"].model == "a" and results["b"].model == "b"
    assert scores(results["a"]) == scores(stub.Score(score_request(CONVERSATIONS, model="a")))
    assert scores(results["b"]) == scores(stub.Score(score_request(CONVERSATIONS, model="b")))


def test_http_lists_every_model_and_classify_chooses_one(served, stub):
    base = f"http://127.0.0.1:{served.http_port}"
    with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as reply:
        assert [card["id"] for card in json.load(reply)["data"]] == ["a", "b", "c"]
    body = json.dumps({"model": "b", "messages": CONVERSATIONS[0], "use_activation": False}).encode()  # the raw score
    request = urllib.request.Request(f"{base}/classify", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        answer = json.load(reply)
    assert answer["model"] == "b"
    expected = stub.Score(score_request(CONVERSATIONS[:1], model="b")).results[0].score
    assert abs(answer["data"][0]["probs"][0] - expected) <= 1e-5


def test_model_flags_parse(tmp_path):
    assert model_specs(None) == [(None, None)]
    assert model_specs(["a=/x/y", "/x/z", "owner/name"]) == [("a", "/x/y"), (None, "/x/z"), (None, "owner/name")]
    odd = tmp_path / "dir=with-equals"
    odd.mkdir()
    assert model_specs([str(odd)]) == [(None, str(odd))]
    for bad in ("a=", "=path"):
        with pytest.raises(InvalidInputError, match="NAME=PATH"):
            model_specs([bad])


def test_duplicate_and_malformed_names_are_refused(checkpoints):
    with pytest.raises(InvalidInputError, match="given twice"):
        load_models(serve_args(f"a={checkpoints['a']}", f"a={checkpoints['b']}"))
    with pytest.raises(InvalidInputError, match="model name"):
        load_models(serve_args(f"bad name={checkpoints['a']}"))
