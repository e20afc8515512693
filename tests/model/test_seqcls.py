"""Standard Hugging Face sequence-classification reward models (model/seqcls.py) through the Scorer: every batch
plan equals transformers' own forward to 1e-5, for tiny random Llama, Qwen2, Gemma and Mistral models built
from configs, with a ChatML template (the text ends in "<|im_end|>\\n") and a Llama-3 template (the text ends in
the pad token, pad == eos: transformers pools the token before it).

The oracle is independent of rewardsvc: the tokenizer's own `apply_chat_template(tokenize=True)` (what TRL's
RewardTrainer and model cards use) and `AutoModelForSequenceClassification` on one conversation at a time, so no
padding is involved in the reference."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch

from rewardsvc.config import BackboneConfig, ScoreMix, ScorerConfig
from rewardsvc.errors import CheckpointError, InvalidInputError
from rewardsvc.model.scorer import Scorer
from rewardsvc.types import AttributeWeights
from group_fixtures import PROMPT, RESPONSES, PromptCounter
from tiny_models import SEQCLS_ARCHITECTURES, save_tiny_seqcls, seqcls_oracle

OTHER_PROMPT = [{"role": "user", "content": "Write a haiku about the sea."}]


def conversations() -> list[list[dict]]:
    """A group sharing PROMPT (the prompt's KV cache path), single conversations of other prompts, a
    multi-turn one and one whose response is empty."""
    group = [PROMPT + [{"role": "assistant", "content": r}] for r in RESPONSES]
    singles = [
        OTHER_PROMPT + [{"role": "assistant", "content": "Waves fold into foam."}],
        [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."},
         {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome, " * 9}],
        [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}],
    ]  # fmt: skip
    return group + singles


def score_group_counting_prompts(scorer):
    """(results of scoring the RESPONSES group, how many batch rows started with the group's prompt tokens)."""
    first = scorer.encode(PROMPT + [{"role": "assistant", "content": RESPONSES[0]}])
    counter = PromptCounter(scorer, first.input_ids[: first.prompt_anchor + 1])
    try:
        return scorer.score_group(PROMPT, RESPONSES), counter.rows
    finally:
        counter.close()


@pytest.fixture(scope="module", params=[(a, t) for a in SEQCLS_ARCHITECTURES for t in ("chatml", "llama3")],
                ids=lambda p: f"{p[0]}-{p[1]}")  # fmt: skip
def single_label(request, tmp_path_factory):
    arch, template = request.param
    directory = save_tiny_seqcls(tmp_path_factory.mktemp(f"seqcls-{arch}-{template}"), arch, template)
    return directory, seqcls_oracle(directory, conversations())[:, 0]


def plans(scorer):
    """Every way the Scorer can run a batch: padded, packed, the prompt's KV cache shared, one per forward."""
    c = replace(scorer.config, token_budget=96, max_batch_size=4)
    return {
        "padded": scorer.with_config(replace(c, batch_plan="padded", share_prompts=False)),
        "packed": scorer.with_config(replace(c, batch_plan="packed", share_prompts=False)),
        "shared-prompt": scorer.with_config(replace(c, batch_plan="padded", share_prompts=True)),
        "batch-invariant": scorer.with_config(replace(c, batch_invariant=True)),
    }


def test_every_plan_equals_transformers(single_label):
    directory, expected = single_label
    scorer = Scorer.load(directory)
    assert scorer.heads.kind == "sequence-classification" and scorer.attributes == ()
    convs = conversations()
    for name, variant in plans(scorer).items():
        results = variant.score(convs)
        got = torch.tensor([r.score for r in results])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")
        for r in results:  # one label: the score alone
            assert r.rewards == r.gating == r.coefficients == {} and r.weights_source == "fixed"


def test_group_reuses_the_prompt_cache_and_equals_transformers(single_label):
    directory, expected = single_label
    results, prompt_rows = score_group_counting_prompts(plans(Scorer.load(directory))["shared-prompt"])
    assert prompt_rows == 1  # the prompt ran once for the whole group
    torch.testing.assert_close(torch.tensor([r.score for r in results]), expected[: len(RESPONSES)], atol=1e-5, rtol=0)


def test_the_anchor_is_the_last_non_pad_token(tmp_path):
    """Llama-3 template: the text ends in <|eot_id|> = pad = eos, so transformers pools the token before it;
    ChatML: the text ends in "\\n" after <|im_end|> (the pad token), which is the token pooled."""
    for template, skipped in (("llama3", 1), ("chatml", 0)):
        scorer = Scorer.load(save_tiny_seqcls(tmp_path / template, "llama", template))
        encoded = scorer.encode(conversations()[0])
        pad = scorer.backbone.tokenizer.pad_token_id
        assert encoded.response_anchor == encoded.num_tokens - 1 - skipped
        assert encoded.input_ids[encoded.response_anchor] != pad
        assert all(t == pad for t in encoded.input_ids[encoded.response_anchor + 1 :])


@pytest.fixture(scope="module")
def multi_label(tmp_path_factory):
    directory = save_tiny_seqcls(tmp_path_factory.mktemp("seqcls-multi"), "qwen2", "chatml", num_labels=3)
    return directory, seqcls_oracle(directory, conversations())


def test_several_labels_are_named_attributes_mixed_as_configured(multi_label):
    directory, expected = multi_label
    mix = ScoreMix.parse('{"helpfulness": 0.7, "safety": 0.3}')
    scorer = Scorer.load(directory, score_mix=mix)
    assert scorer.attributes == ("helpfulness", "safety", "verbosity")
    for name, variant in plans(scorer).items():
        results = variant.score(conversations())
        rewards = torch.tensor([[r.rewards[a] for a in scorer.attributes] for r in results])
        torch.testing.assert_close(rewards, expected, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")
        scores = torch.tensor([r.score for r in results])
        torch.testing.assert_close(scores, 0.7 * expected[:, 0] + 0.3 * expected[:, 1], atol=1e-5, rtol=0)
        for r in results:
            assert r.gating == {} and r.coefficients == pytest.approx({"helpfulness": 0.7, "safety": 0.3, "verbosity": 0.0})
            assert r.weights_source == "fixed"
    one_label = Scorer.load(directory, score_mix=ScoreMix.parse("safety")).score(conversations()[:2])
    torch.testing.assert_close(torch.tensor([r.score for r in one_label]), expected[:2, 1], atol=1e-5, rtol=0)


def test_steering_acts_on_the_mix_and_inspect_says_there_is_no_gating(multi_label):
    directory, expected = multi_label
    scorer = Scorer.load(directory, score_mix=ScoreMix.parse("helpfulness"))
    c = conversations()[0]
    override = scorer.score([c], AttributeWeights("override", {"verbosity": 2.0}))[0]
    assert override.weights_source == "override" and override.coefficients["verbosity"] == 2.0
    assert math.isclose(override.score, 2.0 * float(expected[0, 2]), abs_tol=1e-5)
    masked = scorer.score([c], AttributeWeights("mask", {"helpfulness": 0.5}))[0]
    assert math.isclose(masked.score, 0.5 * float(expected[0, 0]), abs_tol=1e-5)
    inspected = scorer.inspect(PROMPT)
    assert inspected.gating == {} and inspected.weights_source == "fixed"
    assert inspected.coefficients == {"helpfulness": 1.0, "safety": 0.0, "verbosity": 0.0}
    info = scorer.model_info()
    assert info["model_kind"] == "sequence-classification" and info["has_gating"] is False
    assert info["provenance"]["score"] == {"mix": {"helpfulness": 1.0, "safety": 0.0, "verbosity": 0.0}}


def test_single_label_refuses_steering_and_a_mix(single_label):
    directory, _ = single_label
    scorer = Scorer.load(directory)
    with pytest.raises(InvalidInputError, match="single score"):
        scorer.score(conversations()[:1], AttributeWeights("override", {}))
    with pytest.raises(InvalidInputError, match="single label"):
        Scorer.load(directory, score_mix=ScoreMix.parse("LABEL_0"))
    inspected = scorer.inspect(PROMPT)
    assert inspected.gating == {} and inspected.coefficients == {}


def test_several_labels_need_a_mix_naming_known_labels(multi_label):
    directory, _ = multi_label
    with pytest.raises(CheckpointError, match=r"3 labels \['helpfulness', 'safety', 'verbosity'\].*--score-mix"):
        Scorer.load(directory)
    with pytest.raises(InvalidInputError, match=r"unknown labels \['nope'\]"):
        Scorer.load(directory, score_mix=ScoreMix.parse('{"nope": 1}'))
    with pytest.raises(InvalidInputError, match="finite"):
        ScoreMix.parse('{"safety": NaN}')


def test_refuses_pickled_weights_and_remote_code(tmp_path, multi_label):
    source, _ = multi_label
    pickled = shutil.copytree(source, tmp_path / "pickled")
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickled .bin weights are refused"):
        Scorer.load(pickled, score_mix=ScoreMix.parse("safety"))
    remote = shutil.copytree(source, tmp_path / "remote")
    config = json.loads((remote / "config.json").read_text())
    config.update(architectures=["InternLM2ForSequenceClassification"], model_type="internlm2",
                  auto_map={"AutoModelForSequenceClassification": "modeling_internlm2.InternLM2ForRewardModel"})  # fmt: skip
    (remote / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="never runs code shipped with a model"):
        Scorer.load(remote)


def test_backbone_overrides_other_than_device_and_dtype_are_refused(single_label):
    directory, _ = single_label
    scorer = Scorer.load(directory, backbone=BackboneConfig(model=str(directory), device="cpu", dtype="float32"))
    assert scorer.backbone.dtype == torch.float32
    with pytest.raises(CheckpointError, match="its backbone is its own"):
        Scorer.load(directory, backbone=BackboneConfig(model="elsewhere"))


def test_loads_from_a_cached_hub_id(tmp_path, monkeypatch, single_label):
    directory, expected = single_label
    cache = tmp_path / "hf-cache"
    root = cache / "models--owner--tiny-rm"
    shutil.copytree(directory, root / "snapshots" / ("a" * 40))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    scorer = Scorer.load("owner/tiny-rm")
    assert scorer.model_id == "seqcls:owner/tiny-rm"
    torch.testing.assert_close(torch.tensor([scorer.score(conversations()[:1])[0].score]), expected[:1], atol=1e-5, rtol=0)


def test_left_truncation_keeps_the_response_anchor(single_label):
    directory, _ = single_label
    scorer = Scorer.load(directory)
    c = conversations()[6]  # multi-turn: the oldest turn can go
    full = scorer.encode(c)
    cut = scorer.with_config(ScorerConfig(max_tokens=full.num_tokens - 3, truncation="left"))
    encoded = cut.encode(c)
    assert encoded.truncated and encoded.num_tokens == full.num_tokens - 3
    assert encoded.input_ids[encoded.response_anchor:] == full.input_ids[full.response_anchor:]


def test_sliding_window_shares_a_prompt_only_within_the_window(tmp_path):
    """Mistral with an 8-token window: every conversation is longer, so the group runs the flat way (its prompt
    runs once per response) and still equals transformers' forward, whose mask applies the window."""
    directory = save_tiny_seqcls(tmp_path / "mistral-window", "mistral", "chatml", sliding_window=8)
    expected = seqcls_oracle(directory, conversations())[: len(RESPONSES), 0]
    for name, variant in plans(Scorer.load(directory)).items():
        results, prompt_rows = score_group_counting_prompts(variant)
        if name == "shared-prompt":  # (a packed batch is one row: the hook cannot count its prompts)
            assert prompt_rows == len(RESPONSES)
        torch.testing.assert_close(torch.tensor([r.score for r in results]), expected, atol=1e-5, rtol=0,
                                   msg=lambda m: f"{name}: {m}")  # fmt: skip


def test_a_hybrid_linear_attention_model_runs_padded_and_equals_transformers(tmp_path):
    """Qwen3-Next (a linear-attention block, then an attention block): its linear attention would carry state
    across a packed row's boundary and it keeps no key/value cache to continue, so every plan runs it padded,
    each conversation whole, and equals transformers' forward."""
    from transformers import AutoModelForSequenceClassification, Qwen3NextConfig

    from tiny_models import build_tokenizer

    tokenizer = build_tokenizer("chatml")
    torch.manual_seed(4)
    config = Qwen3NextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, layer_types=["linear_attention", "full_attention"],
        pad_token_id=tokenizer.pad_token_id, num_labels=1,
    )  # fmt: skip
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(tmp_path / "hybrid")
    tokenizer.save_pretrained(tmp_path / "hybrid")
    expected = seqcls_oracle(tmp_path / "hybrid", conversations())[:, 0]
    for name, variant in plans(Scorer.load(tmp_path / "hybrid")).items():
        got = torch.tensor([r.score for r in variant.score(conversations())])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")


def test_a_model_without_a_pad_token_id_reads_the_last_token(tmp_path):
    """No config.pad_token_id: transformers reads the last token (batch size 1 only); rewardsvc does too, in any
    batch."""
    from transformers import AutoModelForSequenceClassification

    from tiny_models import build_tokenizer, tiny_seqcls_config

    tokenizer = build_tokenizer("llama3")  # the text ends in <|eot_id|>, which is then read, not skipped
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_config(tiny_seqcls_config("llama", len(tokenizer), None))
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(tmp_path / "no-pad")
    tokenizer.save_pretrained(tmp_path / "no-pad")
    scorer = Scorer.load(tmp_path / "no-pad")
    encoded = scorer.encode(conversations()[0])
    assert encoded.response_anchor == encoded.num_tokens - 1
    expected = seqcls_oracle(tmp_path / "no-pad", conversations())[:, 0]
    got = torch.tensor([r.score for r in plans(scorer)["padded"].score(conversations())])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
