"""Reward normalization over a real gRPC server on loopback (the tiny random model, calibrated here with
`rewardsvc calibrate`): normalized = (raw - mean) / std, clipped when asked, raw values kept; the server
default and a request's own choice; clear errors naming the field on an uncalibrated model or with steering;
the same through the client, the HTTP /v1 JSON mapping and `rewardsvc score --normalize`."""

from __future__ import annotations

import json
import urllib.request

import grpc
import pytest

from rewardsvc._proto.rewardsvc.v1 import reward_pb2 as pb
from rewardsvc._proto.rewardsvc.v1 import reward_pb2_grpc as pb_grpc
from rewardsvc.cli import main as cli
from rewardsvc.cli.batch_io import read_output
from rewardsvc.client import RewardClient
from rewardsvc.config import ScorerConfig
from rewardsvc.errors import InvalidInputError
from rewardsvc.model.calibration import CALIBRATION_FILE, read_calibration
from rewardsvc.model.scorer import Scorer
from rewardsvc.normalization import Normalization
from service_fixtures import pb_conversation, score_request, start_server
from tiny_models import TINY_ATTRIBUTES, build_tokenizer, save_tiny_heads

REFERENCE = [{"id": f"r{i}", "prompt": f"Question {i % 4}?", "response": text}
             for i, text in enumerate(["Paris.", "Berlin is the capital of France.", "I cannot help with that.",
                                       "Sure: " * 6, "42", "Use sorted(items).", "No.", "Waves fold into foam.",
                                       "The answer is blue.", "Maybe, maybe not."])]  # fmt: skip
CONVERSATIONS = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sea on a clear day."}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "No."}],
]


@pytest.fixture(scope="module")
def calibrated(tiny_llama_dir, tmp_path_factory):
    """(calibrated heads dir, its Calibration, an uncalibrated heads dir)."""
    root = tmp_path_factory.mktemp("normalize")
    heads = save_tiny_heads(root / "calibrated", tiny_llama_dir)
    reference = root / "reference.jsonl"
    reference.write_text("".join(json.dumps(r) + "\n" for r in REFERENCE))
    assert cli.main(["calibrate", str(reference), "--model", str(heads)]) == 0
    calibration, _ = read_calibration(heads / CALIBRATION_FILE)
    return heads, calibration, save_tiny_heads(root / "raw", tiny_llama_dir)


@pytest.fixture(scope="module")
def servers(calibrated):
    """Three servers on loopback: no default, a default with clip 1.0, and an uncalibrated model."""
    heads, _, raw = calibrated
    plain = start_server(Scorer.load(heads, config=ScorerConfig()), http_port=0)
    default = start_server(Scorer.load(heads, config=ScorerConfig()), normalize=True, normalize_clip=1.0, http_port=0)
    uncalibrated = start_server(Scorer.load(raw, config=ScorerConfig()))
    yield plain, default, uncalibrated
    for s in (plain, default, uncalibrated):
        s.stop(0)


def stub_of(running):
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    return channel, pb_grpc.RewardServiceStub(channel)


def z(value, stats, clip=None):
    out = (value - stats.mean) / stats.std
    return out if clip is None else max(-clip, min(clip, out))


def check_normalized(result, calibration, clip=None):
    """result: a pb.ScoreResult; its normalized values against its own raw ones."""
    assert result.HasField("normalized")
    n = result.normalized
    assert n.calibration_id == calibration.calibration_id and n.clip == (clip or 0.0)
    assert n.score == pytest.approx(z(result.score, calibration.score, clip), abs=1e-12)
    assert set(n.rewards) == set(result.rewards) == set(TINY_ATTRIBUTES)
    for name, raw in result.rewards.items():
        assert n.rewards[name] == pytest.approx(z(raw, calibration.rewards[name], clip), abs=1e-12)


