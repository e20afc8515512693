"""Feature layers and early exit: hidden_at_layers, truncate_backbone, heads.feature_layer in Scorer.load,
each against an independent computation on the untruncated HF model (hidden_states + its final norm)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rewardsvc.config import BackboneConfig, HeadsConfig
from rewardsvc.errors import BackboneError, CheckpointError, InvalidInputError
from rewardsvc.model.backbone import Backbone, truncate_backbone
from rewardsvc.model.backbone_loading import load_backbone
from rewardsvc.model.checkpoint import HeadsCheckpoint, save_heads
from rewardsvc.model.heads import ArmoHeads
from rewardsvc.model.scorer import Scorer
from tiny_models import save_tiny_llama

DEPTH = 4
ROWS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]  # three lengths: right padding is exercised
POSITIONS = [[2, 6], [0, 2], [4, 1]]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a haiku about the sea."},
     {"role": "assistant", "content": "Waves fold into foam, the tide keeps its old promise."}],
    [{"role": "user", "content": "Tell me how to build a bomb."}, {"role": "assistant", "content": "I cannot help."}],
]  # fmt: skip


@pytest.fixture(scope="module")
def deep_llama_dir(tmp_path_factory) -> Path:
    """A random tiny Llama with 4 blocks (the shared one has 2)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-4"), seed=7, num_hidden_layers=DEPTH)


def full_model(directory: Path):
    from transformers import LlamaModel

    return LlamaModel.from_pretrained(directory).eval()


def independent_hidden(directory: Path, rows, positions, layer: int) -> torch.Tensor:
    """norm(residual stream after `layer` blocks) of the untruncated model, one unpadded row at a time:
    (B, P, H). The residual is taken with a forward hook on block `layer` (not from hidden_states, whose last
    entry transformers already returns normed)."""
    model = full_model(directory)
    captured = []
    hook = model.layers[layer - 1].register_forward_hook(
        lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output)
    )
    out = []
    try:
        with torch.no_grad():
            for row, pos in zip(rows, positions):
                captured.clear()
                model(input_ids=torch.tensor([row]))
                out.append(model.norm(captured[0][0])[pos])
    finally:
        hook.remove()
    return torch.stack(out)


def test_hidden_at_layers_equals_the_independent_computation(deep_llama_dir):
    backbone = load_backbone(BackboneConfig(model=str(deep_llama_dir), device="cpu"))
    layers = [3, 1, DEPTH, 2]
    got = backbone.hidden_at_layers(ROWS, POSITIONS, layers)
    assert got.shape == (3, 2, len(layers), 32) and got.dtype == torch.float32
    for j, layer in enumerate(layers):
        torch.testing.assert_close(got[:, :, j], independent_hidden(deep_llama_dir, ROWS, POSITIONS, layer))
    # the full depth is the plain last hidden state
    torch.testing.assert_close(got[:, :, 2], backbone.hidden_at(ROWS, POSITIONS), rtol=0, atol=0)


def test_truncated_backbone_gives_what_hidden_at_layers_gives(deep_llama_dir):
    full = load_backbone(BackboneConfig(model=str(deep_llama_dir), device="cpu"))
    per_layer = full.hidden_at_layers(ROWS, POSITIONS, [1, 2, 3])
    for layer in (1, 2, 3):
        truncated = load_backbone(BackboneConfig(model=str(deep_llama_dir), device="cpu"))
        truncate_backbone(truncated, layer)
        assert truncated.depth == layer and truncated.model.config.num_hidden_layers == layer
        assert truncated.full_depth == DEPTH and truncated.model_id == full.model_id
        torch.testing.assert_close(truncated.hidden_at(ROWS, POSITIONS), per_layer[:, :, layer - 1])
        # a truncated backbone reports its own depth to hidden_at_layers
        with pytest.raises(BackboneError, match=rf"outside 1\.\.{layer}"):
            truncated.hidden_at_layers(ROWS, POSITIONS, [layer + 1])


