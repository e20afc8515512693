"""One stage-1 attribute's validation quality from a feature store as it is (no backbone pass, seconds).

    python eval/stored_attribute_fit.py --attribute correctness --store /work/artifacts/train/features \
        [--out eval/results/stored-attribute-fit.jsonl]

The training run fits one ridge head per attribute on the rows that rate it (stage1.fit_stage1: rows grouped by
label mask, alpha chosen on validation MSE), so fitting the attribute alone on the same stored rows gives the same
head and the same validation Pearson/Spearman as `rewardsvc train --embed stored` reports for it, without fitting
every other head and candidate. The store is only read (never written): rows whose conversation is not stored yet
are counted and left out, so on a store that an embedding pass is still filling the figures are partial and say so.

Also measured, for the training source's own validation pairs (stage 2, both conversations stored): how often the
attribute's head scores the chosen response higher, beside the longer-response-wins baseline on the same pairs.

Prints one JSON line per stored layer and, with --out, appends them with machine, date and commit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from _common import emit  # noqa: E402  (machine, date, commit: the same stamp as every results line)


def main(argv=None) -> int:
    from rewardsvc.config import BackboneConfig
    from rewardsvc.evaluation.report import pair_outcomes
    from rewardsvc.model.backbone_loading import backbone_source, load_tokenizer
    from rewardsvc.model.encoding import ChatEncoder
    from rewardsvc.training.data.attributes import attribute_spec
    from rewardsvc.training.data.build import build_training_sets
    from rewardsvc.training.feature_store import FeatureStore, stored_key, stored_layers
    from rewardsvc.training.stage1 import fit_stage1
    from rewardsvc.training.train_config import TrainConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attribute", required=True)
    parser.add_argument("--store", required=True, help="a feature store directory (read only)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=None, help="append the JSON lines here (with machine, date, commit)")
    args = parser.parse_args(argv)
    spec = attribute_spec(args.attribute)
    layers = stored_layers(args.store)
    if layers is None:
        parser.error(f"--store {args.store}: no store.json there")

    defaults = TrainConfig.__dataclass_fields__
    max_tokens = defaults["max_tokens"].default
    source, backbone_id = backbone_source(BackboneConfig())
    encoder = ChatEncoder(load_tokenizer(source), max_tokens, "error")
    manifest = json.loads((Path(args.store) / "store.json").read_text())
    store = FeatureStore(args.store, backbone_id, layers, manifest["hidden_size"])  # read only: store.json exists

    def key(prompt, response) -> str | None:
        return stored_key(store, encoder, backbone_id, prompt, response)

    sets = build_training_sets(args.data_dir, max_tokens_chars=defaults["max_chars"].default, seed=defaults["seed"].default)
    rows = {split: [r for r in items if r.labels.get(args.attribute) is not None]
            for split, items in (("train", sets.stage1_train), ("val", sets.stage1_val))}
    keyed = {split: [(r, key(r.prompt, r.response)) for r in items] for split, items in rows.items()}
    stored = {split: [(r, k) for r, k in items if k] for split, items in keyed.items()}
    sources = sorted({r.source for r in rows["train"]})
    pairs = []
    for p in sets.stage2_val:
        if p.source in sources:
            kc, kr = key(p.prompt, p.chosen), key(p.prompt, p.rejected)
            if kc and kr:
                pairs.append((p, kc, kr))

    x = {split: store.get([k for _, k in items]).response for split, items in stored.items()}  # (N, L, H)
    y = {split: torch.tensor([[r.labels[args.attribute]] for r, _ in items], dtype=torch.float64)
         for split, items in stored.items()}
    chosen = store.get([kc for _, kc, _ in pairs]).response if pairs else None
    rejected = store.get([kr for _, _, kr in pairs]).response if pairs else None
    longer = float(pair_outcomes([len(p.chosen) - len(p.rejected) for p, _, _ in pairs]).mean()) if pairs else None
    for i, layer in enumerate(layers):
        fit = fit_stage1(x["train"][:, i], y["train"], x["val"][:, i], y["val"], (args.attribute,), fit_intercept=True)
        m = fit.metrics[args.attribute]
        row = {"script": "eval/stored_attribute_fit.py", "attribute": args.attribute, "scale": [spec.low, spec.high],
               "sources": sources, "layer": layer, "store": str(args.store),
               "rows_wanted": {s: len(v) for s, v in rows.items()}, "rows_stored": {s: len(v) for s, v in stored.items()},
               "partial": any(len(stored[s]) < len(rows[s]) for s in rows),
               "val_pearson": m["pearson"], "val_spearman": m["spearman"], "val_mse_standardized": m["mse"],
               "alpha": fit.alphas[args.attribute]}  # fmt: skip
        if pairs:
            w, b = fit.weight[0].double(), float(fit.bias[0])
            margin = (chosen[:, i].double() @ w + b) - (rejected[:, i].double() @ w + b)
            row["val_pairs_stored"] = len(pairs)
            row["val_pair_accuracy"] = float(pair_outcomes(margin.numpy()).mean())
            row["val_pair_longer_wins"] = longer
        emit(row, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
