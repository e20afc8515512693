"""`rewardsvc export`: the ArmoRM-layout directory loads in plain transformers (trust_remote_code) with
rewardsvc's scores to 1e-5 in float32, loads back into rewardsvc with identical scores, exports an adapter
merged, and scores through RewardBench's pipeline call for this model type.

RewardBench (0.1.4, the current release) pins transformers==4.51.0, which cannot install beside this project's
transformers 5, so `test_rewardbench_armorm_pipeline_call` reproduces its code path from its source:
rewardbench/rewardbench.py (tokenizer.padding_side = "left"; reward_pipeline_kwargs truncation False, padding
True, max_length 2048; model_builder AutoModelForSequenceClassification.from_pretrained with trust_remote_code;
`score_chosen_batch = rewards_chosen.float().cpu().numpy().tolist()`; chosen wins when `chosen > rejected`),
rewardbench/models/armorm.py ArmoRMPipeline.__call__ (`tokenizer(samples, truncation=..., max_length=...,
padding=..., return_tensors="pt")`, `model(**inputs)`, returns `outputs.logits`) and rewardbench/utils.py
prepare_dialogue_from_tokenizer (`tokenizer.apply_chat_template(messages, tokenize=False)`). A local export is not
in its REWARD_MODEL_CONFIG, so RewardBench takes the `default` entry, rewardbench/models/pipeline.py
RewardBenchPipeline: the same tokenizer call and `outputs.logits`, plus masking a doubled BOS (the tiny
tokenizer here adds no BOS, so that step does nothing).
No RewardBench data is used: the conversations below are made up here.
"""

from __future__ import annotations

import json

import pytest
import torch

from rewardsvc.cli.main import main as cli_main
from rewardsvc.config import HeadsConfig
from rewardsvc.model.checkpoint import HeadsCheckpoint, is_reference_checkpoint, save_heads
from rewardsvc.model.heads import ArmoHeads
from rewardsvc.model.scorer import Scorer
from tiny_models import save_tiny_heads, save_tiny_llama

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sort a list in Python?"},
        {"role": "assistant", "content": "Use sorted(items)."},
        {"role": "user", "content": "And in place?"},
        {"role": "assistant", "content": "items.sort() sorts it in place, a longer answer than the others."},
    ],
    [{"role": "user", "content": "Tell me how to build a bomb."}, {"role": "assistant", "content": "I cannot help."}],
]


def load_hf(directory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(directory)


def hf_outputs(model, tokenizer, conversations, padding_side="right"):
    tokenizer.padding_side = padding_side
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs)


def assert_matches_rewardsvc(out, results, attributes):
    expected_rewards = torch.tensor([[r.rewards[a] for a in attributes] for r in results])
    expected_gating = torch.tensor([[r.gating[a] for a in attributes] for r in results])
    expected_score = torch.tensor([r.score for r in results])
    torch.testing.assert_close(out.rewards, expected_rewards, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.gating_output, expected_gating, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.score, expected_score, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits[:, 0], expected_score, atol=1e-5, rtol=0)


def biased_heads(directory, backbone_dir, feature_layer=None):
    """Heads with a regression bias and a non-identity transform (what training writes), for the tiny Llama."""
    torch.manual_seed(5)
    heads = ArmoHeads(HeadsConfig(attributes=("helpful", "safe", "verbose"), hidden_size=32, gating_hidden_dim=16,
                                  regression_bias=True, feature_layer=feature_layer))  # fmt: skip
    torch.nn.init.normal_(heads.regression_layer.bias)
    heads.reward_transform_matrix.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [-0.4, -0.2, 0]]))
    save_heads(directory, HeadsCheckpoint(heads=heads, backbone={"model": str(backbone_dir)}, name="tiny-biased", trained=True))
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llama_dir):
    """(heads dir, export dir): heads with a bias on the tiny Llama cut to 1 of its 2 blocks (early exit)."""
    root = tmp_path_factory.mktemp("export")
    heads_dir = biased_heads(root / "heads", tiny_llama_dir, feature_layer=1)
    assert cli_main(["export", str(heads_dir), str(root / "out")]) == 0
    return heads_dir, root / "out"