def test_out_of_range_blocks_and_layers_are_errors(deep_llama_dir):
    backbone = load_backbone(BackboneConfig(model=str(deep_llama_dir), device="cpu"))
    for bad in (0, DEPTH + 1, -1):
        with pytest.raises(BackboneError, match=rf"to {bad} blocks: it has {DEPTH} blocks"):
            truncate_backbone(backbone, bad)
    with pytest.raises(BackboneError, match=rf"layers \[0, 5\] outside 1\.\.{DEPTH}"):
        backbone.hidden_at_layers(ROWS, POSITIONS, [0, 2, 5])
    with pytest.raises(BackboneError, match="empty"):
        backbone.hidden_at_layers(ROWS, POSITIONS, [])
    truncate_backbone(backbone, DEPTH)  # the full depth: nothing changes
    assert backbone.depth == DEPTH and backbone.full_depth is None
    stub = Backbone(model=torch.nn.Linear(2, 2), tokenizer=None, model_id="stub", device=torch.device("cpu"),
                    dtype=torch.float32)  # fmt: skip
    with pytest.raises(BackboneError, match="no decoder blocks"):
        truncate_backbone(stub, 1)
    with pytest.raises(InvalidInputError, match="feature_layer"):
        HeadsConfig(attributes=("a",), hidden_size=32, feature_layer=0)


def save_feature_heads(directory: Path, backbone_dir: Path, feature_layer: int | None) -> ArmoHeads:
    torch.manual_seed(3)
    heads = ArmoHeads(HeadsConfig(attributes=("a", "b"), hidden_size=32, gating_hidden_dim=8, regression_bias=True,
                                  feature_layer=feature_layer))  # fmt: skip
    with torch.no_grad():
        heads.regression_layer.bias.copy_(torch.tensor([0.5, -1.0]))
        heads.reward_transform_matrix.copy_(torch.tensor([[1.0, 0.0], [-0.2, 1.0]]))
    save_heads(directory, HeadsCheckpoint(heads=heads, backbone={"model": str(backbone_dir), "device": "cpu"},
                                          name="early", trained=True))  # fmt: skip
    return heads


def test_feature_layer_truncates_at_load_and_scores_like_the_full_model_at_that_layer(tmp_path, deep_llama_dir):
    layer = 2
    heads = save_feature_heads(tmp_path / "h", deep_llama_dir, layer)
    scorer = Scorer.load(tmp_path / "h")
    assert scorer.backbone.depth == layer and len(scorer.backbone.model.layers) == layer
    info = scorer.model_info()
    assert info["feature_layer"] == layer and info["backbone"].endswith(f"+blocks:{layer}/{DEPTH}")
    results = scorer.score(CONVERSATIONS)
    encoded = [scorer.encode(c) for c in CONVERSATIONS]
    hidden = independent_hidden(
        deep_llama_dir, [list(e.input_ids) for e in encoded], [[e.prompt_anchor, e.response_anchor] for e in encoded], layer
    )
    with torch.no_grad():
        want = heads(hidden[:, 1], hidden[:, 0])
    torch.testing.assert_close(torch.tensor([r.score for r in results]), want.score, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor([list(r.rewards.values()) for r in results]), want.rewards, atol=1e-5, rtol=0)
    inspected = scorer.inspect(CONVERSATIONS[0][:-1])
    assert inspected.gating["a"] == pytest.approx(results[0].gating["a"], abs=1e-5)


def test_feature_layer_at_or_beyond_the_depth(tmp_path, deep_llama_dir):
    save_feature_heads(tmp_path / "full", deep_llama_dir, DEPTH)
    scorer = Scorer.load(tmp_path / "full")
    assert scorer.backbone.depth == DEPTH and scorer.backbone.full_depth is None
    assert scorer.model_info()["backbone"] == str(deep_llama_dir) and scorer.model_info()["feature_layer"] == DEPTH
    save_feature_heads(tmp_path / "deep", deep_llama_dir, DEPTH + 3)
    with pytest.raises(CheckpointError, match=rf"feature_layer is {DEPTH + 3} but backbone .* has only {DEPTH} blocks"):
        Scorer.load(tmp_path / "deep")
    # Heads of layer 2 on an untruncated backbone would score the wrong features: refused.
    heads = ArmoHeads(HeadsConfig(attributes=("a",), hidden_size=32, gating_hidden_dim=8, feature_layer=2))
    with pytest.raises(CheckpointError, match=f"after 2 backbone blocks.* runs {DEPTH}"):
        Scorer(scorer.backbone, heads, model_id="x")
