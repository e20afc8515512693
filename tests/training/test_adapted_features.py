"""The refit's features of a stage-0-adapted backbone from the plain backbone's state cache (training.adapted_features),
on a tiny random 4-block Llama with a real adapter trained by stage 0 from the cache (CPU, seconds).

Checked against the independent computation, the adapted backbone as serving loads it (adapter merged,
truncated) run in full: equal to 1e-5 from a float32 cache, and within float16 rounding from the default
float16 cache, both for the conversations the cache held and for those it lacked (whose states, added to it,
are the plain backbone's). A whole training run with the cache stores the same features as one without it, and
counts the conversations each way. Errors name the field and what is wrong.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

import rewardsvc.training.pipeline as pipeline
from rewardsvc.config import BackboneConfig
from rewardsvc.errors import InvalidInputError
from rewardsvc.model.backbone import truncate_backbone
from rewardsvc.model.backbone_loading import load_backbone
from rewardsvc.model.encoding import ChatEncoder
from rewardsvc.training.adapted_features import CachedAdaptedFeatures, first_adapted_block
from rewardsvc.training.feature_store import FeatureStore
from rewardsvc.training.pipeline import TrainConfig, features_at_layers, run_training
from rewardsvc.training.stage0_cached import CachedStage0Config, fill_cache, stage0_dir, train_stage0_cached
from rewardsvc.training.stage2 import Stage2Config
from rewardsvc.training.top_blocks import forward_blocks
from synthetic_training import synthetic_sets

DEPTH, LAYER, K = 4, 3, 2  # the adapter covers blocks 1 and 2; the cache holds the states after block 1
LAYERS = (2, 3)  # two feature layers above the cache block, as a store of several layers asks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tiny_models import save_tiny_llama

    root = tmp_path_factory.mktemp("adapted-features")
    model_dir = save_tiny_llama(root / "model", "chatml", causal_lm=True, num_hidden_layers=DEPTH)
    plain = BackboneConfig(model=str(model_dir))
    sets = synthetic_sets()
    config = CachedStage0Config(feature_layer=LAYER, top_blocks=K, rank=4, alpha=8, learning_rate=5e-2, pairs_per_step=3, epochs=2)
    for dtype in ("float32", "float16"):
        fill_cache(root / f"cache-{dtype}", plain, sets.stage2_train, [config.cache_block], 2048, dtype=dtype)
    train_stage0_cached(root / "work", root / "cache-float32", plain, config, sets.stage2_train, probes=False, save_every=100)
    return root, plain, sets, stage0_dir(root / "work", K) / "adapter"


def _adapted(plain: BackboneConfig, adapter):
    backbone = load_backbone(replace(plain, adapter=str(adapter), device="cpu"))
    truncate_backbone(backbone, max(LAYERS))
    return backbone


def _encoded(backbone, sets):
    encoder = ChatEncoder(backbone.tokenizer, 2048, "error")
    pairs = [*sets.stage2_train, *sets.stage2_val]  # stage 0 cached the training pairs only
    return [encoder.encode([*p.prompt, {"role": "assistant", "content": text}]) for p in pairs for text in (p.chosen, p.rejected)]


def test_the_adapter_names_its_first_block(setup):
    _, _, _, adapter = setup
    assert first_adapted_block(adapter) == LAYER - K == 1


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("float16", 1e-2)])
def test_cached_features_are_the_adapted_backbones_full_forward(setup, tmp_path, dtype, tolerance):
    root, plain, sets, adapter = setup
    cache_dir = shutil.copytree(root / f"cache-{dtype}", tmp_path / "cache")  # this test adds to it
    backbone = _adapted(plain, adapter)
    encoded = _encoded(backbone, sets)
    expected_response, expected_prompt = features_at_layers(backbone, LAYERS, 4096)(encoded)
    fn = CachedAdaptedFeatures(backbone, plain, cache_dir, adapter, LAYERS)
    response, prompt = fn(encoded)
    assert fn.from_cache == 2 * len(sets.stage2_train) and fn.added_to_cache == 2 * len(sets.stage2_val)
    scale = expected_response.abs().max()
    assert scale > 0.1  # final-normed states: the bound is relative to a scale of order 1
    torch.testing.assert_close(response, expected_response, atol=tolerance * scale, rtol=0)
    torch.testing.assert_close(prompt, expected_prompt, atol=tolerance * scale, rtol=0)
    # The adapter matters: the plain backbone's features are not these (so the comparison above has teeth).
    unadapted = load_backbone(replace(plain, device="cpu"))
    with torch.no_grad():
        assert not torch.allclose(features_at_layers(unadapted, LAYERS, 4096)(encoded[:2])[0], expected_response[:2], atol=1e-3)
        # What was added is the plain backbone's residual after the cache block, as stage 0 would have cached it.
        for e in encoded[-2:]:
            direct = unadapted.model(input_ids=torch.tensor([list(e.input_ids)]), output_hidden_states=True).hidden_states[fn.start][0]
            torch.testing.assert_close(fn.cache.get(fn.key(e)), direct, atol=1e-3, rtol=1e-3)
    again = CachedAdaptedFeatures(backbone, plain, cache_dir, adapter, LAYERS)  # the next refit finds everything
    second = again(encoded)
    assert again.from_cache == len(encoded) and again.added_to_cache == 0
    assert torch.equal(second[0], response) and torch.equal(second[1], prompt)  # both computed from the stored states


def test_states_beyond_float16_are_used_exact_and_not_stored(setup, tmp_path):
    """A residual over 65504 would be inf in a float16 cache: that conversation's features come from its exact
    states and nothing is stored for it (a refit neither dies an hour in nor caches a state that is not the model's).
    The overflow is injected by scaling the real states; the features are then the top blocks run on those states."""
    root, plain, sets, adapter = setup
    cache_dir = shutil.copytree(root / "cache-float16", tmp_path / "cache")
    backbone = _adapted(plain, adapter)
    encoded = _encoded(backbone, sets)[-2:]  # validation conversations: not in the cache
    fn = CachedAdaptedFeatures(backbone, plain, cache_dir, adapter, LAYERS)
    real = fn._states_below_adapter
    fn._states_below_adapter = lambda e: real(e) * 1e9
    before = len(fn.cache)
    response, _ = fn(encoded)
    assert fn.not_cacheable == 2 and fn.added_to_cache == 0 and len(fn.cache) == before
    assert not any(fn.key(e) in fn.cache for e in encoded)
    with torch.no_grad():
        exact = forward_blocks(fn.decoder, (real(encoded[0]) * 1e9).unsqueeze(0), fn.start, LAYERS[-1])[0]
    torch.testing.assert_close(response[0, -1], exact[encoded[0].response_anchor], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(response).all()


def test_a_training_run_with_the_cache_stores_the_features_of_one_without(setup, tmp_path, monkeypatch):
    root, plain, sets, adapter = setup
    monkeypatch.setattr(pipeline, "build_training_sets", lambda *args, **kwargs: sets)
    common = dict(backbone=replace(plain, adapter=str(adapter)), name="tiny-adapted", max_tokens=2048, layers=LAYERS, stage2_pairs="all",
                  gating_hidden_dim=16, stage2=Stage2Config(lr=1e-2, patience=3, max_epochs=5), stage2_lrs=(1e-2,))  # fmt: skip
    runs = {}
    cache_dir = shutil.copytree(root / "cache-float32", tmp_path / "cache")  # the run adds to it
    for name, cache in (("cached", str(cache_dir)), ("full", None)):
        config = TrainConfig(out_dir=str(tmp_path / name / "heads"), work_dir=str(tmp_path / name / "work"), state_cache=cache, **common)
        runs[name] = (config, run_training(config))
    coverage = runs["cached"][1]["data"]["features"]
    wanted = coverage["conversations_wanted"]
    assert coverage["embedded_from_state_cache"] == 2 * len(sets.stage2_train) < wanted
    assert coverage["embedded_from_state_cache"] + coverage["embedded_and_added_to_state_cache"] == wanted
    assert coverage["embedded_not_cacheable"] == 0
    assert "embedded_from_state_cache" not in runs["full"][1]["data"]["features"]
    stores = {}
    for name, (config, _) in runs.items():
        (store_dir,) = (p for p in (tmp_path / name / "work").iterdir() if p.name.startswith("features-"))
        manifest = json.loads((store_dir / "store.json").read_text())
        store = FeatureStore(store_dir, manifest["backbone_id"], manifest["layers"], manifest["hidden_size"])
        stores[name] = (store, sorted(store._where))
    assert stores["cached"][1] == stores["full"][1]  # the same keys: the same backbone id and conversations
    keys = stores["full"][1]
    a, b = stores["cached"][0].get(keys), stores["full"][0].get(keys)
    torch.testing.assert_close(a.response, b.response, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.prompt, b.prompt, atol=1e-5, rtol=1e-5)


def test_bad_uses_name_the_field(setup, tmp_path):
    root, plain, _, adapter = setup
    with pytest.raises(InvalidInputError, match="needs a stage-0 adapter") as err:
        TrainConfig(out_dir=str(tmp_path / "o"), work_dir=str(tmp_path / "w"), state_cache=str(root / "cache-float32"))
    assert err.value.field == "state_cache"
    backbone = _adapted(plain, adapter)
    with pytest.raises(InvalidInputError, match=r"above the adapter's first block \(1\)") as err:
        CachedAdaptedFeatures(backbone, plain, root / "cache-float32", adapter, (1, 3))
    assert err.value.field == "layers"
    with pytest.raises(InvalidInputError, match="not a state cache") as err:
        CachedAdaptedFeatures(backbone, plain, tmp_path, adapter, LAYERS)
    assert err.value.field == "state_cache"
    everywhere = tmp_path / "adapter"
    everywhere.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    (everywhere / "adapter_config.json").write_text(json.dumps({**config, "layers_to_transform": None}))
    with pytest.raises(InvalidInputError, match="no layers_to_transform") as err:
        first_adapted_block(everywhere)
    assert err.value.field == "adapter"
