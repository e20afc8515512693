"""The Ray Serve deployment (rewardsvc.serving.ray_serve) on a local Ray (ray.init(num_cpus=2), once for the
module), tiny random Llama: /v1/score and /get_reward (as OpenRLHF posts it) through Ray Serve's HTTP ingress,
Score through Ray Serve's gRPC proxy, scores equal to the library's own; an in-flight call survives the
application's deletion (the replica drains) and the route is gone after it; a caller that hangs up cancels its
call in the replica."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'rewardsvc[ray]'); CI installs it")
serve = pytest.importorskip("ray.serve")

import grpc  # noqa: E402

from rewardsvc._proto.rewardsvc.v1 import reward_pb2_grpc as pb_grpc  # noqa: E402
from rewardsvc.config import ScorerConfig  # noqa: E402
from rewardsvc.model.scorer import Scorer  # noqa: E402
from rewardsvc.serving.ray_serve import GRPC_SERVICER_FUNCTIONS, reward_app  # noqa: E402
from local_ray import start_local_ray  # noqa: E402
from service_fixtures import metric_value, score_request, wait_until  # noqa: E402
from tiny_models import build_tokenizer, save_tiny_heads  # noqa: E402

pytestmark = pytest.mark.ray

TOL = 1e-5
WAIT_MS = 1000  # the batcher waits this long for company: every call is in flight for about a second
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "Write a haiku about the sea."}, {"role": "assistant", "content": "Waves fold into foam."}],
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def heads_dir(tiny_llama_dir, tmp_path_factory):
    return save_tiny_heads(tmp_path_factory.mktemp("serve-heads"), tiny_llama_dir)


@pytest.fixture(scope="module")
def offline(heads_dir):
    return Scorer.load(heads_dir, config=ScorerConfig()).score(CONVERSATIONS)


@pytest.fixture(scope="module")
def ports(heads_dir):
    from ray.serve.config import gRPCOptions

    start_local_ray(configure_logging=False)
    http_port, grpc_port = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS))  # fmt: skip
    app = reward_app(str(heads_dir), server_options={"max_wait_ms": WAIT_MS, "grace_s": 10.0},
                     ray_actor_options={"num_cpus": 1})  # fmt: skip
    serve.run(app, name="rewardsvc", route_prefix="/")
    yield http_port, grpc_port
    serve.shutdown()
    ray.shutdown()


def post(port: int, path: str, payload) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as err:
        body = err.read()
        try:
            return err.code, json.loads(body)
        except ValueError:  # Ray Serve's own refusals (no application on the route) are plain text
            return err.code, {"text": body.decode(errors="replace")}


def test_v1_score_through_the_http_ingress(ports, offline):
    status, got = post(ports[0], "/v1/score", {"conversations": [{"messages": c} for c in CONVERSATIONS]})
    assert status == 200, got
    assert [r["score"] for r in got["results"]] == pytest.approx([r.score for r in offline], abs=TOL)
    assert got["results"][0]["rewards"] == pytest.approx(offline[0].rewards, abs=TOL)
    status, bad = post(ports[0], "/v1/score", {"conversations": [{"messages": CONVERSATIONS[0][:1]}]})
    assert status == 400 and bad["error"]["field"].startswith("conversations[0]")  # the server's own errors


def test_get_reward_as_openrlhf_posts_it(ports, offline):
    chatml = build_tokenizer("chatml")  # the policy shares the tiny reward backbone's template
    prompts = [chatml.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True) for c in CONVERSATIONS]
    queries = [p + c[-1]["content"] + chatml.eos_token for p, c in zip(prompts, CONVERSATIONS)]
    status, got = post(ports[0], "/get_reward", {"query": queries, "prompts": prompts, "labels": ["", ""]})
    assert status == 200, got
    assert got["rewards"] == pytest.approx([r.score for r in offline], abs=TOL)


def test_score_through_the_grpc_proxy(ports, offline):
    with grpc.insecure_channel(f"127.0.0.1:{ports[1]}") as channel:
        stub = pb_grpc.RewardServiceStub(channel)
        response = stub.Score(score_request(CONVERSATIONS), metadata=(("application", "rewardsvc"),), timeout=60)
        assert [r.score for r in response.results] == pytest.approx([r.score for r in offline], abs=TOL)
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(score_request([CONVERSATIONS[0][:1]]), metadata=(("application", "rewardsvc"),), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "conversations[0]" in err.value.details()


def test_the_config_file_is_a_valid_serve_config():
    """deploy/ray/serve.yaml against Ray Serve's own schema, and its application builder with its args."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from rewardsvc.serving.ray_serve import build_app

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy/ray/serve.yaml").read_text())
    schema = ServeDeploySchema.parse_obj(config)
    (app,) = schema.applications
    assert app.import_path == "rewardsvc.serving.ray_serve:build_app"
    assert config["grpc_options"]["grpc_servicer_functions"] == GRPC_SERVICER_FUNCTIONS
    assert build_app(app.args) is not None  # binds (loads nothing until deployed)
    with pytest.raises(Exception, match="unknown key"):
        build_app({"modle": "x"})


