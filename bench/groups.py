"""Shared-prompt groups vs flat on one device: GRPO-like groups (one long prompt, N responses) scored with the
prompt run once and its key/value cache reused, against every conversation run whole (padded batches).
Both modes score the same groups, interleaved round by round so that load from other jobs hits both alike;
the ratio printed is from this run. Prints JSON lines.

    python bench/groups.py [--groups 3] [--n 8] [--prompt-tokens 512] [--rounds 2] [--tiny]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, load_scorer, machine, timed, variant  # noqa: E402

FILLER = (
    "Here is some background about my project. I keep a small garden with tomatoes, beans and herbs, "
    "and I track watering, sunlight and harvest dates in a spreadsheet. "
)
ANSWERS = [
    "Water deeply twice a week rather than a little every day.",
    "Tomatoes need at least six hours of sun; move the beans to the shadier bed.",
    "I would add a column for soil moisture and plot it against the harvest weight.",
    "Mulch keeps the soil moist and the roots cool in summer.",
    "Use a pivot table to total the harvest per plant and per week.",
    "Herbs like basil prefer warm soil; plant them after the last frost.",
    "Check the leaves for yellowing: it often means too much water.",
    "Rotate the beds every year so that diseases do not build up.",
]


def build_groups(scorer, groups: int, n: int, prompt_tokens: int):
    """`groups` prompts of about `prompt_tokens` tokens, each with `n` responses of varied length."""
    out = []
    for g in range(groups):
        text = f"Group {g}. "
        while len(scorer.backbone.tokenizer(text)["input_ids"]) < prompt_tokens:
            text += FILLER
        prompt = [{"role": "user", "content": text + "What should I change?"}]
        responses = [" ".join([ANSWERS[(g + i) % len(ANSWERS)]] * (1 + i % 3)) for i in range(n)]
        out.append((prompt, responses))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=3)
    parser.add_argument("--n", type=int, default=8, help="responses per group")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (seconds; checks the code runs)")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args = parser.parse_args()

    scorer = load_scorer(args.tiny)
    modes = {"flat": variant(scorer, share_prompts=False), "shared": variant(scorer, share_prompts=True)}
    work = build_groups(scorer, args.groups, args.n, min(args.prompt_tokens, 64) if args.tiny else args.prompt_tokens)
    tokens = sum(
        modes["flat"].encode(prompt + [{"role": "assistant", "content": x}]).num_tokens for prompt, responses in work for x in responses
    )  # conversation tokens per round (the same work for both modes)
    seconds = {m: 0.0 for m in modes}
    scores = {m: [] for m in modes}
    for round_ in range(args.rounds):
        for name, mode in modes.items():
            for prompt, responses in work:
                results, dt = timed(mode.score_group, prompt, responses)
                seconds[name] += dt
                if round_ == 0:
                    scores[name] += [r.score for r in results]
    deviation = max(abs(a - b) for a, b in zip(scores["flat"], scores["shared"]))
    info = machine()
    for name in modes:
        emit({"bench": "groups", "mode": name, "model": scorer.model_id, "groups": args.groups, "n": args.n,
              "prompt_tokens": args.prompt_tokens if not args.tiny else min(args.prompt_tokens, 64),
              "tokens": tokens * args.rounds, "seconds": round(seconds[name], 3),
              "tokens_per_s": round(tokens * args.rounds / seconds[name], 1), **info}, args.out)  # fmt: skip
    emit({"bench": "groups", "speedup_shared_vs_flat": round(seconds["flat"] / seconds["shared"], 3),
          "max_score_deviation": deviation, "tiny": args.tiny}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
