"""Mixed precision (model/precision.py): bfloat16 lower blocks, float32 top blocks, norm and heads. Checked on
a tiny 4-block Llama: which parts run in which dtype, that the forward is exactly the hand-written mixed loop,
and how far its scores move from float32 (no timing here)."""

from __future__ import annotations

import pytest
import torch

from rewardsvc.config import BackboneConfig, ScorerConfig
from rewardsvc.errors import BackboneError
from rewardsvc.model.backbone import truncate_backbone
from rewardsvc.model.plan_measurement import compare_scores, measurement_set
from rewardsvc.model.precision import apply_precision, mixed_fp32_top_blocks, precision_copy, precision_name
from rewardsvc.model.scorer import Scorer
from tiny_models import save_tiny_heads, save_tiny_llama


@pytest.fixture(scope="module")
def four_blocks(tmp_path_factory):
    root = tmp_path_factory.mktemp("four-blocks")
    llama = save_tiny_llama(root / "llama", "chatml", num_hidden_layers=4)
    return llama, save_tiny_heads(root / "heads", llama)


@pytest.fixture(scope="module")
def fp32(four_blocks):
    return Scorer.load(four_blocks[1], config=ScorerConfig(batch_plan="padded"))


@pytest.fixture(scope="module")
def mixed(four_blocks):
    llama, heads = four_blocks
    return Scorer.load(heads, backbone=BackboneConfig(model=str(llama), dtype="mixed"), config=ScorerConfig(batch_plan="padded"))


def test_the_split_top_quarter_in_fp32():
    assert [mixed_fp32_top_blocks(d) for d in (2, 4, 5, 16, 30)] == [1, 1, 2, 4, 8]
    with pytest.raises(BackboneError, match="at least 2"):
        mixed_fp32_top_blocks(1)


def test_mixed_runs_the_lower_blocks_in_bf16_and_the_rest_in_fp32(mixed):
    model = mixed.backbone.model
    assert [next(b.parameters()).dtype for b in model.layers] == [torch.bfloat16] * 3 + [torch.float32]
    assert model.embed_tokens.weight.dtype == model.norm.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in mixed.heads.parameters())
    assert precision_name(mixed.backbone) == "mixed(bfloat16 blocks 1-3, float32 blocks 4-4)"
    info = mixed.model_info()
    assert info["dtype"] == "mixed(bfloat16 blocks 1-3, float32 blocks 4-4)"
    assert info["scoring_plan"]["precision"] == "mixed" and info["scoring_plan"]["source"] == "explicit"


def test_the_forward_is_the_hand_written_mixed_loop(fp32, mixed):
    ids = torch.tensor([list(mixed.encode([{"role": "user", "content": "Sort a list?"},
                                            {"role": "assistant", "content": "Use sorted(items)."}]).input_ids)])  # fmt: skip
    model = mixed.backbone.model
    with torch.inference_mode():
        got = model(input_ids=ids, use_cache=False).last_hidden_state
        hidden = model.embed_tokens(ids)
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        cos, sin = model.rotary_emb(hidden, position_ids=positions)  # float32
        for block in model.layers:
            dtype = next(block.parameters()).dtype
            mask = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()[None, None]
            hidden = block(hidden.to(dtype), attention_mask=mask, position_embeddings=(cos.to(dtype), sin.to(dtype)),
                           position_ids=positions)  # fmt: skip
        want = model.norm(hidden)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # And it is not the fp32 forward: the lower blocks really ran in bf16.
    with torch.inference_mode():
        full = fp32.backbone.model(input_ids=ids, use_cache=False).last_hidden_state
    assert not torch.equal(full, got)


def test_mixed_scores_stay_close_to_fp32_on_the_measurement_set(fp32, mixed):
    encoded, pairs = measurement_set(fp32)
    reference = [r.score for r in fp32.score_encoded(encoded)]
    mixed_scores = [r.score for r in mixed.score_encoded(encoded)]
    bf16 = fp32.with_config(fp32.config)
    bf16.backbone = precision_copy(fp32.backbone, "bfloat16")
    bf16_scores = [r.score for r in bf16.score_encoded(encoded)]
    mixed_agree, mixed_dev = compare_scores(mixed_scores, reference, pairs)
    bf16_agree, bf16_dev = compare_scores(bf16_scores, reference, pairs)
    # A random 4-block model of width 32 is far more sensitive than a trained one; these bounds are loose, and
    # the criteria auto applies (>= 99 %, <= 0.05 std) are checked at load, on the real model, not here.
    assert 0 < mixed_dev < 0.5 and 0 < bf16_dev < 0.5
    assert mixed_agree == bf16_agree == 1.0


def test_mixed_batch_plans_and_shared_prompts_agree(mixed):
    prompt = [{"role": "user", "content": "How do I sort a list in Python?"}]
    convs = [prompt + [{"role": "assistant", "content": a}] for a in ("Use sorted(items).", "items.sort() sorts in place, sorted(items) copies.", "No.")]  # fmt: skip
    padded = [r.score for r in mixed.with_config(ScorerConfig(batch_plan="padded", share_prompts=False)).score(convs)]
    for config in (ScorerConfig(batch_plan="packed", share_prompts=False), ScorerConfig(batch_plan="one-per-forward"),
                   ScorerConfig(batch_plan="padded", share_prompts=True)):  # fmt: skip
        # bf16 rounding differs with the batch's shape: close, not equal.
        assert [r.score for r in mixed.with_config(config).score(convs)] == pytest.approx(padded, abs=2e-2)


def test_precision_conversions_are_one_way(tiny_scorer):
    copy_ = precision_copy(tiny_scorer.backbone, "bfloat16")
    assert copy_.dtype == torch.bfloat16 and tiny_scorer.backbone.dtype == torch.float32  # the original kept
    assert apply_precision(copy_, "bfloat16") is copy_
    with pytest.raises(BackboneError, match="convert a float32 copy"):
        apply_precision(copy_, "mixed")
    with pytest.raises(BackboneError, match="precision must be one of"):
        apply_precision(copy_, "int8")


def test_truncating_a_mixed_backbone_is_refused(four_blocks, fp32):
    mixed = precision_copy(fp32.backbone, "mixed")
    assert apply_precision(mixed, "mixed") is mixed and mixed.fp32_top_blocks == 1  # idempotent
    with pytest.raises(BackboneError, match="before converting it to mixed"):
        truncate_backbone(mixed, 2)