def test_zscore_and_clip_against_the_raw_values(servers, calibrated):
    plain, _, _ = servers
    _, calibration, _ = calibrated
    channel, stub = stub_of(plain)
    with channel:
        raw = stub.Score(score_request(CONVERSATIONS))
        assert not any(r.HasField("normalized") for r in raw.results)  # no default: raw only
        asked = stub.Score(score_request(CONVERSATIONS, normalization=pb.Normalization(mode=pb.Normalization.ZSCORE)))
        for r, before in zip(asked.results, raw.results):
            assert r.score == before.score and dict(r.rewards) == dict(before.rewards)  # raw values stay
            check_normalized(r, calibration)
        clipped = stub.Score(score_request(CONVERSATIONS, normalization=pb.Normalization(mode=pb.Normalization.ZSCORE, clip=0.5)))
        for r in clipped.results:
            check_normalized(r, calibration, clip=0.5)
        assert any(abs(v) == 0.5 for r in clipped.results for v in [r.normalized.score, *r.normalized.rewards.values()])

        group = stub.ScoreGroup(pb.ScoreGroupRequest(
            prompt=[pb.Message(role="user", content="Name a colour.")], responses=["Red.", "Green.", "Blue!"],
            normalization=pb.Normalization(mode=pb.Normalization.ZSCORE)))  # fmt: skip
        for r in group.results:
            check_normalized(r, calibration)
        assert group.mean == pytest.approx(sum(r.score for r in group.results) / 3, abs=1e-9)  # raw statistics
        compared = stub.Compare(pb.CompareRequest(
            pairs=[pb.ComparePair(prompt=[pb.Message(role="user", content="Hi")], chosen="Hello!", rejected="Go away.")],
            normalization=pb.Normalization(mode=pb.Normalization.ZSCORE)))  # fmt: skip
        check_normalized(compared.results[0].chosen, calibration)
        check_normalized(compared.results[0].rejected, calibration)
        streamed = list(stub.ScoreStream(iter([score_request(CONVERSATIONS, request_id="s1",
                                                             normalization=pb.Normalization(mode=pb.Normalization.ZSCORE))])))  # fmt: skip
        for r in streamed[0].response.results:
            check_normalized(r, calibration)


def test_server_default_and_the_request_override(servers, calibrated):
    _, default, _ = servers
    _, calibration, _ = calibrated
    channel, stub = stub_of(default)
    with channel:
        for r in stub.Score(score_request(CONVERSATIONS)).results:  # nothing asked: the default, clip 1.0
            check_normalized(r, calibration, clip=1.0)
        off = stub.Score(score_request(CONVERSATIONS, normalization=pb.Normalization(mode=pb.Normalization.NONE)))
        assert not any(r.HasField("normalized") for r in off.results)
        other = stub.Score(score_request(CONVERSATIONS, normalization=pb.Normalization(mode=pb.Normalization.ZSCORE)))
        for r in other.results:  # the request's own (no clip) wins
            check_normalized(r, calibration)
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        assert info.default_normalization.mode == pb.Normalization.ZSCORE and info.default_normalization.clip == 1.0
        assert info.calibration["calibration_id"] == calibration.calibration_id
        # Steering with the default on: refused, naming the field and the way out.
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(score_request(CONVERSATIONS, weights=pb.AttributeWeights(mode=pb.AttributeWeights.MASK, values={"safe": 0.0})))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "normalization.mode=NONE" in err.value.details()
        steered_raw = stub.Score(score_request(
            CONVERSATIONS, weights=pb.AttributeWeights(mode=pb.AttributeWeights.MASK, values={"safe": 0.0}),
            normalization=pb.Normalization(mode=pb.Normalization.NONE)))  # fmt: skip
        assert steered_raw.weights_source == "mask" and not steered_raw.results[0].HasField("normalized")