def test_export_layout(exported):
    _, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForSequenceClassification": "modeling_rewardsvc_armorm.RewardModelWithGating"}
    assert config["num_objectives"] == 3 and config["attribute_names"] == ["helpful", "safe", "verbose"]
    assert config["num_hidden_layers"] == 1  # early exit: only the blocks the heads read are exported
    assert config["regression_bias"] is True and config["rewardsvc"]["model_id"] == "tiny-biased"
    assert (out / "modeling_rewardsvc_armorm.py").is_file() and (out / "tokenizer_config.json").is_file()
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"regression_layer.weight", "regression_layer.bias", "reward_transform_matrix", "gating.logit_scale"} <= keys
    assert "model.layers.0.self_attn.q_proj.weight" in keys and "model.layers.1.self_attn.q_proj.weight" not in keys
    assert is_reference_checkpoint(out)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_transformers_loads_the_export_with_rewardsvc_scores(exported, padding_side):
    heads_dir, out = exported
    scorer = Scorer.load(heads_dir)
    model, tokenizer = load_hf(out)
    assert type(model).__name__ == "RewardModelWithGating"
    out_hf = hf_outputs(model, tokenizer, CONVERSATIONS, padding_side)
    assert out_hf.logits.shape == (3, 1) and out_hf.score.shape == (3,) and out_hf.rewards.shape == (3, 3)
    assert_matches_rewardsvc(out_hf, scorer.score(CONVERSATIONS), scorer.attributes)


def test_round_trip_through_the_reference_loader_is_the_identity(exported):
    heads_dir, out = exported
    original, reloaded = Scorer.load(heads_dir), Scorer.load(out)
    assert reloaded.model_id.startswith("reference:") and reloaded.attributes == original.attributes
    for a, b in zip(original.score(CONVERSATIONS), reloaded.score(CONVERSATIONS)):
        assert (a.score, a.rewards, a.gating, a.coefficients) == (b.score, b.rewards, b.gating, b.coefficients)


def test_a_row_without_the_assistant_header_is_a_clear_error(exported):
    _, out = exported
    model, tokenizer = load_hf(out)
    with pytest.raises(ValueError, match="assistant turn header"):
        model(**tokenizer(["plain text, no chat template"], return_tensors="pt"))


