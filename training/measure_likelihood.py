"""Measure one candidate lever of issue 9: the backbone's own likelihood of the response as a reward signal.

ArmoRM's attributes are linear heads on one hidden state. A 135M backbone's hidden state barely separates
"The capital of France is Paris." from "... Berlin." (every shipped head prefers Berlin), yet the same backbone's
language-model head gives the correct answer a far higher probability. This script measures, on a seeded
sample of stage-2 validation pairs and held-out pairs, how often the response with the higher mean token
log-probability (given the prompt, under the full backbone with its tied LM head) is the chosen one, per
category, beside the length baseline on the same pairs. It fits nothing and ships nothing.

    python training/measure_likelihood.py --work-dir artifacts/train --per-source 50 --out likelihood.json

The data sets are the ones `rewardsvc train` wrote to WORK/data (same split).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import torch

from rewardsvc.config import BackboneConfig
from rewardsvc.evaluation.report import evaluate_pairs
from rewardsvc.model.backbone_loading import load_backbone


def response_log_probs(backbone, prompt: list[dict], response: str, max_tokens: int) -> list[float] | None:
    """Log-probability of each response token (the end-of-turn token included) given everything before it.
    None when the conversation is over max_tokens or its template does not extend the prompt's."""
    if not getattr(backbone.model.config, "tie_word_embeddings", False):
        raise ValueError("needs a backbone whose LM head is its input embedding (tie_word_embeddings), as SmolLM2's")
    tok = backbone.tokenizer
    head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([*prompt, {"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(head):
        return None
    head_ids = tok(head, add_special_tokens=False)["input_ids"]
    ids = tok(full, add_special_tokens=False)["input_ids"]
    if ids[: len(head_ids)] != head_ids or len(ids) > max_tokens:
        return None
    end = len(ids)
    while end > len(head_ids) and tok.decode(ids[end - 1 : end]).strip() == "":
        end -= 1  # the template's trailing newline after the end-of-turn token is not the response's
    x = torch.tensor([ids[:end]])
    with torch.inference_mode():
        hidden = backbone.model(input_ids=x).last_hidden_state[0]
        logits = hidden[len(head_ids) - 1 : end - 1] @ backbone.model.get_input_embeddings().weight.T
        lp = torch.log_softmax(logits.float(), -1).gather(1, x[0, len(head_ids) : end, None])[:, 0]
    return lp.tolist()


def sample(path: Path, split: str | None, per_source: int, seed: int) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if split is None or row.get("split") == split:
            groups[(row["category"], row["source"])].append(row)
    rng = random.Random(seed)
    out = []
    for key in sorted(groups):
        rows = groups[key]
        rng.shuffle(rows)
        out += rows[:per_source]
    return out


def by_category(rows: list[dict], signal: str) -> dict:
    """Per-category pair accuracy (percent, ties 0.5) of "higher `signal` wins", and of "longer wins" on the same
    pairs, through the evaluation's own evaluate_pairs."""
    result = evaluate_pairs({"category": r["category"], "subset": r["source"], "chosen_score": r[f"{signal}_c"],
                             "rejected_score": r[f"{signal}_r"], "chosen_length": r["len_c"],
                             "rejected_length": r["len_r"]} for r in rows)  # fmt: skip

    def percent(block: dict) -> dict:
        out = {c: round(100 * v["accuracy"], 1) for c, v in block.items()}
        out["n"] = {c: v["n"] for c, v in block.items()}
        return out

    return {"model": percent(result["categories"]), "longer_wins": percent(result["length_baseline"]["categories"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="artifacts/train")
    ap.add_argument("--per-source", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="likelihood.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone = load_backbone(BackboneConfig())
    data = Path(args.work_dir) / "data"
    sets = {"stage2_val": sample(data / "stage2.jsonl", "val", args.per_source, args.seed),
            "held_out": sample(data / "eval.jsonl", None, args.per_source, args.seed)}  # fmt: skip
    t, tokens, result = time.perf_counter(), 0, {}
    for name, pairs in sets.items():
        rows = []
        for p in pairs:
            c = response_log_probs(backbone, p["prompt"], p["chosen"], args.max_tokens)
            r = response_log_probs(backbone, p["prompt"], p["rejected"], args.max_tokens)
            if not c or not r:
                continue
            tokens += len(c) + len(r)
            rows.append({"id": p["id"], "category": p["category"], "source": p["source"],
                         "mean_c": sum(c) / len(c), "mean_r": sum(r) / len(r), "sum_c": sum(c), "sum_r": sum(r),
                         "len_c": len(p["chosen"]), "len_r": len(p["rejected"])})  # fmt: skip
        mean, total = by_category(rows, "mean"), by_category(rows, "sum")
        result[name] = {"pairs": len(rows), "mean_log_prob": mean["model"], "sum_log_prob": total["model"],
                        "longer_wins": mean["longer_wins"], "rows": rows}  # fmt: skip
        print(name, json.dumps({k: v for k, v in result[name].items() if k != "rows"}), flush=True)
    result["seconds"] = round(time.perf_counter() - t, 1)
    result["response_tokens"] = tokens
    Path(args.out).write_text(json.dumps(result))
    print("seconds", result["seconds"])


if __name__ == "__main__":
    main()