def test_an_uncalibrated_model_names_the_field(servers, calibrated):
    _, _, uncalibrated = servers
    channel, stub = stub_of(uncalibrated)
    with channel:
        assert stub.Score(score_request(CONVERSATIONS)).results  # raw still works
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(score_request(CONVERSATIONS, normalization=pb.Normalization(mode=pb.Normalization.ZSCORE)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no calibration" in err.value.details() and "rewardsvc calibrate" in err.value.details()
        assert ("rewardsvc-field", "normalization") in tuple(err.value.trailing_metadata())
        assert not stub.GetModelInfo(pb.GetModelInfoRequest()).calibration["available"]
    # A server whose default normalizes refuses to start on it.
    with pytest.raises(InvalidInputError) as refused:
        start_server(Scorer.load(calibrated[2], config=ScorerConfig()), normalize=True)
    assert refused.value.field == "server.normalize"


def test_bad_normalization_fields_are_invalid_argument(servers):
    plain, _, _ = servers
    channel, stub = stub_of(plain)
    with channel:
        for normalization, field in [(pb.Normalization(mode=pb.Normalization.ZSCORE, clip=-1.0), "normalization.clip"),
                                     (pb.Normalization(clip=2.0), "normalization.clip"),
                                     (pb.Normalization(mode=pb.Normalization.NONE, clip=2.0), "normalization.clip")]:  # fmt: skip
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(score_request(CONVERSATIONS, normalization=normalization))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert ("rewardsvc-field", field) in tuple(err.value.trailing_metadata()), err.value.details()


def test_client_http_and_batch_cli(servers, calibrated, tmp_path):
    plain, default, _ = servers
    heads, calibration, _ = calibrated
    with RewardClient(f"127.0.0.1:{plain.port}") as client:
        raw = client.score(CONVERSATIONS)
        assert all(r.normalized is None and r.reward == r.score for r in raw)
        got = client.score(CONVERSATIONS, normalization=Normalization(clip=3.0))
        for r, before in zip(got, raw):
            assert r.score == before.score and r.normalized.clip == 3.0
            assert r.reward == r.normalized.score == pytest.approx(z(r.score, calibration.score, 3.0), abs=1e-12)
        assert client.model_info()["default_normalization"] == Normalization(mode="none")
    with RewardClient(f"127.0.0.1:{default.port}") as client:
        assert all(r.normalized is None for r in client.score(CONVERSATIONS, normalization=False))
        assert all(r.normalized.clip == 1.0 for r in client.score_group("Name a colour.", ["Red.", "Blue."]).results)

    # HTTP /v1: the proto's JSON mapping carries the same fields.
    body = json.dumps({"conversations": [{"messages": CONVERSATIONS[0]}], "normalization": {"mode": "ZSCORE", "clip": 2}})
    request = urllib.request.Request(f"http://127.0.0.1:{plain.http_port}/v1/score", data=body.encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    reply = json.loads(urllib.request.urlopen(request, timeout=30).read())
    result = reply["results"][0]
    assert result["normalized"]["calibration_id"] == calibration.calibration_id
    assert result["normalized"]["score"] == pytest.approx(z(result["score"], calibration.score, 2.0), abs=1e-12)

    # The batch CLI: locally and through the server, the same z-scores beside the raw values.
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "messages": c}) + "\n" for i, c in enumerate(CONVERSATIONS)))
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    assert cli.main(["score", str(src), "-o", str(local), "--model", str(heads), "--normalize", "--normalize-clip", "1.5"]) == 0
    assert cli.main(["score", str(src), "-o", str(remote), "--server", f"127.0.0.1:{plain.port}",
                     "--normalize", "--normalize-clip", "1.5"]) == 0  # fmt: skip
    for a, b in zip(read_output(local), read_output(remote)):
        assert a["normalized"]["calibration_id"] == b["normalized"]["calibration_id"] == calibration.calibration_id
        assert a["normalized"]["score"] == pytest.approx(z(a["score"], calibration.score, 1.5), abs=1e-12)
        assert b["normalized"]["score"] == pytest.approx(a["normalized"]["score"], abs=1e-5)
    plain_out = tmp_path / "plain.jsonl"
    assert cli.main(["score", str(src), "-o", str(plain_out), "--model", str(heads)]) == 0
    assert "normalized" not in read_output(plain_out)[0]  # the output format without --normalize is unchanged