def test_an_existing_out_directory_is_not_overwritten(exported, capsys):
    heads_dir, out = exported
    assert cli_main(["export", str(heads_dir), str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_rewardbench_armorm_pipeline_call(exported):
    """RewardBench's code path for the ArmoRM model type (see the module docstring), on made-up pairs."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    heads_dir, out = exported
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    tokenizer.padding_side = "left"
    kwargs = {"truncation": False, "padding": True, "max_length": 2048}
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    chosen = [tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": a}], tokenize=False)
              for a in ("Paris.", "It is Paris, a city on the Seine.")]  # fmt: skip
    rejected = [tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": a}], tokenize=False)
                for a in ("Lyon.", "I do not know.")]  # fmt: skip

    def pipe(samples):  # ArmoRMPipeline.__call__, on the CPU
        inputs = tokenizer(samples, truncation=kwargs["truncation"], max_length=kwargs["max_length"],
                           padding=kwargs["padding"], return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            return model(**inputs).logits

    score_chosen = pipe(chosen).float().cpu().numpy().tolist()
    score_rejected = pipe(rejected).float().cpu().numpy().tolist()
    scorer = Scorer.load(heads_dir)
    expected = [[r.score] for r in scorer.score([prompt + [{"role": "assistant", "content": a}]
                                                 for a in ("Paris.", "It is Paris, a city on the Seine.", "Lyon.", "I do not know.")])]  # fmt: skip
    torch.testing.assert_close(torch.tensor(score_chosen + score_rejected), torch.tensor(expected), atol=1e-5, rtol=0)
    results = [1 if c > r else 0 for c, r in zip(score_chosen, score_rejected)]
    assert results == [1 if e[0] > f[0] else 0 for e, f in zip(expected[:2], expected[2:])]


def test_a_llama3_template_export_finds_its_anchors(tmp_path):
    """The published ArmoRM's template (Llama-3: BOS, <|eot_id|>, header tokens): the anchors read off it."""
    backbone = save_tiny_llama(tmp_path / "llama3", "llama3", seed=4)
    heads_dir = save_tiny_heads(tmp_path / "heads", backbone)
    assert cli_main(["export", str(heads_dir), str(tmp_path / "out")]) == 0
    scorer = Scorer.load(heads_dir)
    model, tokenizer = load_hf(tmp_path / "out")
    for side in ("right", "left"):
        assert_matches_rewardsvc(hf_outputs(model, tokenizer, CONVERSATIONS, side), scorer.score(CONVERSATIONS), scorer.attributes)


def test_an_adapter_merged_backbone_exports_merged(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base_dir = save_tiny_llama(tmp_path / "base", causal_lm=True)
    torch.manual_seed(3)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter change the scores
            torch.nn.init.normal_(p, std=0.5)
    peft_model.save_pretrained(tmp_path / "heads" / "adapter")  # shipped inside the checkpoint, as stage 0 does
    save_tiny_heads(tmp_path / "plain", base_dir)
    config = json.loads((tmp_path / "plain" / "rewardsvc.json").read_text())
    config["backbone"]["adapter"] = "adapter"
    (tmp_path / "heads").mkdir(exist_ok=True)
    (tmp_path / "heads" / "rewardsvc.json").write_text(json.dumps(config))
    (tmp_path / "heads" / "heads.safetensors").write_bytes((tmp_path / "plain" / "heads.safetensors").read_bytes())
    assert cli_main(["export", str(tmp_path / "heads"), str(tmp_path / "out")]) == 0

    adapted = Scorer.load(tmp_path / "heads")
    assert "+adapter:" in adapted.backbone_description()
    model, tokenizer = load_hf(tmp_path / "out")
    out = hf_outputs(model, tokenizer, CONVERSATIONS)
    assert_matches_rewardsvc(out, adapted.score(CONVERSATIONS), adapted.attributes)
    plain = Scorer.load(tmp_path / "plain").score(CONVERSATIONS)
    assert max(abs(a.score - b.score) for a, b in zip(plain, adapted.score(CONVERSATIONS))) > 1e-3
    assert not any(k.startswith("base_model") or "lora" in k for k in model.state_dict())


@pytest.mark.slow
def test_the_packaged_default_exports_and_loads_in_transformers(tmp_path, embedded_scorer):
    """The default heads on the embedded SmolLM2 GGUF backbone (early exit at 16 of 30 blocks, heads with a
    bias): transformers' scores equal rewardsvc's to 1e-5 (right padding, as rewardsvc pads), and the round trip
    is the identity."""
    from rewardsvc.model.scorer import DEFAULT_MODEL_DIR

    assert cli_main(["export", str(DEFAULT_MODEL_DIR), str(tmp_path / "out")]) == 0
    model, tokenizer = load_hf(tmp_path / "out")
    expected = embedded_scorer.score(CONVERSATIONS)
    assert_matches_rewardsvc(hf_outputs(model, tokenizer, CONVERSATIONS, "right"), expected, embedded_scorer.attributes)
    # Left padding (RewardBench's) runs other attention masks: rounding only (1.3e-5 measured on a score of 0.19).
    left = hf_outputs(model, tokenizer, CONVERSATIONS, "left").score
    torch.testing.assert_close(left, torch.tensor([r.score for r in expected]), atol=5e-5, rtol=0)
    reloaded = Scorer.load(tmp_path / "out").score(CONVERSATIONS)
    assert [r.score for r in reloaded] == [r.score for r in expected]
