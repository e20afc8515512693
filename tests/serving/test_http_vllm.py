"""vLLM's pooling protocol (vLLM 0.34.0: vllm/entrypoints/pooling/{base,classify,pooling}/protocol.py and
serve/engine/protocol.py for ModelList / UsageInfo / ErrorResponse) on a real server on loopback, called with
the bodies vLLM documents for a reward model served with `--runner pooling`. Expected values: gRPC Score."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import pytest

from rewardsvc.client import RewardClient
from service_fixtures import start_server
from tiny_models import build_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Name a number."}, {"role": "assistant", "content": "Seven."}],
]  # fmt: skip
TOL = 1e-5


@pytest.fixture(scope="module")
def server(tiny):
    running = start_server(tiny, http_port=0)
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def expected(server):
    with RewardClient(f"127.0.0.1:{server.port}") as client:
        return [r.score for r in client.score(CONVERSATIONS)]


def call(port: int, path: str, body=None, method: str = "POST") -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_classify_text_in_the_reward_models_template(server, tiny, expected):
    chatml = build_tokenizer("chatml")  # the tiny backbone's own template
    texts = [chatml.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]
    model = server.service.model_id
    status, body = call(server.http_port, "/classify", {"model": model, "input": texts[1], "use_activation": False})
    assert status == 200 and body["data"][-1]["probs"][-1] == pytest.approx(expected[1], abs=TOL)
    status, body = call(server.http_port, "/classify", {"model": model, "input": texts})
    assert status == 200 and body["object"] == "list" and body["model"] == model and body["id"].startswith("classify-")
    assert [d["index"] for d in body["data"]] == [0, 1] and all(d["num_classes"] == 1 and d["label"] for d in body["data"])
    assert [d["probs"][0] for d in body["data"]] == pytest.approx([sigmoid(s) for s in expected], abs=TOL)
    tokens = sum(r.num_tokens for r in tiny.score(CONVERSATIONS))
    assert body["usage"]["prompt_tokens"] == tokens == body["usage"]["total_tokens"]
    ids = chatml(texts[0], add_special_tokens=False)["input_ids"]  # token-id input
    status, body = call(server.http_port, "/classify", {"input": ids, "use_activation": False, "add_special_tokens": False})
    assert status == 200 and body["data"][0]["probs"] == pytest.approx([expected[0]], abs=TOL)


def test_classify_and_pooling_with_messages(server, expected):
    status, body = call(server.http_port, "/classify", {"messages": CONVERSATIONS[1], "use_activation": False})
    assert status == 200 and body["data"][0]["probs"] == pytest.approx([expected[1]], abs=TOL)
    status, body = call(server.http_port, "/pooling", {"model": server.service.model_id, "messages": CONVERSATIONS[0]})
    assert status == 200 and body["id"].startswith("pool-") and body["data"][0]["object"] == "pooling"
    assert body["data"][0]["data"] == pytest.approx([sigmoid(expected[0])], abs=TOL)
    chatml = build_tokenizer("chatml")
    text = chatml.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    status, body = call(server.http_port, "/pooling", {"input": [text], "task": "classify", "use_activation": False})
    assert status == 200 and body["data"][0]["data"] == pytest.approx([expected[0]], abs=TOL)


def test_models_lists_what_the_service_serves(server):
    status, body = call(server.http_port, "/v1/models", method="GET")
    assert status == 200 and body["object"] == "list"
    assert [card["id"] for card in body["data"]] == server.service.model_ids == [server.service.model_id]
    card = body["data"][0]
    assert card["object"] == "model" and card["owned_by"] == "rewardsvc" and card["max_model_len"] == 256


def test_errors_have_vllms_shape_and_name_the_field(server):
    status, body = call(server.http_port, "/classify", {"model": "no-such-model", "input": "x"})
    assert status == 404 and body["error"]["type"] == "NotFoundError" and body["error"]["code"] == 404
    assert body["error"]["param"] == "model"
    for bad, field in (({"input": "x", "truncate_prompt_tokens": 8}, "truncate_prompt_tokens"),
                       ({"input": 3}, "input"), ({"input": "x", "messages": []}, "input"),
                       ({"messages": CONVERSATIONS[0], "use_activation": "yes"}, "use_activation"),
                       ({"input": "plain text, no template"}, "input[0]")):  # fmt: skip
        status, body = call(server.http_port, "/classify", bad)
        assert status == 400 and body["error"]["param"] == field and body["error"]["type"] == "BadRequestError", (bad, body)
    status, body = call(server.http_port, "/pooling", {"input": "x", "task": "embed"})
    assert status == 400 and body["error"]["param"] == "task"
    status, body = call(server.http_port, "/classify", None, method="GET")
    assert status == 405 and body["error"]["code"] == 405
