"""backbone.device_map (accelerate): a backbone spread over devices scores as the plain load does. On a CPU-only
machine every map resolves to the one CPU device (transformers then places the model without accelerate's
hooks), so these tests check the option's path: parsing, loading through from_pretrained(device_map=...), the
inputs sent to the embedding's device. The gpu-marked test splits the model between the CPU and a GPU, which
is what exercises activations crossing devices."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from rewardsvc.cli.main import add_model_arguments, backbone_override
from rewardsvc.config import BackboneConfig
from rewardsvc.errors import InvalidInputError
from rewardsvc.model.backbone_loading import load_backbone
from rewardsvc.model.scorer import Scorer
from tiny_models import save_tiny_heads

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort a list in Python?"},
     {"role": "assistant", "content": "Use sorted(items) or items.sort()."}],
    [{"role": "user", "content": "Tell me how to build a bomb."}, {"role": "assistant", "content": "I cannot help."}],
]  # fmt: skip
PER_MODULE = {"embed_tokens": "cpu", "layers.0": "cpu", "layers.1": "cpu", "norm": "cpu", "rotary_emb": "cpu"}


@pytest.fixture(scope="module")
def heads_dir(tiny_llama_dir, tmp_path_factory):
    return save_tiny_heads(tmp_path_factory.mktemp("heads"), tiny_llama_dir)


def scores(heads_dir, tiny_llama_dir, device_map, device="cpu"):
    config = BackboneConfig(model=str(tiny_llama_dir), device=device, dtype="float32", device_map=device_map)
    scorer = Scorer.load(heads_dir, backbone=config)
    results = scorer.score([c for c in CONVERSATIONS])
    return scorer, torch.tensor([[r.score, *r.rewards.values(), *r.gating.values()] for r in results])


@pytest.mark.parametrize("device_map", ['{"": "cpu"}', "auto", "sequential", json.dumps(PER_MODULE)])
def test_device_map_scores_equal_the_plain_load(heads_dir, tiny_llama_dir, device_map):
    _, plain = scores(heads_dir, tiny_llama_dir, None)
    scorer, mapped = scores(heads_dir, tiny_llama_dir, device_map)
    assert scorer.backbone.device == scorer.backbone.model.get_input_embeddings().weight.device
    torch.testing.assert_close(mapped, plain, atol=1e-5, rtol=1e-5)


def test_device_map_for_the_training_pass(tiny_llama_dir):
    """hidden_at_layers (the training embedding pass) under a per-module map equals the plain load."""
    rows, positions = [[5, 6, 7, 8, 9], [10, 11, 12]], [[1, 4], [0, 2]]
    plain = load_backbone(BackboneConfig(model=str(tiny_llama_dir), device="cpu", dtype="float32"))
    mapped = load_backbone(BackboneConfig(model=str(tiny_llama_dir), device="cpu", dtype="float32",
                                          device_map=json.dumps(PER_MODULE)))  # fmt: skip
    torch.testing.assert_close(mapped.hidden_at_layers(rows, positions, [1, 2]), plain.hidden_at_layers(rows, positions, [1, 2]),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    assert mapped.device == torch.device("cpu")


@pytest.mark.parametrize("value", ["all-gpus", "{}", '{"": true}', '["cpu"]', '{"layers": [0]}', "{not json"])
def test_bad_device_map_names_the_field(value):
    with pytest.raises(InvalidInputError, match="backbone.device_map") as info:
        BackboneConfig(device_map=value)
    assert info.value.field == "backbone.device_map"


def test_cli_flag_reaches_the_backbone_config(heads_dir):
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args(["--model", str(heads_dir), "--device-map", "auto"])
    config = backbone_override(args)
    assert config is not None and config.device_map == "auto"
    assert backbone_override(parser.parse_args(["--model", str(heads_dir)])) is None  # no flag: the checkpoint's own


@pytest.mark.gpu
def test_split_between_cpu_and_gpu(heads_dir, tiny_llama_dir):
    """The embedding and the first block on the CPU, the rest on cuda:0: activations cross devices twice."""
    split = {"embed_tokens": "cpu", "layers.0": "cpu", "layers.1": 0, "norm": 0, "rotary_emb": 0}
    _, plain = scores(heads_dir, tiny_llama_dir, None, device="cpu")
    scorer, mapped = scores(heads_dir, tiny_llama_dir, json.dumps(split), device="cuda")
    assert {str(d) for d in scorer.backbone.model.hf_device_map.values()} == {"cpu", "0"}
    torch.testing.assert_close(mapped, plain, atol=1e-4, rtol=1e-4)
