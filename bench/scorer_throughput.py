"""Scorer throughput on CPU: length-sorted token-budget batches vs one conversation per forward pass.

Both modes score the same conversations in the same run; the ratio is what counts (absolute tokens/s
move with the machine and its load). Conversations: UltraFeedback prompts/responses from ../shared/data
when present, else a deterministic synthetic mix of lengths.

    python bench/scorer_throughput.py [--n 48] [--token-budget 4096] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

import torch

from rewardsvc.config import ScorerConfig
from rewardsvc.model.scorer import Scorer


def synthetic_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    words = "the model scores each response for helpfulness safety and clarity while staying brief".split()
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(8, 120)))
        response = " ".join(rng.choice(words) for _ in range(rng.randint(16, 300)))
        out.append([{"role": "user", "content": f"{i}: {prompt}?"}, {"role": "assistant", "content": response}])
    return out


def real_conversations(n: int) -> list[list[dict]] | None:
    """UltraFeedback prompts with their chosen responses, when ../shared/data is present."""
    from rewardsvc.training.data.files import default_data_dir
    from rewardsvc.training.data.ultrafeedback import load_pairs

    if not default_data_dir().is_dir():
        return None
    pairs = load_pairs(default_data_dir())
    random.Random(0).shuffle(pairs)
    return [list(p.prompt) + [{"role": "assistant", "content": p.chosen}] for p in pairs[:n]] or None


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--token-budget", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--model")
    args = parser.parse_args()
    torch.manual_seed(0)
    scorer = Scorer.load(args.model, config=ScorerConfig(max_tokens=args.max_tokens, truncation="left", token_budget=args.token_budget))
    conversations = real_conversations(args.n)
    source = "ultrafeedback" if conversations else "synthetic"
    conversations = conversations or synthetic_conversations(args.n)
    encoded = [scorer.encode(c) for c in conversations]
    tokens = sum(e.num_tokens for e in encoded)
    scorer.score_encoded(encoded[:2])  # warm-up
    single_s = timed(lambda: [scorer.score_encoded([e]) for e in encoded])
    batched_s = timed(lambda: scorer.score_encoded(encoded))
    print(json.dumps({
        "bench": "scorer_throughput",
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "conversations": len(encoded),
        "source": source,
        "tokens": tokens,
        "token_budget": args.token_budget,
        "one_per_forward_tok_s": round(tokens / single_s, 1),
        "batched_tok_s": round(tokens / batched_s, 1),
        "ratio_batched_over_one_per_forward": round(single_s / batched_s, 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
