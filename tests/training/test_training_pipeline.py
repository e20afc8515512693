"""The whole training recipe on the real shared data, with a tiny random backbone so it runs in CI time.

What is checked: a loadable, trained checkpoint with provenance; stage-1 metrics per attribute; the
debiasing transform's structure; before/after evaluation; resumability (a re-run embeds nothing new).
"""

from __future__ import annotations

import json

import pytest
import torch

from rewardsvc.config import BackboneConfig
from rewardsvc.training.data.attributes import ATTRIBUTE_NAMES, VERBOSITY
from rewardsvc.training.data.files import default_data_dir
from rewardsvc.model.scorer import Scorer
from rewardsvc.training.pipeline import TrainConfig, run_training

CAPS = {
    "stage1/just-eval": 150, "stage1/just-eval-safety": 150, "stage1/prometheus-mt-bench": 60,
    "stage1/prometheus-vicuna": 60, "stage1/xstest": 100, "stage1/ultrafeedback": 60,
    "stage2/ultrafeedback": 15, "stage2/hh-harmless": 15, "stage2/pandalm": 8, "stage2/mt-bench-human": 5,
    "stage2/faireval": 5, "stage2/llmeval2": 5, "stage2/xstest": 8,
    "eval/llmbar": 12, "eval/prometheus-hhh": 12, "eval/ultrafeedback": 6, "eval/pandalm": 6,
    "eval/mt-bench-human": 6, "eval/xstest": 6, "eval/hh-harmless": 6,
}  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, tmp_path_factory):
    if not default_data_dir().is_dir():
        pytest.skip(f"shared data not found at {default_data_dir()}")
    root = tmp_path_factory.mktemp("train")
    config = TrainConfig(out_dir=str(root / "heads"), work_dir=str(root / "work"),
                         backbone=BackboneConfig(model=str(tiny_llama_dir)), name="tiny-trained",
                         max_tokens=2048, max_chars=800, caps=CAPS)  # fmt: skip
    return config, run_training(config)


def test_checkpoint_is_trained_and_loadable(trained):
    config, provenance = trained
    scorer = Scorer.load(config.out_dir)
    assert scorer.trained and scorer.model_id == "tiny-trained"
    assert scorer.attributes == ATTRIBUTE_NAMES
    saved = json.loads((__import__("pathlib").Path(config.out_dir) / "rewardsvc.json").read_text())
    assert saved["provenance"]["data"]["stage1_train"] > 0 and saved["label_scales"]
    # The transform is the verbosity debiasing: identity except the verbosity row, whose own entry is 0.
    T = scorer.heads.reward_transform_matrix
    v = ATTRIBUTE_NAMES.index(VERBOSITY)
    off = torch.ones_like(T, dtype=torch.bool)
    off[v] = False
    torch.testing.assert_close(T[off], torch.eye(len(ATTRIBUTE_NAMES))[off])
    assert T[v, v] == 0
    lambdas = provenance["metrics"]["debiasing"]["lambdas"]
    assert [-float(T[v, j]) for j, a in enumerate(ATTRIBUTE_NAMES) if a != VERBOSITY] == pytest.approx(
        [lambdas[a] for a in ATTRIBUTE_NAMES if a != VERBOSITY]
    )


def test_metrics_and_evaluation_are_recorded(trained):
    _, provenance = trained
    metrics = provenance["metrics"]
    assert set(metrics["stage1_validation"]) == set(ATTRIBUTE_NAMES)
    for m in metrics["stage1_validation"].values():
        assert {"pearson", "spearman", "mse", "n_val"} <= set(m)
    for variant in ("before_debiasing", "after_debiasing"):
        result = metrics["eval"][variant]
        assert result["overall"]["n"] > 0 and 0 <= result["overall"]["accuracy"] <= 1
        assert set(result["categories"]) == set(result["length_baseline"]["categories"])
        assert 0 <= metrics["stage2"][variant]["best_val_accuracy"] <= 1


def test_rerun_reuses_the_cached_embeddings(trained, monkeypatch):
    config, _ = trained
    import rewardsvc.training.pipeline as pipeline

    def no_backbone_pass(*args, **kwargs):
        raise AssertionError("a re-run must not embed again")

    monkeypatch.setattr(pipeline, "embed_encoded", no_backbone_pass)
    provenance = run_training(config)
    assert provenance["data"]["stage1_train"] > 0
