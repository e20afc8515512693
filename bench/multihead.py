"""The cost of a second head set on the same backbone (`serve --model a=... --model b=...`): the same
conversations scored by one head set, then by two head sets sharing one backbone forward (what the batcher
hands serving.models.ModelSet.score_jobs when requests for both arrive together: every rollout scored by the
default and by an A/B candidate), and, for scale, by two head sets each running its own forward (what two
separate servers would compute). Modes are interleaved round by round in one process so that load from other
jobs hits them alike; the ratios are from this run. Head set b is head set a with its weights perturbed (a
different model with the same cost). Prints JSON lines (machine, date, commit).

    python bench/multihead.py [--conversations 32] [--rounds 3] [--tiny] [--out bench/results/multihead.jsonl]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, emit, machine, stamp, timed  # noqa: E402

TOPICS = ["watering a garden", "sorting a list in Python", "the capital of France", "a haiku about the sea",
          "saving for a house", "learning to swim", "fixing a flat tyre", "writing a cover letter"]  # fmt: skip


def conversations(n: int) -> list:
    """n single-turn conversations of varied length (about 40 to 200 tokens)."""
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        answer = " ".join(f"Here is one point about {topic}, number {j}." for j in range(1 + i % 8))
        out.append([{"role": "user", "content": f"Tell me about {topic} ({i})."}, {"role": "assistant", "content": answer}])
    return out


def head_sets(tiny: bool):
    """(a, b): the packaged default and a perturbed copy on one loaded backbone (or a tiny random model)."""
    import torch

    from rewardsvc.model.checkpoint import load_heads, save_heads
    from rewardsvc.model.scorer import DEFAULT_MODEL_DIR, Scorer

    root = Path(tempfile.mkdtemp(prefix="rewardsvc-multihead-"))
    source = DEFAULT_MODEL_DIR
    if tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import save_tiny_heads, save_tiny_llama

        source = save_tiny_heads(root / "a", save_tiny_llama(root / "llama", "chatml"))
    candidate = load_heads(source)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in candidate.heads.parameters():
            p.add_(0.01 * torch.randn_like(p))
    candidate.name += "-candidate"
    save_heads(root / "b", candidate)
    shared: dict = {}
    return Scorer.load(source, shared_backbones=shared), Scorer.load(root / "b", shared_backbones=shared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (seconds; checks the code runs)")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args = parser.parse_args()

    from rewardsvc.serving.models import Job, ModelSet

    a, b = head_sets(args.tiny)
    assert a.backbone is b.backbone
    models = ModelSet([("a", a), ("b", b)])
    encoded = tuple(a.encode(c) for c in conversations(args.conversations))
    tokens = sum(e.num_tokens for e in encoded)
    modes = {
        "one_head_set": lambda: models.score_jobs([Job("a", encoded, None)]),
        "two_head_sets_shared_forward": lambda: models.score_jobs([Job("a", encoded, None), Job("b", encoded, None)]),
        "two_head_sets_separate_forwards": lambda: [a.score_encoded(list(encoded)), b.score_encoded(list(encoded))],
    }
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    first: dict[str, list] = {}
    modes["one_head_set"]()  # warm-up (allocations, kernels)
    for _ in range(args.rounds):
        for name, run in modes.items():
            out, dt = timed(run)
            seconds[name].append(dt)
            first.setdefault(name, out)
    # The shared forward must not change a's scores (same rows, same heads).
    deviation = max(abs(x.score - y.score) for x, y in zip(first["one_head_set"][0], first["two_head_sets_shared_forward"][0]))
    base = statistics.median(seconds["one_head_set"])
    info = {**machine(), **stamp(), "model": a.model_id, "backbone": a.backbone_description(), "tiny": args.tiny}
    for name in modes:
        median = statistics.median(seconds[name])
        emit({"bench": "multihead", "mode": name, "conversations": len(encoded), "tokens": tokens,
              "rounds": args.rounds, "median_s": round(median, 3), "ratio_vs_one_head_set": round(median / base, 3),
              **info}, args.out)  # fmt: skip
    emit({"bench": "multihead", "second_head_set_cost": round(statistics.median(seconds["two_head_sets_shared_forward"]) / base, 3),
          "separate_forwards_cost": round(statistics.median(seconds["two_head_sets_separate_forwards"]) / base, 3),
          "max_score_deviation_a": deviation, "target": 1.05, **info}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
