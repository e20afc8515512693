"""verl 0.9.1's own Reward Loop against a live rewardsvc server, for every path docs/INTEGRATIONS.md shows.

verl's code runs as released: its Hydra config (verl/trainer/config/ppo_trainer.yaml, composed with the
documented command-line overrides, `+` included), `RewardLoopManager` (verl/experimental/reward_loop/
reward_loop.py) with its `RewardLoopWorker` Ray actor on a local Ray (`ray.init(num_cpus=2)`, once for the
module), its registered managers (naive, dapo, gdpo, rate_limited, remote) and its importlib loading
(verl/utils/import_utils.py) of our module by `pkg://` and by file path. The batch is a DataProto shaped as
verl's trainer hands it to `compute_rm_score`: left-padded prompts, right-padded responses, `raw_prompt`.
Expected values: the tiny scorer, offline, on the same prompt + decoded response.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

import ray  # verl 0.9.1 and ray: scripts/setup.sh installs them
import torch
import verl

from local_ray import start_local_ray
from service_fixtures import settled_requests
from tiny_service import ATTRS

pytestmark = pytest.mark.slow  # Ray actors import verl, torch and transformers: about 10 s per case here

VERL_PY = Path(__file__).resolve().parents[2] / "rewardsvc" / "integrations" / "verl.py"
TOL = 1e-5
PROMPTS = [
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name a colour."}],
]
RESPONSES = ["Red.", "Hello!", "The capital of France is Paris.", "Seven."]


@pytest.fixture(scope="module")
def local_ray():
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start_local_ray()
    yield
    ray.shutdown()


def verl_config(tokenizer_dir: Path, overrides: list[str]):
    """verl's own trainer config, composed by Hydra exactly as `python -m verl.trainer.main_ppo ...` does."""
    from hydra import compose, initialize_config_dir

    config_dir = Path(verl.__file__).parent / "trainer" / "config"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name="ppo_trainer", overrides=[
            f"actor_rollout_ref.model.path={tokenizer_dir}", "reward.num_workers=1", *overrides])  # fmt: skip


def rollout_batch(tokenizer, prompts, responses):
    """A DataProto as verl's trainer gives compute_rm_score: prompts left-padded, responses right-padded."""
    from tensordict import TensorDict
    from verl import DataProto

    pad = tokenizer.pad_token_id
    prompt_ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False) for p in prompts]
    response_ids = [tokenizer(r + tokenizer.eos_token, add_special_tokens=False)["input_ids"] for r in responses]
    P, R = max(map(len, prompt_ids)), max(map(len, response_ids))
    prompt_t = torch.tensor([[pad] * (P - len(ids)) + ids for ids in prompt_ids])
    response_t = torch.tensor([ids + [pad] * (R - len(ids)) for ids in response_ids])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) + [1] * len(r) + [0] * (R - len(r))
                         for p, r in zip(prompt_ids, response_ids)])  # fmt: skip
    batch = TensorDict({"prompts": prompt_t, "responses": response_t, "input_ids": torch.cat([prompt_t, response_t], 1),
                        "attention_mask": mask}, batch_size=len(prompts))  # fmt: skip
    n = len(prompts)
    non_tensor = {
        "data_source": np.array(["chat"] * n, dtype=object),
        "reward_model": np.array([{"ground_truth": None, "style": "model"}] * n, dtype=object),
        # The custom reward functions read the prompt from extra_info (copied there when the parquet is made).
        "extra_info": np.array([{"index": i, "prompt": p} for i, p in enumerate(prompts)], dtype=object),
        "raw_prompt": np.empty(n, dtype=object),  # chat messages, as verl's RLHFDataset keeps them
    }
    for i, p in enumerate(prompts):
        non_tensor["raw_prompt"][i] = list(p)
    return DataProto(batch=batch, non_tensor_batch=non_tensor)


def run_reward_loop(config, data):
    from verl.experimental.reward_loop import RewardLoopManager

    manager = RewardLoopManager(config)
    try:
        return manager.compute_rm_score(data)
    finally:
        for worker in manager.reward_loop_workers:
            ray.kill(worker)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the named actor must be gone before the next case names its own
            try:
                ray.get_actor("reward_loop_worker_0")
            except ValueError:
                break
            time.sleep(0.1)


