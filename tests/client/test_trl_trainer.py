"""The TRL reward functions through TRL itself: one GRPOTrainer step (a tiny random policy on CPU) whose rewards
come from a real rewardsvc server on loopback. Needs the optional extra `trl` (`pip install -e .[trl]`); marked
slow (TRL's import alone takes seconds)."""

from __future__ import annotations

import datasets  # (installed with the trl extra by scripts/setup.sh: imported hard, never skipped)
import pytest
import trl

from rewardsvc.integrations import trl as rtrl
from service_fixtures import start_server
from tiny_models import save_tiny_llama
from tiny_service import ATTRS, load_tiny_scorer, save_tiny_heads

pytestmark = pytest.mark.slow


def test_grpo_trainer_step_with_sync_and_async_rewardsvc_functions(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scorer = load_tiny_scorer(save_tiny_heads(tmp_path / "heads", tiny_llama_dir))
    running = start_server(scorer)
    try:
        policy_dir = save_tiny_llama(tmp_path / "policy", "chatml", causal_lm=True)
        policy = AutoModelForCausalLM.from_pretrained(policy_dir)
        tokenizer = AutoTokenizer.from_pretrained(policy_dir)
        target = f"127.0.0.1:{running.port}"
        [score] = rtrl.reward_funcs(target, [None], log_gating=True)
        [attribute] = rtrl.async_reward_funcs(target, [ATTRS[0]])
        seen = []

        def record(prompts, completions, **kwargs):  # what TRL handed the reward functions (weight 0)
            seen.append((prompts, completions))
            return [0.0] * len(prompts)

        prompts = [[{"role": "user", "content": f"Name a colour, {i}."}] for i in range(4)]
        config = trl.GRPOConfig(
            output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
            max_steps=1, logging_steps=1, report_to="none", use_cpu=True, bf16=False, save_strategy="no",
            reward_weights=[1.0, 0.5, 0.0], seed=0,
        )  # fmt: skip
        trainer = trl.GRPOTrainer(
            model=policy, processing_class=tokenizer, reward_funcs=[score, attribute, record], args=config,
            train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in prompts]),
        )  # fmt: skip
        trainer.train()
        logged = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
        [(got_prompts, got_completions)] = seen
        conversations = [p + c for p, c in zip(got_prompts, got_completions)]
        offline = scorer.score(conversations)
        n = len(offline)
        assert logged["rewards/rewardsvc_score/mean"] == pytest.approx(sum(r.score for r in offline) / n, abs=1e-4)
        assert logged[f"rewards/rewardsvc_{ATTRS[0]}/mean"] == pytest.approx(sum(r.rewards[ATTRS[0]] for r in offline) / n, abs=1e-4)
        for a in ATTRS:
            assert logged[f"rewardsvc/gating/{a}"] == pytest.approx(sum(r.gating[a] for r in offline) / n, abs=1e-4)
    finally:
        running.stop(0)
