"""Backbone loading: embedded GGUF default (cached), errors, dtype, PEFT adapters."""

from __future__ import annotations

import os

import pytest
import torch

from rewardsvc.model.backbone_loading import gguf_cache_dir, load_backbone
from rewardsvc.config import EMBEDDED_DEFAULT_BACKBONE, BackboneConfig
from rewardsvc.errors import BackboneError, InvalidInputError


@pytest.mark.slow
def test_embedded_default_loads_from_cache(monkeypatch):
    """The second load reads the cached conversion and never converts the GGUF again. What that buys in seconds
    is bench/load.py's (first vs warm load in new processes, a ratio from one run): a wall-clock bound here
    would fail on a loaded machine (a warm load took 22 s at load average 24) and say nothing on a fast one."""
    import transformers

    load_backbone(BackboneConfig())  # converts once if the cache is cold

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", _refuse_gguf(transformers.AutoModel.from_pretrained))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", _refuse_gguf(transformers.AutoTokenizer.from_pretrained))
    backbone = load_backbone(BackboneConfig())
    assert backbone.model_id == EMBEDDED_DEFAULT_BACKBONE
    assert backbone.hidden_size == 576 and backbone.dtype == torch.float32
    assert sum(p.numel() for p in backbone.model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert backbone.tokenizer.chat_template


def _refuse_gguf(original):
    def load(*args, **kwargs):
        if "gguf_file" in kwargs:
            raise AssertionError(f"the GGUF was converted again instead of read from the cache: {args} {kwargs}")
        return original(*args, **kwargs)

    return load


def test_quantization_needs_cuda(tiny_llama_dir):
    # device="cpu" is explicit, so the error comes whether or not this machine has CUDA: no skip.
    with pytest.raises(BackboneError, match="quantization=4bit needs a CUDA device"):
        load_backbone(BackboneConfig(model=str(tiny_llama_dir), quantization="4bit", device="cpu"))


def test_bad_configs_and_paths(tmp_path):
    with pytest.raises(InvalidInputError, match="backbone.dtype"):
        BackboneConfig(model="x", dtype="float8")
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone(BackboneConfig(model=str(tmp_path / "missing.gguf")))
    with pytest.raises(BackboneError, match="cannot load"):
        load_backbone(BackboneConfig(model=str(tmp_path)))


def test_bfloat16_on_cpu_is_honoured(tiny_llama_dir):
    backbone = load_backbone(BackboneConfig(model=str(tiny_llama_dir), dtype="bfloat16", device="cpu"))
    assert next(backbone.model.parameters()).dtype == torch.bfloat16
    hidden = backbone.hidden_at([[1, 2, 3]], [[2]])
    assert hidden.dtype == torch.float32 and hidden.shape == (1, 1, 32)


def test_lora_adapter_is_applied_and_merged(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from tiny_models import save_tiny_llama

    base_dir = save_tiny_llama(tmp_path / "base", causal_lm=True)
    from transformers import LlamaForCausalLM

    torch.manual_seed(3)
    model = LlamaForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter do something
            torch.nn.init.normal_(p, std=0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    expected_q = layer.base_layer.weight + (4 / 2) * layer.lora_B["default"].weight @ layer.lora_A["default"].weight

    backbone = load_backbone(BackboneConfig(model=str(base_dir), adapter=str(tmp_path / "adapter"), device="cpu"))
    merged_q = backbone.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(merged_q, expected_q.detach(), atol=1e-6, rtol=1e-5)
    plain = AutoModel.from_pretrained(base_dir)
    assert not torch.allclose(plain.layers[0].self_attn.q_proj.weight, merged_q)
    assert "adapter" in backbone.model_id


def test_adapter_for_another_model_is_an_error(tmp_path, tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from tiny_models import tiny_llama_config

    other = LlamaForCausalLM(tiny_llama_config(400, num_hidden_layers=3))
    peft_model = get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(BackboneError, match="adapter"):
        load_backbone(BackboneConfig(model=str(tiny_llama_dir), adapter=str(tmp_path / "adapter"), device="cpu"))


def test_conversion_cache_is_keyed_by_content_not_location(tmp_path, monkeypatch):
    """Two installs of the same GGUF (other directory, other mtime) share one converted copy; other bytes do not."""
    monkeypatch.setenv("REWARDSVC_CACHE", str(tmp_path / "cache"))
    first, second, other = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf", tmp_path / "c" / "m.gguf"
    for path, content in ((first, b"GGUF" * 1000), (second, b"GGUF" * 1000), (other, b"GGUF" * 999 + b"FUGG")):
        path.parent.mkdir()
        path.write_bytes(content)
    os.utime(second, (1_000_000, 1_000_000))
    assert gguf_cache_dir(first) == gguf_cache_dir(second)
    assert gguf_cache_dir(first) != gguf_cache_dir(other)
    assert gguf_cache_dir(first).parent == tmp_path / "cache" / "converted"
    assert gguf_cache_dir(first).name.startswith("m-")
    # Rewriting a file in place (new mtime) is re-hashed, not served from the in-process memo.
    before = gguf_cache_dir(first)
    first.write_bytes(b"GGUF" * 999 + b"FUGG")
    os.utime(first, (2_000_000, 2_000_000))
    assert gguf_cache_dir(first) == gguf_cache_dir(other) != before
