"""The HTTP/JSON endpoint (serving/http.py) on a real server on loopback over a tiny random scorer: OpenRLHF's
POST /get_reward called exactly as OpenRLHF calls it, /v1/score in the proto's JSON mapping, and the shared
limits, auth, metrics and drain. Expected values come from the scorer itself, offline, on the original messages."""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.error
import urllib.request

import pytest
import requests  # a dev dependency (pyproject.toml): imported hard, so a broken install fails instead of skipping

from rewardsvc.errors import InvalidInputError
from rewardsvc.integrations.chat_text import ChatTemplateSplitter
from rewardsvc.serving.config import ServerConfig
from rewardsvc.types import AttributeWeights
from service_fixtures import metric_value, start_server, wait_until
from tiny_models import build_tokenizer
from tiny_service import ATTRS, SlowScorer

TOL = 1e-5
CONVERSATIONS = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Name a number."}, {"role": "assistant", "content": "Seven."}],
]  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny):
    running = start_server(tiny, metrics_port=0, http_port=0, max_conversations_per_request=4)
    yield running
    running.stop(0)


def post(port: int, path: str, payload, token: str | None = None, raw: bytes | None = None, method: str = "POST"):
    """(status, JSON body, headers)."""
    data = raw if raw is not None else (None if payload is None else json.dumps(payload).encode())
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read()), reply.headers
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers  # case-insensitive


def openrlhf_request_api_wrapper(url: str, data: dict) -> dict:
    """What OpenRLHF's remote_rm_utils.request_api_wrapper does (requests.post, JSON, 180 s, raise_for_status)."""
    response = requests.post(url=url, json=data, headers={"Content-Type": "application/json"}, timeout=180)
    response.raise_for_status()
    return response.json()


def policy_render(tokenizer, conversation, with_response: bool = True) -> tuple[str, str]:
    """(prompt, query) as OpenRLHF builds them: the prompt through the policy's chat template with the
    generation prompt, the query = prompt + the generated response + EOS."""
    prompt = tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
    return prompt, prompt + conversation[-1]["content"] + tokenizer.eos_token


def test_get_reward_as_openrlhf_calls_it(server, tiny):
    chatml = build_tokenizer("chatml")  # the policy shares the reward backbone's template here
    rendered = [policy_render(chatml, c) for c in CONVERSATIONS]
    url = f"http://127.0.0.1:{server.http_port}/get_reward"
    offline = tiny.score(CONVERSATIONS)
    for body in ({"query": [q for _, q in rendered], "prompts": [p for p, _ in rendered], "labels": ["", ""]},
                 {"query": [q for _, q in rendered]}):  # fmt: skip  # with prompts, and from the template alone
        got = openrlhf_request_api_wrapper(url, body)
        assert got["rewards"] == pytest.approx([r.score for r in offline], abs=TOL)
        assert got["scores"] == pytest.approx([1 / (1 + math.exp(-r)) for r in got["rewards"]], abs=1e-12)  # sigmoid
        assert set(got["extra_logs"]) == {f"{kind}/{a}" for kind in ("reward", "gating", "coefficient") for a in ATTRS} | {"prompt_cut"}
        assert got["extra_logs"]["prompt_cut"] == [0.0, 0.0]
        for a in ATTRS:
            assert got["extra_logs"][f"coefficient/{a}"] == pytest.approx([r.coefficients[a] for r in offline], abs=TOL)
            assert got["extra_logs"][f"reward/{a}"] == pytest.approx([r.rewards[a] for r in offline], abs=TOL)
            assert got["extra_logs"][f"gating/{a}"] == pytest.approx([r.gating[a] for r in offline], abs=TOL)
    assert openrlhf_request_api_wrapper(url, {"query": [], "prompts": [], "labels": []}) == {
        "rewards": [], "scores": [], "extra_logs": {}}  # fmt: skip