def scores_of(output, data) -> list[float]:
    rm = output.batch["rm_scores"]  # (B, R): the score sits on the last valid response token
    last = data.batch["attention_mask"][:, data.batch["prompts"].shape[1]:].sum(1) - 1
    assert torch.count_nonzero(rm).item() <= len(rm)
    return [rm[i, last[i]].item() for i in range(len(rm))]


@pytest.fixture(scope="module")
def case(tiny, tiny_llama_dir, server, local_ray):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    data = rollout_batch(tokenizer, PROMPTS, RESPONSES)
    decoded = [tokenizer.decode(tokenizer(r + tokenizer.eos_token, add_special_tokens=False)["input_ids"],
                                skip_special_tokens=True) for r in RESPONSES]  # fmt: skip
    expected = tiny.score([p + [{"role": "assistant", "content": r}] for p, r in zip(PROMPTS, decoded)])
    target = f"+reward.custom_reward_function.reward_kwargs.target=127.0.0.1:{server.port}"
    return tiny_llama_dir, data, expected, target


FUNCTION_PATHS = {
    "naive, pkg://, compute_score": ["reward.reward_manager.name=naive", "reward.custom_reward_function.path=pkg://rewardsvc.integrations.verl",
                                     "reward.custom_reward_function.name=compute_score"],
    "naive, file path, compute_score_async": ["reward.reward_manager.name=naive", f"reward.custom_reward_function.path={VERL_PY}",
                                              "reward.custom_reward_function.name=compute_score_async"],
    "rate_limited, pkg://, compute_score_async": ["reward.reward_manager.name=rate_limited",
                                                  "reward.custom_reward_function.path=pkg://rewardsvc.integrations.verl",
                                                  "reward.custom_reward_function.name=compute_score_async"],
    "dapo, pkg://, compute_score_async": ["reward.reward_manager.name=dapo", "reward.custom_reward_function.path=pkg://rewardsvc.integrations.verl",
                                          "reward.custom_reward_function.name=compute_score_async"],
    "gdpo, file path, compute_score": ["reward.reward_manager.name=gdpo", f"reward.custom_reward_function.path={VERL_PY}",
                                       "reward.custom_reward_function.name=compute_score"],
    "remote, file path, compute_score": ["reward.reward_manager.name=remote", f"reward.custom_reward_function.path={VERL_PY}",
                                         "reward.custom_reward_function.name=compute_score"],
}  # fmt: skip


@pytest.mark.parametrize("path", sorted(FUNCTION_PATHS))
def test_custom_reward_function_through_verls_reward_loop(case, path):
    tokenizer_dir, data, expected, target = case
    config = verl_config(tokenizer_dir, [*FUNCTION_PATHS[path], target, "+reward.custom_reward_function.reward_kwargs.return_dict=true"])
    output = run_reward_loop(config, data)
    assert scores_of(output, data) == pytest.approx([r.score for r in expected], abs=TOL)
    extra = output.non_tensor_batch  # the parts reach verl's reward_extra_info
    for i, r in enumerate(expected):
        assert extra[f"reward/{ATTRS[0]}"][i] == pytest.approx(r.rewards[ATTRS[0]], abs=TOL)
        assert extra[f"coefficient/{ATTRS[1]}"][i] == pytest.approx(r.coefficients[ATTRS[1]], abs=TOL)


@pytest.mark.parametrize("module_path", ["pkg://rewardsvc.integrations.verl", str(VERL_PY)])
def test_coalescing_manager_scores_a_chunk_in_one_call_from_raw_prompt(case, server, module_path):
    tokenizer_dir, data, expected, _ = case
    data = data.select(non_tensor_batch_keys=["data_source", "reward_model", "raw_prompt"])  # no extra_info["prompt"]
    config = verl_config(tokenizer_dir, [
        "reward.reward_manager.source=importlib", f"reward.reward_manager.module.path={module_path}",
        "reward.reward_manager.name=RewardsvcRewardManager", f"+reward.reward_kwargs.target=127.0.0.1:{server.port}",
        f"+reward.reward_kwargs.attribute={ATTRS[2]}"])  # fmt: skip
    before = settled_requests(server.metrics_port, {"method": "Score"})
    output = run_reward_loop(config, data)
    assert scores_of(output, data) == pytest.approx([r.rewards[ATTRS[2]] for r in expected], abs=TOL)
    assert settled_requests(server.metrics_port, {"method": "Score"}) == before + 1  # 4 samples, one RPC
