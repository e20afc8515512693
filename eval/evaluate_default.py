"""Re-run the model card's held-out figure: the same pairs, the same token limit, the shipped model.

    python eval/evaluate_default.py [--model DIR] [--data-dir DIR] [--report artifacts/eval-report]

What training did (rewardsvc/training/pipeline.py, run_training), and so what this does:
- the pairs: `build_training_sets` with the recipe stored in the model's provenance (`max_chars`, `caps`,
  `seed`): fixed split, evaluation prompt groups never in training;
- the token limit: the recipe's `max_tokens` (1,024 for the packaged default). Training drops a pair when
  one of its two conversations does not fit ("eval pair: a conversation could not be encoded" in the
  provenance, 17 of 1,509 for the default), so this drops the same pairs, by the same rule, and counts them;
- the features: padded batches, the recipe's token budget, float32 on CPU, as the feature store was filled
  (except that a pair's prompt runs once for both responses: equal up to float rounding).

Writes eval/results/heldout-<model name>.records.jsonl (one line per pair: id, category, subset, both scores
and lengths) and appends one summary line (machine, date, commit, accuracy, n, complete) to
eval/results/heldout-<model name>.jsonl, then prints the accuracy beside the model card's. Exit code 1 when
they differ (the pairs or the count of correct pairs). Resumable: scores are kept in artifacts/eval/ chunk by
chunk; `--stop-after-minutes M` writes what is done after M minutes as a partial result (exit code 3).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "eval" / "results"
sys.path.insert(0, str(REPO / "bench"))
from _common import stamp  # noqa: E402  (machine, date, commit: the same stamp as every bench results line)


def recipe_of(provenance: dict[str, Any] | None) -> dict[str, Any]:
    """The training recipe stored with the model (the packaged default has one); defaults otherwise."""
    from rewardsvc.training.pipeline import TrainConfig

    recipe = dict((provenance or {}).get("recipe") or {})
    defaults = TrainConfig.__dataclass_fields__
    out = {}
    for name in ("max_tokens", "token_budget", "max_chars", "caps", "seed"):
        out[name] = recipe.get(name, defaults[name].default)
    return out


def card_figure(scorer) -> dict[str, Any] | None:
    """The held-out figure the model card prints: the chosen candidate after debiasing."""
    after = ((scorer.provenance or {}).get("metrics") or {}).get("eval", {}).get("after_debiasing")
    if not after:
        return None
    return {"accuracy": after["overall"]["accuracy"], "n": after["overall"]["n"]}


def held_out_pairs(data_dir: str | None, recipe: dict[str, Any]):
    from rewardsvc.training.data.build import build_training_sets

    sets = build_training_sets(data_dir, max_tokens_chars=recipe["max_chars"], caps=recipe["caps"], seed=recipe["seed"])
    return sets.eval_pairs


def encode_pairs(scorer, pairs) -> tuple[list, list, dict[str, int]]:
    """(pairs kept, their encoded chosen/rejected interleaved, dropped reasons): a pair is dropped when one
    of its conversations cannot be encoded at the token limit, as training drops it."""
    from rewardsvc.errors import RewardError

    kept, encoded, dropped = [], [], {}
    for pair in pairs:
        try:
            both = [scorer.encoder.encode([*pair.prompt, {"role": "assistant", "content": r}], f"pair {pair.id}")
                    for r in (pair.chosen, pair.rejected)]  # fmt: skip
        except RewardError as exc:
            what = f"eval pair: a conversation could not be encoded ({type(exc).__name__})"
            dropped[what] = dropped.get(what, 0) + 1
            continue
        kept.append(pair)
        encoded += both
    return kept, encoded, dropped


def pair_record(pair, chosen_score: float, rejected_score: float) -> dict[str, Any]:
    return {"id": pair.id, "category": pair.category, "subset": pair.subset, "chosen_score": chosen_score,
            "rejected_score": rejected_score, "chosen_length": len(pair.chosen), "rejected_length": len(pair.rejected)}  # fmt: skip


def score_resumable(scorer, pairs, encoded, partial: Path, recipe: dict[str, Any], chunk_pairs: int = 48,
                    stop_at: float | None = None) -> list[dict]:
    """Records of `pairs` in their order. Scored in chunks of similar length (a chunk is one `score_encoded`
    call: length-sorted padded batches inside it), each chunk appended to `partial` as it finishes, so an
    interrupted run resumes where it stopped (the whole pass is about 625k tokens: an hour or more on an idle
    2-core CPU, many on a loaded one). Past `stop_at` (time.monotonic()) no new chunk starts: the records of
    the pairs done so far come back, shortest pairs first, in their order."""
    key = json.dumps(recipe, sort_keys=True)
    done: dict[str, dict] = {}
    if partial.exists():
        for line in partial.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row.get("recipe") == key:
                done[row["record"]["id"]] = row["record"]
    partial.parent.mkdir(parents=True, exist_ok=True)
    todo = [i for i, p in enumerate(pairs) if p.id not in done]
    todo.sort(key=lambda i: encoded[2 * i].num_tokens + encoded[2 * i + 1].num_tokens)
    total, started = sum(encoded[2 * i].num_tokens + encoded[2 * i + 1].num_tokens for i in todo), time.perf_counter()
    tokens = 0
    with open(partial, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), chunk_pairs):
            if stop_at is not None and time.monotonic() >= stop_at:
                break
            chunk = todo[start : start + chunk_pairs]
            results = scorer.score_encoded([e for i in chunk for e in (encoded[2 * i], encoded[2 * i + 1])])
            for k, i in enumerate(chunk):
                record = pair_record(pairs[i], results[2 * k].score, results[2 * k + 1].score)
                done[record["id"]] = record
                f.write(json.dumps({"recipe": key, "record": record}) + "\n")
            f.flush()
            tokens += sum(encoded[2 * i].num_tokens + encoded[2 * i + 1].num_tokens for i in chunk)
            rate = tokens / max(time.perf_counter() - started, 1e-9)
            print(f"  {len(done)}/{len(pairs)} pairs, {tokens}/{total} tokens, {rate:.0f} tok/s, "
                  f"about {(total - tokens) / max(rate, 1e-9) / 60:.0f} min left", file=sys.stderr, flush=True)  # fmt: skip
    return [done[p.id] for p in pairs if p.id in done]


def load_recipe_scorer(model: str | None, recipe_overrides: dict[str, Any] | None = None):
    """The model with the scorer settings of its training run's feature pass, and that recipe."""
    from rewardsvc.config import BackboneConfig, ScorerConfig
    from rewardsvc.model.checkpoint import load_heads
    from rewardsvc.model.hub import resolve_model_path
    from rewardsvc.model.scorer import DEFAULT_MODEL_DIR, Scorer, shipped_backbone_config

    directory = resolve_model_path(model, "--model") if model else DEFAULT_MODEL_DIR
    recipe = {**recipe_of(load_heads(directory).provenance), **(recipe_overrides or {})}
    # Chosen and rejected share their prompt: it runs once and both continue from its key/value cache (equal to
    # the whole-conversation pass of the feature store up to float rounding, about 1e-6 in a score; a quarter
    # less backbone work on this mix).
    config = ScorerConfig(max_tokens=recipe["max_tokens"], token_budget=recipe["token_budget"], batch_plan="padded",
                          share_prompts=True)  # fmt: skip
    # float32 explicitly: `auto` on a CPU may measure bf16 / mixed faster (model/plan_measurement.py), and the
    # card's figure was computed in float32.
    backbone = BackboneConfig(**{**shipped_backbone_config(directory), "dtype": "float32"})
    return Scorer.load(directory, config=config, backbone=backbone), recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="heads checkpoint (default: the packaged default)")
    parser.add_argument("--data-dir", help="data directory (default: ../shared/data)")
    parser.add_argument("--report", help="also write the PNG plots of `rewardsvc eval` here")
    parser.add_argument("--max-tokens", type=int, help="override the recipe's token limit (the figure then differs)")
    parser.add_argument("--results", default=str(RESULTS), help="directory of the results files")
    parser.add_argument("--stop-after-minutes", type=float,
                        help="start no new chunk after this long; write what is done as a PARTIAL result (exit code 3); "
                             "a later run resumes from artifacts/eval/")  # fmt: skip
    args = parser.parse_args(argv)

    import torch

    from rewardsvc.evaluation.report import evaluate_pairs, write_report

    started = time.perf_counter()
    scorer, recipe = load_recipe_scorer(args.model, {"max_tokens": args.max_tokens} if args.max_tokens else None)
    pairs = held_out_pairs(args.data_dir, recipe)
    kept, encoded, dropped = encode_pairs(scorer, pairs)
    print(f"{len(pairs)} held-out pairs, {len(kept)} fit {recipe['max_tokens']} tokens; scoring "
          f"{len(encoded)} conversations ...", file=sys.stderr, flush=True)  # fmt: skip
    stop_at = time.monotonic() + 60 * args.stop_after_minutes if args.stop_after_minutes is not None else None
    records = score_resumable(scorer, kept, encoded, REPO / "artifacts" / "eval" / f"partial-{scorer.model_id}.jsonl", recipe,
                              stop_at=stop_at)  # fmt: skip
    complete = len(records) == len(kept)
    summary = evaluate_pairs(records)
    correct = sum(1.0 if r["chosen_score"] > r["rejected_score"] else 0.5 if r["chosen_score"] == r["rejected_score"] else 0.0
                  for r in records)  # fmt: skip

    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / f"heldout-{scorer.model_id}.records.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in records)
    records_path.write_text(text, encoding="utf-8")
    card = card_figure(scorer)
    line = {
        "script": "eval/evaluate_default.py", **stamp(), "threads": torch.get_num_threads(),
        "complete": complete, "pairs_to_score": len(kept), "model": scorer.model_id, "recipe": recipe, "pairs_built": len(pairs), "dropped": dropped,
        "n": summary["overall"]["n"], "correct": correct, "accuracy": summary["overall"]["accuracy"],
        "categories": summary["categories"], "length_baseline": summary["length_baseline"]["overall"],
        "verbosity_spearman": summary["verbosity_spearman"],
        "verbosity_spearman_by_category": summary["verbosity_spearman_by_category"],
        "records": records_path.relative_to(REPO).as_posix() if records_path.is_relative_to(REPO) else str(records_path),
        "records_sha256": hashlib.sha256(text.encode()).hexdigest(), "card": card,
        "wall_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    with open(out / f"heldout-{scorer.model_id}.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
    if args.report:
        write_report(summary, records, args.report, None)

    accuracy, n = summary["overall"]["accuracy"], summary["overall"]["n"]
    if not complete:
        print(f"PARTIAL: {n} of {len(kept)} pairs scored (the shortest first, so not a sample of the mix); accuracy on "
              f"them {100 * accuracy:.1f} %. Not comparable with the model card: run again to resume.")  # fmt: skip
        return 3
    print(f"held-out accuracy: {100 * accuracy:.1f} % ({correct:g} of {n} pairs, max_tokens={recipe['max_tokens']})")
    if card is None:
        print("model card: no held-out figure in the model's provenance")
        return 0
    print(f"model card:        {100 * card['accuracy']:.1f} % ({card['accuracy'] * card['n']:g} of {card['n']} pairs)")
    same = n == card["n"] and round(correct) == round(card["accuracy"] * card["n"])
    print("matches the model card" if same else "DIFFERS from the model card")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
