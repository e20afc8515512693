"""training/measure_likelihood.py: response-token log-probabilities equal a causal LM's own (independent) ones."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tiny_models import save_tiny_llama

SCRIPT = Path(__file__).resolve().parents[2] / "training" / "measure_likelihood.py"


def _script():
    spec = importlib.util.spec_from_file_location("measure_likelihood", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tied_tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tied-tiny"), seed=3, causal_lm=True, tie_word_embeddings=True)


def test_log_probs_equal_the_causal_lm(tied_tiny_dir):
    from transformers import LlamaForCausalLM

    from rewardsvc.config import BackboneConfig
    from rewardsvc.model.backbone_loading import load_backbone

    backbone = load_backbone(BackboneConfig(model=str(tied_tiny_dir)))
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    response = "The capital of France is Paris."
    got = _script().response_log_probs(backbone, prompt, response, max_tokens=512)

    tok = backbone.tokenizer
    head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    head_ids = tok(head, add_special_tokens=False)["input_ids"]
    body_ids = tok(response + "<|im_end|>", add_special_tokens=False)["input_ids"]  # the response and end-of-turn
    ids = torch.tensor([head_ids + body_ids])
    lm = LlamaForCausalLM.from_pretrained(tied_tiny_dir).eval()
    with torch.no_grad():
        log_probs = torch.log_softmax(lm(input_ids=ids).logits[0].float(), -1)
    expected = [float(log_probs[len(head_ids) + k - 1, t]) for k, t in enumerate(body_ids)]
    assert len(got) == len(expected)
    assert got == pytest.approx(expected, abs=1e-4)


def test_untied_backbone_is_refused(tiny_llama_dir):
    from rewardsvc.config import BackboneConfig
    from rewardsvc.model.backbone_loading import load_backbone

    backbone = load_backbone(BackboneConfig(model=str(tiny_llama_dir)))
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        _script().response_log_probs(backbone, [{"role": "user", "content": "hi"}], "hello", max_tokens=512)


def test_over_max_tokens_is_none(tied_tiny_dir):
    from rewardsvc.config import BackboneConfig
    from rewardsvc.model.backbone_loading import load_backbone

    backbone = load_backbone(BackboneConfig(model=str(tied_tiny_dir)))
    assert _script().response_log_probs(backbone, [{"role": "user", "content": "hi"}], "hello " * 50, max_tokens=20) is None


def test_by_category_counts_pairs_as_the_evaluation_does():
    rows = [  # chosen higher and longer; a tie on the signal; rejected higher but chosen longer
        {"category": "chat", "source": "a", "mean_c": -1.0, "mean_r": -2.0, "len_c": 10, "len_r": 5},
        {"category": "chat", "source": "a", "mean_c": -1.0, "mean_r": -1.0, "len_c": 5, "len_r": 5},
        {"category": "safety", "source": "b", "mean_c": -3.0, "mean_r": -2.0, "len_c": 9, "len_r": 4},
    ]
    got = _script().by_category(rows, "mean")
    assert got["model"] == {"chat": 75.0, "safety": 0.0, "n": {"chat": 2, "safety": 1}}
    assert got["longer_wins"] == {"chat": 75.0, "safety": 100.0, "n": {"chat": 2, "safety": 1}}
