"""Which attribute carries the preference in each category: every head of a trained checkpoint scored alone
(its debiased reward, the column of r @ T the gating weighs), beside the served score and the longer-wins
baseline, on the stage-2 validation pairs and on the held-out mix. No backbone pass: features come from the store.

    python eval/head_accuracy.py --model DIR --store WORK/features [--data-dir D] [--out eval/results/head-accuracy.jsonl]

The pairs are rebuilt with the checkpoint's own recipe (its caps, character limit and seed, from rewardsvc.json),
so they are the pairs its training run validated and evaluated on; pairs with a conversation the store lacks are
counted and left out. A diagnostic: held-out figures are for reading, never for choosing (the training run chooses
on validation only).

Prints one JSON line per split ({"split", "pairs", "categories": {category: {"n", "score", "longer_wins",
"heads": {attribute: accuracy}}}}) and, with --out, appends them with machine, date and commit.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from _common import emit  # noqa: E402  (machine, date, commit: the same stamp as every results line)

from rewardsvc.evaluation.report import pair_outcomes  # noqa: E402


def head_accuracy(heads, pairs, chosen, rejected, prompt) -> dict:
    """Per category: n, the served score's accuracy, longer-wins, and each attribute's debiased reward alone."""
    with torch.inference_mode():
        gating = heads.gate(prompt)  # both responses answer the same prompt
        out_c, out_r = heads.combine(heads.rewards(chosen), gating), heads.combine(heads.rewards(rejected), gating)
    score = pair_outcomes((out_c.score - out_r.score).numpy())
    per_head = pair_outcomes((out_c.debiased - out_r.debiased).numpy())  # (N, K)
    longer = pair_outcomes([len(p.chosen) - len(p.rejected) for p in pairs])
    by_category: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        by_category[p.category].append(i)
    by_category["all"] = list(range(len(pairs)))
    return {
        category: {"n": len(idx), "score": float(score[idx].mean()), "longer_wins": float(longer[idx].mean()),
                   "heads": {a: float(per_head[idx, k].mean()) for k, a in enumerate(heads.attributes)}}  # fmt: skip
        for category, idx in sorted(by_category.items())
    }


def main(argv=None) -> int:
    from rewardsvc.config import BackboneConfig
    from rewardsvc.model.backbone_loading import backbone_source, load_tokenizer
    from rewardsvc.model.checkpoint import load_heads
    from rewardsvc.model.encoding import ChatEncoder
    from rewardsvc.training.data.build import build_training_sets
    from rewardsvc.training.feature_store import FeatureStore, stored_key, stored_layers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained heads checkpoint directory (rewardsvc train --out)")
    parser.add_argument("--store", required=True, help="the feature store it was trained from (read only)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=None, help="append the JSON lines here (with machine, date, commit)")
    args = parser.parse_args(argv)

    checkpoint = load_heads(args.model)
    heads, recipe = checkpoint.heads.eval(), checkpoint.provenance.get("recipe", {})
    layers = stored_layers(args.store)
    if layers is None:
        parser.error(f"--store {args.store}: no store.json there")
    # The store's keys: the training run's backbone id (an adapter is part of it) and its backbone's tokenizer.
    source, _ = backbone_source(BackboneConfig(**checkpoint.backbone))
    backbone_id = checkpoint.provenance["backbone"]
    layer = heads.feature_layer or checkpoint.provenance["metrics"]["chosen"]["layer"]
    if layer not in layers:
        parser.error(f"--store {args.store} holds layers {layers}, not the checkpoint's {layer}")
    store = FeatureStore(args.store, backbone_id, layers, heads.hidden_size)  # read only: store.json exists
    encoder = ChatEncoder(load_tokenizer(source), recipe.get("max_tokens", 1024), "error")

    def key(prompt, response) -> str | None:
        return stored_key(store, encoder, backbone_id, prompt, response)

    sets = build_training_sets(args.data_dir, max_tokens_chars=recipe.get("max_chars", 2000), caps=recipe.get("caps"),
                               seed=recipe.get("seed", 0))  # fmt: skip
    i = layers.index(layer)
    for split, wanted in (("stage2_val", sets.stage2_val), ("heldout", sets.eval_pairs)):
        keyed = [(p, key(p.prompt, p.chosen), key(p.prompt, p.rejected)) for p in wanted]
        kept = [(p, kc, kr) for p, kc, kr in keyed if kc and kr]
        pairs = [p for p, _, _ in kept]
        chosen = store.get([kc for _, kc, _ in kept])
        rejected = store.get([kr for _, _, kr in kept])
        result = head_accuracy(heads, pairs, chosen.response[:, i], rejected.response[:, i], chosen.prompt[:, i])
        emit({"script": "eval/head_accuracy.py", "model": checkpoint.name, "model_dir": str(args.model),
              "trained": checkpoint.provenance.get("created"), "layer": layer, "split": split,
              "pairs": len(pairs), "pairs_not_stored": len(wanted) - len(pairs), "categories": result}, args.out)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
