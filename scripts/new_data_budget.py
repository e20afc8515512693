"""What one training source adds to the embedding pass: its new conversations and their tokens.

    python scripts/new_data_budget.py --source arena-bench [--out eval/results/data-budget.jsonl]

The feature store embeds each distinct conversation once (content-addressed), so a source costs only the
conversations that the default build did not already have. This builds the default training sets twice, with
the source and with its caps at 0 (`build_training_sets`, default recipe: 2,000 characters, seed 0), and
tokenizes every training conversation that only the first has (once with the default caps, once with the
source's own caps lifted) with the embedded default backbone's chat
template (the token count the feature store's pass sees). Conversations over the recipe's `max_tokens` (1,024)
are counted apart: training drops them ("a conversation could not be encoded"), so they cost nothing.

Prints one JSON line and, with --out, appends it with machine, date and commit.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from _common import emit  # noqa: E402  (machine, date, commit: the same stamp as every results line)


def conversations(sets, source: str | None = None) -> dict[str, tuple[str, list[dict], str]]:
    """conversation_key -> (stage, prompt, response) of the training sets (stage 2 first, as build.py caps)."""
    from rewardsvc.training.data.build import conversation_key

    out: dict[str, tuple[str, list[dict], str]] = {}
    for stage, items in (("stage2", sets.stage2_train + sets.stage2_val), ("stage1", sets.stage1_train + sets.stage1_val)):
        for item in items:
            if source is not None and item.source != source:
                continue
            responses = [item.response] if stage == "stage1" else [item.chosen, item.rejected]
            for response in responses:
                out.setdefault(conversation_key(item.prompt, response), (stage, item.prompt, response))
    return out


def main(argv=None) -> int:
    from rewardsvc.config import BackboneConfig
    from rewardsvc.errors import RewardError
    from rewardsvc.model.backbone_loading import backbone_source, load_tokenizer
    from rewardsvc.model.encoding import ChatEncoder
    from rewardsvc.training.data.build import build_training_sets
    from rewardsvc.training.data.sources import PAIR_SOURCES, RATED_SOURCES
    from rewardsvc.training.train_config import TrainConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="a training source, e.g. arena-bench")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=None, help="append the JSON line here (with machine, date, commit)")
    args = parser.parse_args(argv)
    if args.source not in RATED_SOURCES and args.source not in PAIR_SOURCES:
        parser.error(f"--source {args.source!r} is not one of {sorted(set(RATED_SOURCES) | set(PAIR_SOURCES))}")

    max_tokens = TrainConfig.__dataclass_fields__["max_tokens"].default
    source, model_id = backbone_source(BackboneConfig())
    encoder = ChatEncoder(load_tokenizer(source), max_tokens, "error")
    keys = [f"stage1/{args.source}"] * (args.source in RATED_SOURCES) + [f"stage2/{args.source}"] * (args.source in PAIR_SOURCES)
    before = conversations(build_training_sets(args.data_dir, caps={k: 0 for k in keys}))

    def measure(caps) -> dict:
        sets = build_training_sets(args.data_dir, caps=caps)
        new = {k: v for k, v in conversations(sets).items() if k not in before}
        tokens, over, chars, count = Counter(), Counter(), Counter(), Counter()
        for stage, prompt, response in new.values():
            try:
                n = encoder.encode([*prompt, {"role": "assistant", "content": response}]).num_tokens
            except RewardError:
                over[stage] += 1
                continue
            count[stage] += 1
            tokens[stage] += n
            chars[stage] += sum(len(m["content"]) for m in prompt) + len(response)
        return {
            "stage1_rows": sum(r.source == args.source for r in sets.stage1_train + sets.stage1_val),
            "stage2_pairs": sum(p.source == args.source for p in sets.stage2_train + sets.stage2_val),
            "source_conversations": len(conversations(sets, args.source)),
            "new_conversations": sum(count.values()), "new_tokens": sum(tokens.values()), "new_chars": sum(chars.values()),
            "new_conversations_by_first_use": dict(count), "new_tokens_by_first_use": dict(tokens),
            "over_max_tokens_dropped_by_training": dict(over),
            "chars_per_token": round(sum(chars.values()) / max(1, sum(tokens.values())), 3),
            "training_conversations_before": len(before), "training_conversations_after": len(before) + len(new),
        }

    emit({
        "script": "scripts/new_data_budget.py", "source": args.source, "backbone": model_id, "max_tokens": max_tokens,
        "default_caps": measure(None),
        # the source's own caps lifted (a per-group cap in build.DEFAULT_GROUP_CAPS still applies)
        "source_uncapped": measure({k: None for k in keys}),
    }, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
