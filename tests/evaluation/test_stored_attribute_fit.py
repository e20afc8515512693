"""eval/stored_attribute_fit.py on a feature store it can only partly use: counts what is stored, fits the one
head, never writes to the store.

The store is built here with the real keys (the embedded backbone's tokenizer, no model pass) for half of the
arena-bench correctness rows and pairs, and features that carry the label along one direction plus noise, so the
fitted head must find it: validation Pearson well above 0.5, and the chosen (higher-graded) answer scored higher
in nearly every stored validation pair.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from rewardsvc.config import BackboneConfig
from rewardsvc.model.backbone_loading import backbone_source, load_tokenizer
from rewardsvc.model.encoding import ChatEncoder
from rewardsvc.training.data import build_training_sets
from rewardsvc.training.feature_store import FeatureStore, feature_key

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.needs_data]  # the embedded backbone's tokenizer; the staged data


def load_script():
    spec = importlib.util.spec_from_file_location("stored_attribute_fit", ROOT / "eval" / "stored_attribute_fit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fits_the_stored_rows_and_counts_the_rest(tmp_path, capsys):
    source, backbone_id = backbone_source(BackboneConfig())
    encoder = ChatEncoder(load_tokenizer(source), 1024, "error")
    sets = build_training_sets()
    grade = {}
    for row in sets.stage1_train + sets.stage1_val:
        if row.source == "arena-bench" and hashlib.sha1(row.id.encode()).digest()[0] % 2 == 0:
            grade[(row.prompt[0]["content"], row.response)] = row.labels["correctness"]
    keys, labels = [], []
    for (question, answer), g in grade.items():
        try:
            e = encoder.encode([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
        except Exception:  # over 1,024 tokens: training drops it too
            continue
        keys.append(feature_key(backbone_id, e.input_ids, e.prompt_anchor))
        labels.append(g)
    torch.manual_seed(0)
    y = torch.tensor(labels)
    features = torch.randn(len(keys), 2, 8)
    features[:, :, 0] = y[:, None] + 0.5 * torch.randn(len(keys), 2)  # the label along one direction, with noise
    store_dir = tmp_path / "features"
    FeatureStore(store_dir, backbone_id, (8, 16), 8).add(keys, features, features.clone(), torch.full((len(keys),), 10))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in store_dir.iterdir())

    out = tmp_path / "results.jsonl"
    assert load_script().main(["--attribute", "correctness", "--store", str(store_dir), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["layer"] for r in lines] == [8, 16]
    for r in lines:
        assert r["partial"] and r["sources"] == ["arena-bench"]
        assert r["rows_wanted"] == {"train": 1976, "val": 424}
        assert sum(r["rows_stored"].values()) == len(keys)
        assert r["val_pearson"] > 0.8
        assert r["val_pairs_stored"] > 10 and r["val_pair_accuracy"] > 0.9
        assert {"machine", "date", "commit"} <= set(r)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in store_dir.iterdir()) == before  # read only
    assert capsys.readouterr().out.count('"script": "eval/stored_attribute_fit.py"') == 2