def test_get_reward_with_another_policy_template(tiny, tmp_path):
    """A Llama-3-templated policy in front of a ChatML reward model: --http-policy-template names its tokenizer."""
    llama3 = build_tokenizer("llama3")
    llama3.save_pretrained(tmp_path / "policy")
    running = start_server(tiny, http_port=0, http_policy_template=str(tmp_path / "policy"))
    try:
        rendered = [policy_render(llama3, c) for c in CONVERSATIONS]
        status, got, _ = post(running.http_port, "/get_reward", {"query": [q for _, q in rendered]})
        assert status == 200
        assert got["rewards"] == pytest.approx([r.score for r in tiny.score(CONVERSATIONS)], abs=TOL)
    finally:
        running.stop(0)


def test_v1_routes_mirror_the_proto_json_mapping(server, tiny):
    status, got, _ = post(server.http_port, "/v1/score", {
        "conversations": [{"messages": c} for c in CONVERSATIONS], "requestId": "r1",
        "weights": {"mode": "MASK", "values": {ATTRS[0]: 0.0}}})  # fmt: skip
    assert status == 200 and got["request_id"] == "r1" and got["weights_source"] == "mask"
    offline = tiny.score(CONVERSATIONS, AttributeWeights("mask", {ATTRS[0]: 0.0}))
    assert [r["score"] for r in got["results"]] == pytest.approx([r.score for r in offline], abs=TOL)
    assert got["results"][0]["gating"][ATTRS[0]] == 0.0 and got["results"][0]["num_tokens"] == offline[0].num_tokens
    status, group, _ = post(server.http_port, "/v1/score_group", {"prompt": CONVERSATIONS[0][:-1], "responses": ["Red.", "Blue."]})
    assert status == 200 and sorted(group["ranks"]) == [1, 2] and len(group["results"]) == 2
    status, inspected, _ = post(server.http_port, "/v1/inspect_weights", {"prompt": CONVERSATIONS[0][:-1], "top_k": 2})
    assert status == 200 and len(inspected["attributes"]) == 2
    status, info, _ = post(server.http_port, "/v1/model_info", None, method="GET")
    assert status == 200 and info["attributes"] == list(ATTRS) and info["limits"]["max_conversations_per_request"] == 4
    # The scoring plan the model settled on at load (the suite keeps the per-device rule: REWARDSVC_AUTO_PLAN=device).
    assert info["scoring_plan"] == {"batch_plan": "padded", "precision": "float32", "source": "device default",
                                    "reason": "REWARDSVC_AUTO_PLAN=device: no measurement"}  # fmt: skip


def test_errors_name_the_field_and_map_to_http_codes(server):
    port = server.http_port
    status, body, _ = post(port, "/get_reward", None, raw=b"{not json")
    assert status == 400 and body["error"]["field"] == "request" and "not valid JSON" in body["error"]["message"]
    status, body, _ = post(port, "/get_reward", {"query": "no template here"})
    assert status == 400 and body["error"]["field"] == "query[0]" and "no assistant turn" in body["error"]["message"]
    status, body, _ = post(port, "/get_reward", {"prompts": ["x"]})
    assert status == 400 and body["error"]["field"] == "query"
    too_many = {"conversations": [{"messages": CONVERSATIONS[0]}] * 5}
    status, body, _ = post(port, "/v1/score", too_many)
    assert status == 400 and body["error"] == {"code": "INVALID_ARGUMENT", "field": "conversations",
                                               "message": "conversations: 5 conversations, over max_conversations_per_request=4"}  # fmt: skip
    status, body, _ = post(port, "/v1/score", {"conversations": [{"messages": [{"role": "user", "content": "no answer"}]}]})
    assert status == 400 and body["error"]["field"].startswith("conversations[0]")
    status, body, _ = post(port, "/v1/score", {"conversation": []})
    assert status == 400 and "rewardsvc.v1.ScoreRequest" in body["error"]["message"]
    status, body, _ = post(port, "/v1/score", None, raw=b"x" * (ServerConfig().max_message_bytes + 1))
    assert status == 413 and "max_message_bytes" in body["error"]["message"]
    status, body, _ = post(port, "/nope", {})
    assert status == 404
    status, body, headers = post(port, "/get_reward", None, method="GET")
    assert status == 405 and headers["Allow"] == "POST"
    status, body, _ = post(port, "/health", None, method="GET")
    assert status == 200 and body == {"status": "SERVING"}


