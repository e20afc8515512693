"""Early exit on CPU: backbone tokens/s with all blocks vs the same backbone truncated to fewer blocks.

What `HeadsConfig.feature_layer` buys when it is below the backbone's depth (Scorer.load truncates the
backbone, so the later blocks never run). Both modes run the same conversations, one per forward pass (no
padding), interleaved round by round so that load from other jobs hits both alike; the ratio is what
counts. Conversations: the packaged samples (rewardsvc/samples/conversations.jsonl), varied in wording and
length to --n conversations.

    python bench/early_exit.py [--n 40] [--blocks 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from rewardsvc.config import BackboneConfig
from rewardsvc.model.backbone import truncate_backbone
from rewardsvc.model.backbone_loading import load_backbone
from rewardsvc.model.conversation import validate_conversation
from rewardsvc.model.encoding import ChatEncoder

SAMPLES = Path(__file__).resolve().parents[1] / "rewardsvc" / "samples" / "conversations.jsonl"
OPENERS = ["", "Please answer carefully. ", "Quick question. ", "I am new to this. ", "Explain it simply. "]


def sample_conversations() -> list[list[dict]]:
    out = []
    for line in SAMPLES.read_text().splitlines():
        row = json.loads(line)
        if "messages" in row:
            out.append(row["messages"])
        else:
            prompt = row["prompt"]
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            out.append(list(prompt) + [{"role": "assistant", "content": row["response"]}])
    return out


def varied_conversations(n: int) -> list[list[dict]]:
    """n conversations from the samples: a different opener on the last user turn and the response repeated
    1-4 times (lengths from about 30 to 250 tokens)."""
    base = sample_conversations()
    out = []
    for i in range(n):
        messages = [dict(m) for m in base[i % len(base)]]
        last_user = max(j for j, m in enumerate(messages) if m["role"] == "user")
        messages[last_user]["content"] = OPENERS[i % len(OPENERS)] + messages[last_user]["content"]
        messages[-1]["content"] = " ".join([messages[-1]["content"]] * (1 + (i // len(base)) % 4))
        out.append(messages)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--blocks", type=int, default=16, help="blocks kept by the truncated backbone")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    full = load_backbone(BackboneConfig(device="cpu"))
    truncated = load_backbone(BackboneConfig(device="cpu"))
    depth = full.depth
    truncate_backbone(truncated, args.blocks)
    encoder = ChatEncoder(full.tokenizer, 4096, "error")
    encoded = [encoder.encode(validate_conversation(c, f"conversations[{i}]")) for i, c in enumerate(varied_conversations(args.n))]
    rows = [(list(e.input_ids), [[e.prompt_anchor, e.response_anchor]]) for e in encoded]
    tokens = sum(len(r) for r, _ in rows)

    def run(backbone) -> float:
        start = time.perf_counter()
        for row, positions in rows:
            backbone.hidden_at([row], positions)
        return time.perf_counter() - start

    run(full), run(truncated)  # warm-up (allocator, kernels)
    seconds: dict[str, list[float]] = {"full": [], "truncated": []}
    for _ in range(args.rounds):
        seconds["full"].append(run(full))
        seconds["truncated"].append(run(truncated))
    full_s, truncated_s = sum(seconds["full"]), sum(seconds["truncated"])
    print(json.dumps({
        "bench": "early_exit",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "backbone": full.model_id,
        "dtype": str(full.dtype).replace("torch.", ""),
        "conversations": len(rows),
        "tokens": tokens,
        "rounds": args.rounds,
        "full_blocks": depth,
        "truncated_blocks": args.blocks,
        "full_tok_s": round(tokens * args.rounds / full_s, 1),
        "truncated_tok_s": round(tokens * args.rounds / truncated_s, 1),
        "ratio_truncated_over_full": round(full_s / truncated_s, 3),
        "ideal_ratio_blocks_only": round(depth / args.blocks, 3),
        "seconds_per_round": {k: [round(s, 2) for s in v] for k, v in seconds.items()},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
