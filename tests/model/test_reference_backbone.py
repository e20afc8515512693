"""Reference-format checkpoints with a quantized or adapted backbone: the backbone part loads through the
same path as a heads-format checkpoint's backbone, the heads keep the strict checks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from rewardsvc.config import BackboneConfig
from rewardsvc.errors import BackboneError, CheckpointError
from rewardsvc.model.scorer import Scorer
from test_checkpoint import CONVERSATIONS, write_reference_checkpoint


def lora_adapter(reference_tensors, config_dir, out_dir):
    """A LoRA adapter (q/v, B randomised) trained-in-form on the causal-LM class of the reference backbone;
    returns the backbone's weights with the adapter merged by hand (W + alpha/r * B @ A)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    model = LlamaForCausalLM(config)
    model.model.load_state_dict({k[len("model.") :]: v for k, v in reference_tensors.items() if k.startswith("model.")})
    torch.manual_seed(5)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    peft_model.save_pretrained(out_dir)
    merged = dict(reference_tensors)
    for i, layer in enumerate(peft_model.base_model.model.model.layers):
        for proj in ("q_proj", "v_proj"):
            lin = getattr(layer.self_attn, proj)
            delta = (4 / 2) * lin.lora_B["default"].weight @ lin.lora_A["default"].weight
            merged[f"model.layers.{i}.self_attn.{proj}.weight"] = (lin.base_layer.weight + delta).detach().clone()
    return merged


def test_adapter_on_a_reference_checkpoint_equals_merged_weights(tmp_path):
    tensors = write_reference_checkpoint(tmp_path / "ref")
    merged = lora_adapter(tensors, tmp_path / "ref", tmp_path / "adapter")
    write_reference_checkpoint(tmp_path / "merged")
    save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp_path / "merged" / "model.safetensors"))

    adapted = Scorer.load(tmp_path / "ref", backbone=BackboneConfig(model=str(tmp_path / "ref"), adapter=str(tmp_path / "adapter"), device="cpu"))
    by_hand = Scorer.load(tmp_path / "merged")
    plain = Scorer.load(tmp_path / "ref")
    assert "+adapter:adapter" in adapted.model_id and adapted.model_id.startswith("reference:")
    got, want, before = adapted.score(CONVERSATIONS), by_hand.score(CONVERSATIONS), plain.score(CONVERSATIONS)
    for a, b in zip(got, want):
        assert abs(a.score - b.score) <= 1e-5
        for name in a.rewards:
            assert abs(a.rewards[name] - b.rewards[name]) <= 1e-5
    assert max(abs(a.score - c.score) for a, c in zip(got, before)) > 1e-3  # the adapter changed something
    assert not (tmp_path / "ref" / "EXECUTED").exists()  # shipped code never ran


def test_quantized_reference_checkpoint_needs_cuda(tmp_path):
    write_reference_checkpoint(tmp_path / "ref")
    for bits in ("8bit", "4bit"):
        with pytest.raises(BackboneError, match=f"quantization={bits} needs a CUDA device"):
            Scorer.load(tmp_path / "ref", backbone=BackboneConfig(model=str(tmp_path / "ref"), quantization=bits, device="cpu"))


def test_adapted_reference_checkpoint_keeps_strict_checks(tmp_path):
    tensors = write_reference_checkpoint(tmp_path / "ref")
    lora_adapter(tensors, tmp_path / "ref", tmp_path / "adapter")
    broken = dict(tensors)
    broken["model.layers.0.mlp.up_proj.weight"] = broken["model.layers.0.mlp.up_proj.weight"][:-1].contiguous()
    del broken["gating.logit_scale"]
    save_file({k: v.contiguous() for k, v in broken.items()}, str(tmp_path / "ref" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.up_proj\.weight: expected"):
        Scorer.load(tmp_path / "ref", backbone=BackboneConfig(model=str(tmp_path / "ref"), adapter=str(tmp_path / "adapter"), device="cpu"))