def test_shares_metrics_with_grpc(server):
    metrics = server.metrics_port
    count = lambda code: metric_value(metrics, "rewardsvc_requests_total", {"method": "HTTP/get_reward", "code": code})  # noqa: E731
    ok, bad = count("OK"), count("INVALID_ARGUMENT")
    post(server.http_port, "/get_reward", {"query": []})
    post(server.http_port, "/get_reward", {"query": [1]})
    assert count("OK") == ok + 1 and count("INVALID_ARGUMENT") == bad + 1
    assert metric_value(metrics, "rewardsvc_scored_conversations_total") > 0


def test_bearer_token(tiny, tmp_path):
    running = start_server(tiny, http_port=0, auth_token="s3cret")
    try:
        status, body, headers = post(running.http_port, "/get_reward", {"query": []})
        assert status == 401 and body["error"]["code"] == "UNAUTHENTICATED" and headers["WWW-Authenticate"] == "Bearer"
        assert post(running.http_port, "/get_reward", {"query": []}, token="wrong")[0] == 401
        assert post(running.http_port, "/get_reward", {"query": []}, token="s3cret")[0] == 200
        assert post(running.http_port, "/health", None, method="GET")[0] == 200  # open, like gRPC health
    finally:
        running.stop(0)


def test_drain_answers_in_flight_http_calls_and_refuses_new_ones(tiny):
    slow = SlowScorer(tiny, delay_s=1.0)
    running = start_server(slow, http_port=0, grace_s=10)
    port, answers = running.http_port, []
    chatml = build_tokenizer("chatml")
    query = policy_render(chatml, CONVERSATIONS[0])[1]
    calls_before = slow.calls
    worker = threading.Thread(target=lambda: answers.append(post(port, "/get_reward", {"query": [query]})))
    worker.start()
    assert wait_until(lambda: running.calls_in_progress == 1 and slow.calls > calls_before, 30)
    stopper = threading.Thread(target=running.stop)
    stopper.start()
    assert wait_until(lambda: post(port, "/health", None, method="GET")[0] == 503, 10)
    assert post(port, "/get_reward", {"query": []})[0] == 503  # refused while draining
    session = requests.Session()  # a kept-alive connection must not hold the stop up
    assert session.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 503
    worker.join(30)
    began = time.monotonic()
    stopper.join(30)
    assert not stopper.is_alive() and time.monotonic() - began < 4
    [(status, body, _)] = answers
    assert status == 200 and body["rewards"] == pytest.approx([tiny.score(CONVERSATIONS[:1])[0].score], abs=TOL)
    with pytest.raises(urllib.error.URLError):  # the port is closed after the stop
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)


def test_splitter_from_templates():
    for template in ("chatml", "llama3"):
        tokenizer = build_tokenizer(template)
        splitter = ChatTemplateSplitter.from_tokenizer(tokenizer)
        for conversation in CONVERSATIONS:
            prompt, query = policy_render(tokenizer, conversation)
            assert splitter.split(query, extra_stops=(tokenizer.eos_token,)) == conversation
            assert splitter.split(query, prompt, extra_stops=(tokenizer.eos_token,)) == conversation
        with pytest.raises(InvalidInputError, match="does not start like the"):
            splitter.split("plain text", field="query[0]")
        with pytest.raises(InvalidInputError, match="no assistant turn") as err:  # not its prompt, and no turn
            splitter.split("abc", "xyz", field="query[3]")
        assert err.value.field == "query[3]"


def test_splitter_without_the_templates_default_system_prompt():
    """A template that injects a default system prompt (as SmolLM2's does): a query rendered without it opens
    its user turn as later user turns open."""
    smol = ChatTemplateSplitter(
        head_user="<|im_start|>system\nYou are SmolLM.<|im_end|>\n<|im_start|>user\n",
        user_assistant="<|im_end|>\n<|im_start|>assistant\n", assistant_user="<|im_end|>\n<|im_start|>user\n",
        tail="<|im_end|>\n", head_system="<|im_start|>system\n", system_user="<|im_end|>\n<|im_start|>user\n",
    )  # fmt: skip
    bare = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>"
    assert smol.split(bare) == CONVERSATIONS[0]
    default = smol.head_user + "Name a colour.<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n"
    assert smol.split(default) == [{"role": "system", "content": "You are SmolLM."}, *CONVERSATIONS[0]]
