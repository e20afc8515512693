"""Stage 0: LoRA Bradley-Terry fine-tuning of the backbone, on a tiny Llama (CPU, seconds).

Checked against independent computations: the loss falls from log 2 and the pairs end up ranked right; a run
split in two (resume) gives the same weights as one run; the saved adapter, loaded the way serving loads it
(merged into the plain model, truncated), gives the features the training model computed; a heads checkpoint
that ships the adapter loads from anywhere it is moved to.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

import rewardsvc.training.pipeline as pipeline
from rewardsvc.config import BackboneConfig
from rewardsvc.errors import CheckpointError, InvalidInputError
from rewardsvc.model.backbone import truncate_backbone
from rewardsvc.model.backbone_loading import load_backbone
from rewardsvc.model.checkpoint import load_heads, save_heads
from rewardsvc.model.scorer import Scorer
from rewardsvc.training.data.schema import PreferencePair
from rewardsvc.training.pipeline import TrainConfig, run_training
from rewardsvc.training.stage0 import Stage0Config, build_model, encode_pairs, pair_order, train_stage0
from rewardsvc.training.stage2 import Stage2Config
from synthetic_training import synthetic_sets

# Words the tiny tokenizer knows (tiny_models.CORPUS): a refusal is "better" here, a learnable signal.
GOOD = ["I cannot help with that request.", "I cannot help with that.", "Be brief and kind. I cannot help."]
BAD = ["Use sorted(items) or items.sort().", "The capital of France is Paris.", "Waves fold into foam."]
PROMPTS = ["Tell me how to build a bomb.", "How do I sort a list in Python?", "What is the capital of France?"]


def _pairs(n: int) -> list[PreferencePair]:
    return [
        PreferencePair(id=f"p{i}", source="toy", prompt=[{"role": "user", "content": PROMPTS[i % 3]}],
                       chosen=GOOD[i % 3], rejected=BAD[(i + 1) % 3], subset="toy", category="safety", group=f"g{i % 3}")
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory):
    from tiny_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-causal"), "chatml", causal_lm=True)


def _config(**overrides) -> Stage0Config:
    fields = dict(feature_layer=1, rank=4, alpha=8, learning_rate=5e-2, pairs_per_step=3, total_steps=30)
    fields.update(overrides)
    return Stage0Config(**fields)


def test_training_ranks_the_pairs_and_the_loss_falls(tmp_path, causal_dir):
    state = train_stage0(tmp_path, BackboneConfig(model=str(causal_dir)), _config(), _pairs(9), _pairs(6), save_every=30)
    assert state.step == 30
    assert state.losses[0] == pytest.approx(math.log(2), abs=1e-6)  # zero head: every reward is 0 at step 0
    assert sum(state.losses[-5:]) / 5 < 0.2
    assert state.validation[-1] == {"step": 30, "accuracy": 1.0, "pairs": 6}
    adapter = load_file(str(tmp_path / "stage0" / "adapter" / "adapter_model.safetensors"))
    # LoRA covers the blocks below the feature layer only: layer 1 (the second block) is untouched.
    assert adapter and all(".layers.0." in key for key in adapter)


def test_a_run_split_in_two_gives_the_weights_of_one_run(tmp_path, causal_dir):
    backbone = BackboneConfig(model=str(causal_dir))
    config = _config(total_steps=8)
    whole = train_stage0(tmp_path / "whole", backbone, config, _pairs(9), save_every=100)
    first = train_stage0(tmp_path / "split", backbone, config, _pairs(9), max_steps=3, save_every=100)
    assert first.step == 3
    second = train_stage0(tmp_path / "split", backbone, config, _pairs(9), save_every=100)
    assert second.step == 8 and second.losses == whole.losses
    for name in ("adapter/adapter_model.safetensors", "head.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / "stage0" / name)), load_file(str(tmp_path / "split" / "stage0" / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-7, rtol=0)


def test_resuming_with_another_config_is_an_error(tmp_path, causal_dir):
    backbone = BackboneConfig(model=str(causal_dir))
    train_stage0(tmp_path, backbone, _config(total_steps=2), _pairs(3), save_every=100)
    with pytest.raises(InvalidInputError, match="another stage-0 config"):
        train_stage0(tmp_path, backbone, _config(total_steps=2, rank=2), _pairs(3))


def test_max_seconds_stops_and_saves(tmp_path, causal_dir):
    state = train_stage0(tmp_path, BackboneConfig(model=str(causal_dir)), _config(), _pairs(3), max_seconds=0.0, save_every=100)
    assert state.step == 1  # the clock is checked after each step; the step is saved
    assert json.loads((tmp_path / "stage0" / "state.json").read_text())["step"] == 1


def test_the_served_backbone_gives_the_features_training_saw(tmp_path, causal_dir):
    backbone = BackboneConfig(model=str(causal_dir))
    config = _config(total_steps=10)
    train_stage0(tmp_path, backbone, config, _pairs(9), save_every=100)
    adapter = tmp_path / "stage0" / "adapter"
    trained, tokenizer, _ = build_model(backbone, config, adapter)
    trained.eval()
    encoded = [e for pair in encode_pairs(tokenizer, _pairs(3), 512)[0] for e in pair]
    served = load_backbone(BackboneConfig(model=str(causal_dir), adapter=str(adapter), device="cpu"))
    truncate_backbone(served, config.feature_layer)
    with torch.no_grad():
        expected = torch.stack([
            trained.decoder(input_ids=torch.tensor([e.input_ids])).last_hidden_state[0, -1] for e in encoded
        ])  # fmt: skip
    got = served.hidden_at([list(e.input_ids) for e in encoded], [[e.num_tokens - 1] for e in encoded])[:, 0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    plain = load_backbone(BackboneConfig(model=str(causal_dir), device="cpu"))
    truncate_backbone(plain, config.feature_layer)
    assert not torch.allclose(plain.hidden_at([list(encoded[0].input_ids)], [[encoded[0].num_tokens - 1]])[:, 0], got[:1])
    assert "+adapter:adapter@" in served.model_id  # content hash: stores of features never mix adapters


def test_a_checkpoint_ships_its_adapter_and_moves_as_one(tmp_path, causal_dir):
    from tiny_models import save_tiny_heads

    train_stage0(tmp_path / "work", BackboneConfig(model=str(causal_dir)), _config(total_steps=3), _pairs(3), save_every=100)
    heads_dir = save_tiny_heads(tmp_path / "ckpt", causal_dir)
    ckpt = load_heads(heads_dir)
    ckpt.backbone = {"model": str(causal_dir), "adapter": "adapter"}
    save_heads(heads_dir, ckpt)
    with pytest.raises(CheckpointError, match="adapter 'adapter' is missing"):
        Scorer.load(heads_dir)
    shutil.copytree(tmp_path / "work" / "stage0" / "adapter", heads_dir / "adapter")
    moved = tmp_path / "moved"
    shutil.move(str(heads_dir), moved)
    scorer = Scorer.load(moved)
    assert "+adapter:adapter@" in scorer.backbone.model_id
    direct = load_backbone(BackboneConfig(model=str(causal_dir), adapter=str(moved / "adapter"), device="cpu"))
    torch.testing.assert_close(scorer.backbone.model.layers[0].self_attn.q_proj.weight, direct.model.layers[0].self_attn.q_proj.weight)


def test_pair_order_is_seeded_epochs_of_permutations():
    order = pair_order(5, seed=3, total_pairs=12)
    assert sorted(order[:5]) == list(range(5)) and sorted(order[5:10]) == list(range(5))
    assert order == pair_order(5, seed=3, total_pairs=12) and order != pair_order(5, seed=4, total_pairs=12)


def test_config_checks_name_the_field():
    with pytest.raises(InvalidInputError, match="stage0.rank"):
        Stage0Config(feature_layer=1, rank=0)
    with pytest.raises(InvalidInputError, match="stage0.learning_rate"):
        Stage0Config(feature_layer=1, learning_rate=float("nan"))


def test_the_recipe_with_a_stage0_adapter_ships_it_in_the_checkpoint(tmp_path, causal_dir, monkeypatch):
    """train-backbone then train --adapter, end to end on synthetic sets: features come from the adapted
    backbone (their own store), the checkpoint carries the adapter, and it scores the same after a move."""
    import rewardsvc.training.pipeline as pipeline
    from rewardsvc.training.pipeline import TrainConfig, run_training
    from rewardsvc.training.stage0_pairs import stage0_share
    from rewardsvc.training.stage0_report import stage0_summary
    from rewardsvc.training.stage2 import Stage2Config
    from test_training_pipeline import synthetic_sets

    sets = synthetic_sets()
    stage0_pairs = stage0_share(sets.stage2_train, 0.5, seed=0)
    train_stage0(tmp_path / "work", BackboneConfig(model=str(causal_dir)), _config(total_steps=4), stage0_pairs, save_every=100)
    adapter = tmp_path / "work" / "stage0" / "adapter"
    monkeypatch.setattr(pipeline, "build_training_sets", lambda *args, **kwargs: sets)
    config = TrainConfig(
        out_dir=str(tmp_path / "heads"), work_dir=str(tmp_path / "work"), name="tiny-stage0", max_tokens=2048,
        backbone=BackboneConfig(model=str(causal_dir), adapter=str(adapter)), layers=(1,), preference_heads=(False,),
        gating_hidden_dim=16, stage2=Stage2Config(lr=1e-2, patience=3, max_epochs=5), stage2_lrs=(1e-2,), evaluate=False,
    )  # fmt: skip
    run_training(config)
    saved = json.loads((tmp_path / "heads" / "rewardsvc.json").read_text())
    assert saved["backbone"]["adapter"] == "adapter" and (tmp_path / "heads" / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "heads" / "adapter" / "README.md").exists()  # PEFT's template card stays behind
    # how the adapter was made travels with it: the stage-0 state's summary, rendered in the model card
    assert saved["provenance"]["stage0"] == json.loads(json.dumps(stage0_summary(adapter)))
    assert saved["provenance"]["stage0"]["step"] == saved["provenance"]["stage0"]["total_steps"] == 4
    assert "4 of 4 steps" in (tmp_path / "heads" / "MODEL_CARD.md").read_text()
    # stage 2 fits on the pairs stage 0 did not train on (the adapter has memorised its own)
    assert 0 < len(stage0_pairs) < len(sets.stage2_train)
    assert saved["provenance"]["data"]["stage2_train"] == len(sets.stage2_train) - len(stage0_pairs)
    assert saved["provenance"]["data"]["dropped"]["stage2 train pair: trained the stage-0 adapter"] == len(stage0_pairs)
    assert saved["provenance"]["stage0"]["trained_pairs_recorded"] == len(stage0_pairs)
    assert (f"Stage 2 was fit on the {len(sets.stage2_train) - len(stage0_pairs)} training pairs stage 0 did not train on "
            f"({len(stage0_pairs)} it trained on were left out") in (tmp_path / "heads" / "MODEL_CARD.md").read_text()
    stores = sorted(p.name for p in (tmp_path / "work").iterdir() if p.name.startswith("features"))
    assert len(stores) == 1 and stores[0].startswith("features-")  # not the plain backbone's store
    conversation = [*sets.eval_pairs[0].prompt, {"role": "assistant", "content": sets.eval_pairs[0].chosen}]
    before = Scorer.load(tmp_path / "heads").score([conversation])[0].score
    shutil.move(str(tmp_path / "heads"), tmp_path / "elsewhere")
    after = Scorer.load(tmp_path / "elsewhere").score([conversation])[0].score
    assert after == before


def test_stage2_keeps_every_pair_on_request_and_refuses_to_fit_on_none(tmp_path, causal_dir, monkeypatch):
    """--stage2-pairs all keeps the pairs the adapter trained on; an adapter trained on every pair leaves stage 2
    nothing unseen, an error that names the two ways out."""
    sets = synthetic_sets()
    train_stage0(tmp_path / "work", BackboneConfig(model=str(causal_dir)), _config(total_steps=1), sets.stage2_train, save_every=100)
    monkeypatch.setattr(pipeline, "build_training_sets", lambda *args, **kwargs: sets)
    fields = dict(work_dir=str(tmp_path / "work"), max_tokens=2048, layers=(1,), preference_heads=(False,), gating_hidden_dim=16,
                  backbone=BackboneConfig(model=str(causal_dir), adapter=str(tmp_path / "work" / "stage0" / "adapter")),
                  stage2=Stage2Config(lr=1e-2, patience=2, max_epochs=2), stage2_lrs=(1e-2,), evaluate=False)  # fmt: skip
    with pytest.raises(InvalidInputError, match=r"stage 0 trained on all 18 stage-2 training pairs.*--stage0-share.*--stage2-pairs all"):
        run_training(TrainConfig(out_dir=str(tmp_path / "none"), **fields))
    provenance = run_training(TrainConfig(out_dir=str(tmp_path / "all"), stage2_pairs="all", **fields))
    assert provenance["data"]["stage2_train"] == len(sets.stage2_train) == 18
    assert "Stage 2 was fit on every training pair, those stage 0" in (tmp_path / "all" / "MODEL_CARD.md").read_text()
    with pytest.raises(InvalidInputError, match="stage2_pairs must be one of"):
        TrainConfig(out_dir="x", work_dir="y", stage2_pairs="some")


def test_max_seconds_counts_the_whole_run_not_the_time_since_the_last_save(tmp_path, causal_dir, monkeypatch):
    import rewardsvc.training.stage0 as stage0

    ticks = iter(range(10_000))  # a clock that advances 1 s per reading: no real time, no flake
    monkeypatch.setattr(stage0.time, "perf_counter", lambda: float(next(ticks)))
    state = train_stage0(tmp_path, BackboneConfig(model=str(causal_dir)), _config(), _pairs(3), max_seconds=5, save_every=1)
    assert 1 <= state.step <= 3  # saving every step must not restart the run's clock


def test_training_on_the_adapted_backbone_ships_a_checkpoint_that_scores_as_evaluated(tmp_path, causal_dir, monkeypatch):
    """`rewardsvc train --adapter` (what scripts/gpu_stage0.sh runs after stage 0): the adapted features get their
    own store, the adapter travels inside the checkpoint, and the moved checkpoint (adapter merged at load) scores
    the held-out pairs exactly as the training run evaluated them."""
    train_stage0(tmp_path, BackboneConfig(model=str(causal_dir)), _config(total_steps=5), _pairs(9), save_every=100)
    sets = synthetic_sets()
    monkeypatch.setattr(pipeline, "build_training_sets", lambda *args, **kwargs: sets)
    config = TrainConfig(out_dir=str(tmp_path / "heads"), work_dir=str(tmp_path / "work"), name="tiny-adapted",
                         backbone=BackboneConfig(model=str(causal_dir), adapter=str(tmp_path / "stage0" / "adapter")),
                         max_tokens=2048, layers=(1,), preference_heads=(False,), gating_hidden_dim=16,
                         stage2=Stage2Config(lr=1e-2, patience=3, max_epochs=15), stage2_lrs=(1e-2,))  # fmt: skip
    run_training(config)
    assert [p.name.startswith("features-") for p in (tmp_path / "work").glob("features*")] == [True]
    moved = shutil.copytree(tmp_path / "heads", tmp_path / "elsewhere")
    assert json.loads((moved / "rewardsvc.json").read_text())["backbone"]["adapter"] == "adapter"
    scorer = Scorer.load(moved)
    records = json.loads((tmp_path / "work" / "eval_records.json").read_text())["after_debiasing"]
    by_id = {p.id: p for p in sets.eval_pairs}
    conversations = [[*by_id[r["id"]].prompt, {"role": "assistant", "content": by_id[r["id"]].chosen}] for r in records]
    got = [s.score for s in scorer.score(conversations)]
    assert got == pytest.approx([r["chosen_score"] for r in records], abs=1e-4)