def in_progress(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('rewardsvc_requests_in_progress{method="HTTP/v1/score"}'))  # fmt: skip


def test_a_caller_that_hangs_up_cancels_the_call_in_the_replica(ports):
    """Ray Serve's proxy cancels the replica's handler when its client disconnects; the forward then closes its
    loopback connection, so the replica's own server cancels the call (as for a caller of `rewardsvc serve`).

    The hang-up must reach the replica within the batcher's wait (WAIT_MS, at most the server's 1 s limit). On a
    heavily loaded machine one try can miss that window and the call ends OK, so up to five tries: the claim is
    that a hang-up propagates at all, and a call never ends any other way."""
    labels = {code: {"method": "HTTP/v1/score", "code": code} for code in ("OK", "CANCELLED")}
    before = {code: metric_value(ports[0], "rewardsvc_requests_total", l) for code, l in labels.items()}
    raw = json.dumps({"conversations": [{"messages": CONVERSATIONS[1]}]}).encode()
    for attempt in range(1, 6):
        with socket.create_connection(("127.0.0.1", ports[0]), timeout=10) as leaver:
            leaver.sendall(f"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)  # fmt: skip
            assert wait_until(lambda: in_progress(ports[0]) >= 1, 60, 0.02), "the call never reached the replica"
        # closed while the batcher still waits for company; the call then ends, one way or the other
        ended = lambda: sum(metric_value(ports[0], "rewardsvc_requests_total", l) for l in labels.values())  # noqa: E731
        assert wait_until(lambda: ended() == sum(before.values()) + attempt and in_progress(ports[0]) == 0, 60, 0.1)
        if metric_value(ports[0], "rewardsvc_requests_total", labels["CANCELLED"]) > before["CANCELLED"]:
            break
    assert metric_value(ports[0], "rewardsvc_requests_total", labels["CANCELLED"]) == before["CANCELLED"] + 1, attempt


def test_deleting_the_app_drains_the_call_in_flight(ports, offline):
    """Last in the module: it deletes the application."""
    outcome: dict = {}

    def call() -> None:
        outcome["status"], outcome["body"] = post(ports[0], "/v1/score", {"conversations": [{"messages": CONVERSATIONS[0]}]})

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 60
    while in_progress(ports[0]) < 1 and "status" not in outcome:
        assert time.monotonic() < deadline, "the call never reached the replica"
        time.sleep(0.02)
    serve.delete("rewardsvc")  # returns once the replica is gone
    caller.join(60)
    assert outcome["status"] == 200, outcome
    assert outcome["body"]["results"][0]["score"] == pytest.approx(offline[0].score, abs=TOL)
    status, _ = post(ports[0], "/v1/score", {"conversations": [{"messages": CONVERSATIONS[0]}]})
    assert status in (404, 503)  # no application behind the route any more