def test_openrlhf_get_reward_gets_the_server_default(servers, calibrated):
    """OpenRLHF's --normalize_reward keeps running statistics of the rewards it computes itself; a remote reward
    model's rewards skip it (OpenRLHF 0.11), so the server's default is how its PPO gets normalized rewards.
    The body is what OpenRLHF 0.11.2's remote_rm_utils posts: {"query", "prompts", "labels"}."""
    plain, default, _ = servers
    _, calibration, _ = calibrated
    chatml = build_tokenizer("chatml")
    prompts = [chatml.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True) for c in CONVERSATIONS]
    queries = [p + c[-1]["content"] + chatml.eos_token for p, c in zip(prompts, CONVERSATIONS)]
    body = json.dumps({"query": queries, "prompts": prompts, "labels": [""] * len(queries)}).encode()

    def get_reward(port):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/get_reward", data=body,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        return json.loads(urllib.request.urlopen(request, timeout=60).read())

    raw, normalized = get_reward(plain.http_port), get_reward(default.http_port)
    assert "raw_score" not in raw["extra_logs"]
    assert normalized["extra_logs"]["raw_score"] == pytest.approx(raw["rewards"], abs=1e-5)
    assert normalized["rewards"] == pytest.approx([z(r, calibration.score, 1.0) for r in raw["rewards"]], abs=1e-5)
    assert normalized["scores"] == pytest.approx(raw["scores"], abs=1e-5)  # the [0, 1] mapping stays on the raw score


def test_trainer_glue_returns_the_z_scores(servers, calibrated):
    """TRL reward functions (called as GRPOTrainer calls them: prompts, completions, **columns) and verl's
    compute_score (as its Reward Loop calls it: data_source, solution_str, ground_truth, extra_info,
    **reward_kwargs) return the z-scores when asked, and under a server whose default normalizes."""
    from rewardsvc.integrations import trl, verl

    plain, default, _ = servers
    _, calibration, _ = calibrated
    prompts = [[{"role": "user", "content": c[0]["content"]}] for c in CONVERSATIONS]
    completions = [[{"role": "assistant", "content": c[1]["content"]}] for c in CONVERSATIONS]
    with RewardClient(f"127.0.0.1:{plain.port}") as client:
        raw = client.score(CONVERSATIONS)
    score_fn, safe_fn = trl.reward_funcs(f"127.0.0.1:{plain.port}", [None, "safe"], normalization=True)
    assert score_fn(prompts, completions, trainer_state=None) == pytest.approx([z(r.score, calibration.score) for r in raw], abs=1e-5)
    assert safe_fn(prompts, completions) == pytest.approx([z(r.rewards["safe"], calibration.rewards["safe"]) for r in raw], abs=1e-5)
    [by_default] = trl.reward_funcs(f"127.0.0.1:{default.port}")  # nothing asked: the server's default (clip 1.0)
    assert by_default(prompts, completions) == pytest.approx([z(r.score, calibration.score, 1.0) for r in raw], abs=1e-5)

    extra_info = {"prompt": prompts[0]}
    got = verl.compute_score("chat", completions[0][0]["content"], None, extra_info, target=f"127.0.0.1:{plain.port}",
                             normalize=True, return_dict=True)  # fmt: skip
    assert got["score"] == pytest.approx(z(raw[0].score, calibration.score), abs=1e-5)
    assert got["raw_score"] == pytest.approx(raw[0].score, abs=1e-5)
    assert verl.compute_score("chat", completions[0][0]["content"], None, extra_info,
                              target=f"127.0.0.1:{plain.port}") == pytest.approx(raw[0].score, abs=1e-5)  # fmt: skip
