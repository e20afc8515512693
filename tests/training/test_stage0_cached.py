"""Stage 0 from a state cache (LoRA on the top k blocks), on a tiny random 4-block Llama (CPU, seconds).

Checked against the model's own forward: the cached states are hidden_states[L-k] of a direct pass (to fp16
precision); the top-k blocks run from an fp32 cache give the truncated backbone's block-L states at every
position (1e-5); the adapter touches blocks L-k..L-1 only and, loaded the way serving loads it (merged,
truncated), gives the anchor states training saw. Plus resume equivalence, content addressing, a killed
caching pass that resumes, and errors that name --top-blocks and its limit.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from rewardsvc.config import BackboneConfig
from rewardsvc.errors import CheckpointError, InvalidInputError
from rewardsvc.model.backbone import truncate_backbone
from rewardsvc.model.backbone_loading import load_backbone
from rewardsvc.training.stage0 import build_model, encode_pairs
from rewardsvc.training.stage0_cached import (
    CachedRewards,
    CachedStage0Config,
    fill_cache,
    stage0_dir,
    train_stage0_cached,
)
from rewardsvc.training.stage0_report import trained_pair_ids
from rewardsvc.training.state_cache import StateCache, cache_states, state_key
from rewardsvc.training.top_blocks import forward_blocks
from rewardsvc.training.data.schema import PreferencePair
from test_stage0 import BAD, GOOD, _pairs

DEPTH, LAYER = 4, 3  # the feature layer is below the top block, as in the default (16 of 30)


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory):
    from tiny_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-causal4"), "chatml", causal_lm=True, num_hidden_layers=DEPTH)


@pytest.fixture(scope="module")
def plain(causal_dir):
    return load_backbone(BackboneConfig(model=str(causal_dir), device="cpu"))


def _config(k: int = 2, **overrides) -> CachedStage0Config:
    fields = dict(feature_layer=LAYER, top_blocks=k, rank=4, alpha=8, learning_rate=5e-2, pairs_per_step=3, epochs=3)
    fields.update(overrides)
    return CachedStage0Config(**fields)


def _ids(plain, n: int = 3) -> list[tuple[int, ...]]:
    encoded, _ = encode_pairs(plain.tokenizer, _pairs(n), 512)
    return [e.input_ids for pair in encoded for e in pair]


def test_cached_states_are_the_direct_forward_at_block_l_minus_k(tmp_path, causal_dir, plain):
    rows = _ids(plain)
    cache = StateCache(tmp_path, plain.model_id, plain.hidden_size)  # float16, the default
    backbone = load_backbone(BackboneConfig(model=str(causal_dir), device="cpu"))
    summary = cache_states(cache, backbone, {ids: ids for ids in rows}, [1, 2])
    assert summary["embedded"] == len(set(rows)) and summary["done"]
    assert backbone.depth == 2  # the pass stopped after the largest cached block
    with torch.no_grad():
        for ids in rows:
            direct = plain.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            for block in (1, 2):
                got = cache.get(state_key(plain.model_id, ids, block))
                assert got.dtype == torch.float32 and got.shape == (len(ids), plain.hidden_size)
                torch.testing.assert_close(got, direct[block][0], atol=1e-3, rtol=1e-3)
    reopened = StateCache(tmp_path, plain.model_id, plain.hidden_size)  # the index is rebuilt from the parts
    assert len(reopened) == len(cache) == 2 * len(set(rows))


def test_the_progress_bar_counts_the_tokens_still_to_cache(tmp_path, causal_dir, plain, capsys):
    rows = sorted(set(_ids(plain)))
    cache = StateCache(tmp_path, plain.model_id, plain.hidden_size)
    cache_states(cache, load_backbone(BackboneConfig(model=str(causal_dir), device="cpu")), {ids: ids for ids in rows[:2]}, [1])
    capsys.readouterr()
    summary = cache_states(cache, load_backbone(BackboneConfig(model=str(causal_dir), device="cpu")), {ids: ids for ids in rows}, [1], bar=True)
    missing = sum(len(ids) for ids in rows[2:])  # the first two are cached: neither embedded nor counted
    assert summary["tokens"] == missing
    err = capsys.readouterr().err
    assert "state cache: 100%" in err and f"{missing}/{missing}" in err


def test_the_top_blocks_from_the_cache_give_the_block_l_states(tmp_path, causal_dir, plain):
    rows = _ids(plain)
    cache = StateCache(tmp_path, plain.model_id, plain.hidden_size, dtype="float32")
    cache_states(cache, load_backbone(BackboneConfig(model=str(causal_dir), device="cpu")), {ids: ids for ids in rows}, [1])
    truncated = load_backbone(BackboneConfig(model=str(causal_dir), device="cpu"))
    truncate_backbone(truncated, LAYER)
    with torch.no_grad():
        for ids in rows:
            expected = truncated.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            got = forward_blocks(truncated.model, cache.get(state_key(plain.model_id, ids, 1)).unsqueeze(0), 1, LAYER)[0]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_second_pass_embeds_nothing_new_and_more_pairs_only_the_new_ones(tmp_path, causal_dir):
    backbone = BackboneConfig(model=str(causal_dir))
    first = fill_cache(tmp_path, backbone, _pairs(3), [1], 512)
    assert first["embedded"] == first["conversations"] > 0 and first["cached_before"] == 0
    parts = sorted(tmp_path.glob("part-*"))
    again = fill_cache(tmp_path, backbone, _pairs(3), [1], 512)
    assert again["embedded"] == 0 and again["done"] and sorted(tmp_path.glob("part-*")) == parts
    same_texts = fill_cache(tmp_path, backbone, _pairs(6), [1], 512)  # other pair ids, the same conversations
    assert same_texts["embedded"] == 0
    new = PreferencePair(id="new", source="toy", prompt=[{"role": "user", "content": "Write a haiku about the sea."}],
                         chosen=GOOD[0], rejected=BAD[0], subset="toy", category="chat", group="g-new")  # fmt: skip
    more = fill_cache(tmp_path, backbone, [*_pairs(3), new], [1], 512)
    assert more["embedded"] == more["conversations"] - first["conversations"] == 2
    also = fill_cache(tmp_path, backbone, _pairs(3), [1, 2], 512)  # another block: one pass adds what is missing
    assert also["embedded"] == first["conversations"]


def test_a_killed_caching_pass_resumes_where_it_stopped(tmp_path, causal_dir, plain):
    rows = list(dict.fromkeys(_ids(plain, 6)))
    calls = []

    def kill_after_two(_tokens):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    cache = StateCache(tmp_path, plain.model_id, plain.hidden_size)
    with pytest.raises(KeyboardInterrupt):
        cache_states(cache, load_backbone(BackboneConfig(model=str(causal_dir), device="cpu")), {i: i for i in rows}, [1],
                     chunk_tokens=1, progress=kill_after_two)  # fmt: skip
    assert not list(tmp_path.glob("*.tmp"))  # parts are complete or absent
    reopened = StateCache(tmp_path, plain.model_id, plain.hidden_size)
    assert len(reopened) == 1  # the first conversation was saved; the second was killed before its save
    rest = cache_states(reopened, load_backbone(BackboneConfig(model=str(causal_dir), device="cpu")), {i: i for i in rows}, [1])
    assert rest["embedded"] == len(rows) - 1 and len(reopened) == len(rows)


def test_training_ranks_the_pairs_and_the_adapter_covers_the_top_blocks_only(tmp_path, causal_dir):
    backbone = BackboneConfig(model=str(causal_dir))
    config = _config(k=2, epochs=10)
    fill_cache(tmp_path / "cache", backbone, [*_pairs(9), *_pairs(6)], [config.cache_block], 512)
    state = train_stage0_cached(tmp_path / "work", tmp_path / "cache", backbone, config, _pairs(9), _pairs(6), save_every=100)
    assert state.step == state.total_steps == math.ceil(10 * 9 / 3)
    assert state.losses[0] == pytest.approx(math.log(2), abs=1e-6)  # zero head at step 0
    assert sum(state.losses[-5:]) / 5 < 0.2
    assert state.validation[-1]["accuracy"] == 1.0
    assert set(state.frozen_probe) >= {"val_accuracy", "C"} and state.frozen_probe["val_pairs"] == 6
    assert state.adapted_probe["val_pairs"] == 6  # refit on the adapted states once the schedule is done
    adapter = load_file(str(stage0_dir(tmp_path / "work", 2) / "adapter" / "adapter_model.safetensors"))
    assert adapter and {key.split(".layers.")[1].split(".")[0] for key in adapter} == {"1", "2"}  # blocks L-k..L-1


def test_the_served_adapter_gives_the_states_training_saw(tmp_path, causal_dir):
    backbone = BackboneConfig(model=str(causal_dir))
    config = _config(k=1, epochs=2)
    fill_cache(tmp_path / "cache", backbone, _pairs(6), [config.cache_block], 512, dtype="float32")
    train_stage0_cached(tmp_path / "work", tmp_path / "cache", backbone, config, _pairs(6), probes=False, save_every=100)
    adapter = stage0_dir(tmp_path / "work", 1) / "adapter"
    model, tokenizer, backbone_id = build_model(backbone, config.as_stage0(), adapter, blocks=config.trained_blocks)
    model.eval()
    rewards = CachedRewards(model, StateCache(tmp_path / "cache", backbone_id, 32, dtype="float32"), config, backbone_id)
    encoded = [e for pair in encode_pairs(tokenizer, _pairs(3), 512)[0] for e in pair]
    with torch.no_grad():
        trained = rewards.anchor_states(encoded)
    served = load_backbone(BackboneConfig(model=str(causal_dir), adapter=str(adapter), device="cpu"))
    truncate_backbone(served, LAYER)
    got = served.hidden_at([list(e.input_ids) for e in encoded], [[e.response_anchor] for e in encoded])[:, 0]
    torch.testing.assert_close(got, trained, atol=1e-5, rtol=1e-5)
    plain = load_backbone(BackboneConfig(model=str(causal_dir), device="cpu"))
    truncate_backbone(plain, LAYER)
    assert not torch.allclose(plain.hidden_at([list(encoded[0].input_ids)], [[encoded[0].response_anchor]])[:, 0], got[:1])


def test_a_run_split_in_two_gives_the_weights_of_one_run(tmp_path, causal_dir):
    backbone = BackboneConfig(model=str(causal_dir))
    config = _config(epochs=2)
    fill_cache(tmp_path / "cache", backbone, _pairs(9), [config.cache_block], 512)
    whole = train_stage0_cached(tmp_path / "whole", tmp_path / "cache", backbone, config, _pairs(9), save_every=100)
    first = train_stage0_cached(tmp_path / "split", tmp_path / "cache", backbone, config, _pairs(9), max_steps=2, save_every=100)
    assert first.step == 2
    second = train_stage0_cached(tmp_path / "split", tmp_path / "cache", backbone, config, _pairs(9), save_every=100)
    assert second.step == whole.step == 6 and second.losses == whole.losses
    for name in ("adapter/adapter_model.safetensors", "head.safetensors"):
        a = load_file(str(stage0_dir(tmp_path / "whole", 2) / name))
        b = load_file(str(stage0_dir(tmp_path / "split", 2) / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-7, rtol=0)


def test_resuming_on_other_pairs_or_without_the_cache_is_an_error(tmp_path, causal_dir):
    backbone = BackboneConfig(model=str(causal_dir))
    config = _config(epochs=1)
    with pytest.raises(CheckpointError, match="no cached states after block 1"):
        train_stage0_cached(tmp_path / "work", tmp_path / "cache", backbone, config, _pairs(3))
    fill_cache(tmp_path / "cache", backbone, _pairs(6), [config.cache_block], 512)
    train_stage0_cached(tmp_path / "work", tmp_path / "cache", backbone, config, _pairs(3), max_steps=1)
    with pytest.raises(InvalidInputError, match="trained on other pairs"):
        train_stage0_cached(tmp_path / "work", tmp_path / "cache", backbone, config, _pairs(6))


def test_the_state_records_the_pairs_trained_on_and_a_finished_run_gains_the_record(tmp_path, causal_dir):
    """The ids of the pairs that fit max_tokens (the too long one is not trained on); a state saved before the
    record existed gets it from one more run of the same command, weights unchanged."""
    import json

    backbone = BackboneConfig(model=str(causal_dir))
    config = _config(epochs=1, max_tokens=256)
    pairs = _pairs(3) + [PreferencePair(id="long", source="toy", prompt=[{"role": "user", "content": "word " * 300}],
                                        chosen=GOOD[0], rejected=BAD[0], subset="toy", category="safety", group="long")]  # fmt: skip
    fill_cache(tmp_path / "cache", backbone, pairs, [config.cache_block], 256)
    state = train_stage0_cached(tmp_path / "work", tmp_path / "cache", backbone, config, pairs, probes=False)
    assert state.trained_pair_ids == ["p0", "p1", "p2"]
    directory = stage0_dir(tmp_path / "work", 2)
    assert trained_pair_ids(directory / "adapter") == {"p0", "p1", "p2"}
    saved = json.loads((directory / "state.json").read_text())
    (directory / "state.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "trained_pair_ids"}))
    assert trained_pair_ids(directory / "adapter") is None  # an older state: no record, stage 2 keeps every pair
    head = load_file(str(directory / "head.safetensors"))
    again = train_stage0_cached(tmp_path / "work", tmp_path / "cache", backbone, config, pairs, probes=False)
    assert again.step == state.step and trained_pair_ids(directory / "adapter") == {"p0", "p1", "p2"}
    torch.testing.assert_close(load_file(str(directory / "head.safetensors")), head, atol=0, rtol=0)


@pytest.mark.parametrize("k", [0, LAYER + 1, -1])
def test_a_bad_k_names_the_flag_and_the_limit(k):
    with pytest.raises(InvalidInputError, match=rf"--top-blocks must be an integer in 1\.\.{LAYER} \(the feature layer --layer {LAYER}\)"):
        _config(k=k)


def test_the_cli_checks_every_k_of_a_list():
    from rewardsvc.cli.train_backbone import _top_blocks

    assert _top_blocks("4,2,4", 16) == [2, 4]
    with pytest.raises(InvalidInputError, match=r"--top-blocks must each be in 1\.\.16 .*\[17\]"):
        _top_blocks("2,17", 16)
    with pytest.raises(InvalidInputError, match="--top-blocks must be integers"):
        _top_blocks("two", 16)


def test_the_cli_caches_once_trains_each_k_and_compares_with_the_frozen_probe(tmp_path, causal_dir, monkeypatch, capsys):
    """`train-backbone --top-blocks 1,2`: one caching pass for both k, then each k in its own directory; the
    printed report carries each k's validation and frozen probe. A second run resumes: nothing new is cached."""
    import json as json_

    import rewardsvc.training.data.build as build
    from rewardsvc.cli.main import main
    from synthetic_training import synthetic_sets

    sets = synthetic_sets(n_pairs=12)
    monkeypatch.setattr(build, "build_training_sets", lambda *args, **kwargs: sets)
    argv = ["train-backbone", "--backbone", str(causal_dir), "--work-dir", str(tmp_path / "work"), "--data-dir", str(tmp_path),
            "--cache-dir", str(tmp_path / "cache"), "--layer", str(LAYER), "--top-blocks", "2,1", "--epochs", "1",
            "--max-tokens", "2048", "--val-pairs", "4", "--learning-rate", "1e-2"]  # fmt: skip
    assert main(argv) == 0
    report = json_.loads(capsys.readouterr().out)
    assert report["cache"]["embedded"] == report["cache"]["conversations"] > 0 and report["cache"]["done"]
    assert report["stage0_share"] == 1.0 and all(run["train_pairs"] == 9 for run in report["runs"])  # every training pair
    assert [run["top_blocks"] for run in report["runs"]] == [1, 2]
    for run in report["runs"]:
        assert run["step"] == run["of"] and (tmp_path / "work" / f"stage0-top{run['top_blocks']}" / "adapter" / "adapter_config.json").is_file()
        assert 1 <= run["validation"]["pairs"] <= 4 and 0 <= run["frozen_probe"]["val_accuracy"] <= 1
    assert main(argv) == 0
    assert json_.loads(capsys.readouterr().out)["cache"]["embedded"] == 0
    bad = list(argv)
    bad[bad.index("--top-blocks") + 1] = "0"
    assert main(bad) == 2
    assert "--top-blocks must each be in 1..3" in capsys.readouterr().err
    assert main([*argv, "--stage0-share", "1.5"]) == 2
    assert "--stage0-share must be a number in (0, 1], got 1.5" in capsys.readouterr().err
