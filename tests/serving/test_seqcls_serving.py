"""A standard Hugging Face sequence-classification reward model served over every transport: gRPC (Score,
ScoreGroup, Compare, InspectWeights, GetModelInfo), HTTP (/v1/score, OpenRLHF's /get_reward) and the TRL glue
on a real server on 127.0.0.1, each equal to transformers' own `AutoModelForSequenceClassification` forward to
1e-5 (the oracle: the tokenizer's `apply_chat_template(tokenize=True)`, one conversation per forward).

The served directory looks like TRL's RewardTrainer output (tests/tiny_models.save_tiny_seqcls); the slow test
makes one with RewardTrainer itself (TRL 1.16, two steps on CPU) and serves it."""

from __future__ import annotations

import json
import math
import urllib.request

import pytest
import torch

from rewardsvc.client import RewardClient
from rewardsvc.config import ScorerConfig
from rewardsvc.integrations.trl import reward_funcs
from rewardsvc.model.scorer import Scorer
from group_fixtures import PROMPT, RESPONSES
from service_fixtures import start_server
from tiny_models import build_tokenizer, save_tiny_seqcls, seqcls_oracle, tiny_seqcls_config

TOL = 1e-5
CONVERSATIONS = [PROMPT + [{"role": "assistant", "content": r}] for r in RESPONSES] + [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}],
]


def oracle(directory, conversations) -> list[float]:
    return seqcls_oracle(directory, conversations)[:, 0].tolist()


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    return save_tiny_seqcls(tmp_path_factory.mktemp("trl-style-rm"), "qwen2", "chatml")


@pytest.fixture(scope="module")
def server(reward_model):
    scorer = Scorer.load(reward_model, config=ScorerConfig(max_tokens=256, token_budget=256))
    running = start_server(scorer, http_port=0)
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def client(server):
    with RewardClient(f"127.0.0.1:{server.port}", timeout=30) as c:
        yield c


def test_grpc_score_group_and_compare_equal_transformers(reward_model, client):
    expected = oracle(reward_model, CONVERSATIONS)
    results = client.score(CONVERSATIONS)
    assert [r.score for r in results] == pytest.approx(expected, abs=TOL)
    assert all(r.rewards == r.gating == r.coefficients == {} and r.weights_source == "fixed" for r in results)
    assert results[0].model_id == f"seqcls:{reward_model.name}"
    group = client.score_group(PROMPT, RESPONSES)  # the prompt's KV cache path on the server
    assert group.scores == pytest.approx(expected[: len(RESPONSES)], abs=TOL)
    assert group.mean == pytest.approx(sum(group.scores) / len(RESPONSES), abs=1e-9)
    compared = client.compare([(PROMPT, RESPONSES[0], RESPONSES[2])])[0]
    assert compared.p_chosen == pytest.approx(1 / (1 + math.exp(expected[2] - expected[0])), abs=TOL)


def test_grpc_inspect_says_there_is_no_gating_and_model_info_names_the_kind(client):
    inspected = client.inspect(PROMPT)
    assert inspected.gating == {} and inspected.coefficients == {} and inspected.weights_source == "fixed"
    info = client.model_info()
    assert info["attributes"] == [] and info["trained"] is True
    assert info["provenance"]["model_kind"] == "sequence-classification"
    assert info["provenance"]["score"] == "logit" and info["provenance"]["architecture"] == "Qwen2ForSequenceClassification"


def post(port: int, path: str, payload) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_http_v1_score_and_openrlhf_get_reward_equal_transformers(reward_model, server):
    expected = oracle(reward_model, CONVERSATIONS)
    got = post(server.http_port, "/v1/score", {"conversations": [{"messages": c} for c in CONVERSATIONS]})
    assert [r["score"] for r in got["results"]] == pytest.approx(expected, abs=TOL)
    assert got["weights_source"] == "fixed"
    # OpenRLHF posts the policy's decoded text: prompt with the generation prompt + response + EOS, and the
    # prompts (the policy shares the reward model's ChatML template here).
    chatml = build_tokenizer("chatml")
    prompts = [chatml.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True) for c in CONVERSATIONS]
    queries = [p + c[-1]["content"] + chatml.eos_token for p, c in zip(prompts, CONVERSATIONS)]
    got = post(server.http_port, "/get_reward", {"query": queries, "prompts": prompts, "labels": ["" for _ in queries]})
    assert got["rewards"] == pytest.approx(expected, abs=TOL)


def test_trl_reward_function_through_the_server_equals_transformers(reward_model, client):
    """The TRL glue (client side) on a loopback server: GRPOTrainer's conversational call shape."""
    expected = oracle(reward_model, CONVERSATIONS)
    (score,) = reward_funcs(client)
    prompts = [c[:-1] for c in CONVERSATIONS]
    completions = [[c[-1]] for c in CONVERSATIONS]
    assert score(prompts=prompts, completions=completions, completion_ids=None) == pytest.approx(expected, abs=TOL)


@pytest.mark.slow
def test_a_reward_model_trained_by_trl_is_served_with_transformers_scores(tmp_path):
    """Tried as a user would: TRL's RewardTrainer trains a tiny Qwen2 reward model (two steps on CPU) and saves
    it; `Scorer.load` of that directory behind a gRPC server scores what AutoModelForSequenceClassification does."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    tokenizer = build_tokenizer("chatml")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_seqcls_config("qwen2", len(tokenizer), None))
    rows = [{"chosen": c, "rejected": c[:-1] + [{"role": "assistant", "content": "I cannot help with that request."}]}
            for c in CONVERSATIONS]  # fmt: skip
    args = RewardConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2, report_to=[],
                        use_cpu=True, save_strategy="no", learning_rate=1e-2)  # fmt: skip
    trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(rows))
    trainer.train()
    trainer.save_model(str(tmp_path / "rm"))
    expected = oracle(tmp_path / "rm", CONVERSATIONS)
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["pad_token_id"] == tokenizer.pad_token_id  # set by TRL
    running = start_server(Scorer.load(tmp_path / "rm"))
    try:
        with RewardClient(f"127.0.0.1:{running.port}", timeout=30) as c:
            assert [r.score for r in c.score(CONVERSATIONS)] == pytest.approx(expected, abs=TOL)
            assert c.score_group(PROMPT, RESPONSES).scores == pytest.approx(expected[: len(RESPONSES)], abs=TOL)
    finally:
        running.stop(0)
