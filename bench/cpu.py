"""CPU scoring speed (issue 11, item 5): candidates side by side in one run against fp32 one-per-forward.

Every candidate scores the same conversations: both sides of a fixed subset of the held-out preference pairs
(rewardsvc.training.data: never a public reward-model benchmark's test set). The conversations run in chunks,
each chunk through every candidate in turn, so that load from other jobs on this shared machine hits all of
them alike; the ratios printed are from this run.

Per candidate: tokens/s, the ratio to fp32 one-per-forward, the max score deviation and its ratio to the
fp32 score std, the correlation, and the share of pairs whose preference (sign of chosen - rejected) is
unchanged. Candidates (those that do not apply here are reported as skipped, with why):
- fp32 one-per-forward (the baseline; also what --batch-invariant runs), padded batches, packed batches,
  pairs with a shared prompt (the two sides run their prompt once);
- torch.ao dynamic int8: per-tensor on every Linear (the issue's naive candidate), per-channel on every
  Linear, per-channel keeping the first and last blocks fp32, per-channel on the MLP only;
- torchao (if installed; pip install torchao): int8 dynamic activations + int8 per-channel weights, and
  int8 weight-only, on the decoder blocks' Linears;
- bf16 one-per-forward (`bf16`) and padded (`bf16_padded`), and the mixed precision of model/precision.py
  (bf16 lower blocks, fp32 top quarter and heads) one-per-forward and padded (`mixed_one_per_forward`,
  `mixed_padded`); only where the CPU has AVX512-bf16 or AMX (elsewhere bf16 is emulated and slow).

Before the candidates it runs what `auto` runs at model load on a CPU (model/plan_measurement.py: the short
measurement on the packaged samples, not cached here) and prints its decision (`"auto_decision"` row); after
them, per candidate, whether it meets auto's criteria on this bench subset (`admissible`: >= 99 % of
preferences, max deviation <= 5 % of the fp32 score std), and the plan auto's rule picks from this run's own
figures (`"auto_rule_on_bench"` row).

    python bench/cpu.py [--pairs 100] [--max-tokens 320] [--chunk 20] [--tiny] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, load_scorer, machine, timed, variant  # noqa: E402


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def held_out_pairs(scorer, n: int, max_tokens: int):
    """n held-out pairs, both sides at most max_tokens tokens (short, to fit this CPU), spread over the eval
    categories round-robin and ordered by a hash of the pair id (fixed, independent of file order)."""
    from rewardsvc.training.data.build import build_training_sets

    pairs = build_training_sets().eval_pairs
    by_category: dict[str, list] = {}
    for p in sorted(pairs, key=lambda p: hashlib.sha256(p.id.encode()).hexdigest()):
        by_category.setdefault(p.category, []).append(p)
    chosen, iters = [], {c: iter(v) for c, v in sorted(by_category.items())}
    while len(chosen) < n and iters:
        for c in list(iters):
            for p in iters[c]:
                sides = [p.prompt + [{"role": "assistant", "content": r}] for r in (p.chosen, p.rejected)]
                try:
                    if all(scorer.encode(s).num_tokens <= max_tokens for s in sides):
                        chosen.append((p.category, sides))
                        break
                except Exception:  # noqa: BLE001 - a pair the template rejects is simply not in the subset
                    continue
            else:
                del iters[c]
            if len(chosen) >= n:
                break
    return chosen


def tiny_pairs(n: int):
    out = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"Question {i}: how do I sort a list in Python?"}]
        out.append(("tiny", [prompt + [{"role": "assistant", "content": a}] for a in
                             (f"Use sorted(items) ({i}).", "I cannot help with that request. " * (1 + i % 3))]))  # fmt: skip
    return out


def quantized(model, spec: str, blocks_kept_fp32: tuple[int, ...] = (), mlp_only: bool = False):
    """A torch.ao dynamic int8 copy: `per_tensor` or `per_channel` weights, activations quantized per call."""
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = per_channel_dynamic_qconfig if spec == "per_channel" else default_dynamic_qconfig
    names = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".layers." not in f".{name}":
            continue
        block = int(name.split("layers.")[1].split(".")[0])
        if block in blocks_kept_fp32 or (mlp_only and ".mlp." not in f".{name}"):
            continue
        names[name] = qconfig
    return quantize_dynamic(copy.deepcopy(model), names, dtype=torch.qint8)


def candidates(scorer, flags: set[str], depth: int):
    """(name, build) pairs; build() returns the candidate scorer, or raises Skip(reason)."""
    m = scorer.backbone.model

    def with_model(model):
        clone = variant(scorer, batch_invariant=True)  # one conversation per forward, no padding
        clone.backbone = replace(scorer.backbone, model=model)
        return clone

    def torchao(config_name):
        try:
            import torchao.quantization as tq
        except ImportError as exc:
            raise Skip(f"torchao is not installed: {exc}") from exc
        q = copy.deepcopy(m)
        tq.quantize_(q, getattr(tq, config_name)(), filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear) and ".layers." in f".{fqn}")
        return with_model(q)

    def lower_precision(precision, batch_plan):
        from rewardsvc.model.precision import precision_copy

        if not flags & {"avx512_bf16", "amx_bf16"}:
            raise Skip("the CPU has neither avx512_bf16 nor amx_bf16: bf16 matmuls are emulated")
        if batch_plan == "one-per-forward":
            clone = variant(scorer, batch_invariant=True)
        else:
            clone = variant(scorer, batch_plan=batch_plan, share_prompts=False)
        clone.backbone = precision_copy(scorer.backbone, precision)
        return clone

    yield "fp32_one_per_forward", lambda: variant(scorer, batch_invariant=True)
    yield "fp32_padded", lambda: variant(scorer, batch_plan="padded", share_prompts=False)
    yield "fp32_packed", lambda: variant(scorer, batch_plan="packed", share_prompts=False)
    yield "fp32_pairs_shared_prompt", lambda: variant(scorer, batch_plan="padded", share_prompts=True, max_batch_size=2)
    yield "int8_per_tensor_all", lambda: with_model(quantized(m, "per_tensor"))
    yield "int8_per_channel_all", lambda: with_model(quantized(m, "per_channel"))
    yield "int8_per_channel_first_last_fp32", lambda: with_model(quantized(m, "per_channel", (0, depth - 1)))
    yield "int8_per_channel_mlp_only", lambda: with_model(quantized(m, "per_channel", mlp_only=True))
    yield "torchao_int8_dyn_act_int8_weight", lambda: torchao("Int8DynamicActivationInt8WeightConfig")
    yield "torchao_int8_weight_only", lambda: torchao("Int8WeightOnlyConfig")
    yield "bf16", lambda: lower_precision("bfloat16", "one-per-forward")
    yield "bf16_padded", lambda: lower_precision("bfloat16", "padded")
    yield "mixed_one_per_forward", lambda: lower_precision("mixed", "one-per-forward")
    yield "mixed_padded", lambda: lower_precision("mixed", "padded")


# The candidates that are scoring plans `auto` chooses between (model/scoring_plan.ScoringPlan names).
PLAN_OF_CANDIDATE = {
    "fp32_padded": "float32/padded", "fp32_packed": "float32/packed", "fp32_one_per_forward": "float32/one-per-forward",
    "bf16": "bfloat16/one-per-forward", "bf16_padded": "bfloat16/padded",
    "mixed_one_per_forward": "mixed/one-per-forward", "mixed_padded": "mixed/padded",
}  # fmt: skip


def auto_decision(scorer, out, budget_s):
    """What `auto` decides at load on this machine (measured now, not read from the cache)."""
    from rewardsvc.model.plan_measurement import measure_and_choose
    from rewardsvc.model.scoring_plan import PLAN_BATCH_PLANS, PLAN_PRECISIONS

    decision = measure_and_choose(scorer, list(PLAN_BATCH_PLANS), list(PLAN_PRECISIONS), budget_s=budget_s)
    emit({"bench": "cpu", "auto_decision": decision.plan.name, "model": scorer.model_id, "budget_s": budget_s, **decision.as_dict(),
          "cpu_flags_bf16": sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "amx_tile"}), **machine()}, out)  # fmt: skip
    return decision


class Skip(Exception):
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=320, help="longest side of a pair kept in the subset")
    parser.add_argument("--chunk", type=int, default=20, help="pairs per round-robin chunk")
    parser.add_argument("--only", help="comma-separated candidate names (default: all)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and synthetic pairs (seconds)")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    parser.add_argument("--no-auto", action="store_true", help="skip the auto decision's own measurement")
    parser.add_argument("--auto-budget-s", type=float, default=None,
                        help="time budget of that measurement (default: the one used at load, plan_measurement.BUDGET_S)")
    args = parser.parse_args()

    os.environ["REWARDSVC_AUTO_PLAN"] = "device"  # the candidates start from fp32 padded; auto is measured below
    scorer = load_scorer(args.tiny)
    from rewardsvc.model.plan_measurement import BUDGET_S

    decision = None if args.no_auto else auto_decision(scorer, args.out, args.auto_budget_s or BUDGET_S)
    pairs = tiny_pairs(args.pairs) if args.tiny else held_out_pairs(scorer, args.pairs, args.max_tokens)
    conversations = [side for _, sides in pairs for side in sides]  # chosen, rejected, chosen, ...
    tokens = [scorer.encode(c).num_tokens for c in conversations]
    wanted = set(args.only.split(",")) if args.only else None
    active = {}
    info = machine()
    for name, build in candidates(scorer, cpu_flags(), scorer.backbone.depth):
        if wanted is not None and name not in wanted and name != "fp32_one_per_forward":
            continue
        try:
            active[name] = build()
        except Skip as skip:
            emit({"bench": "cpu", "candidate": name, "skipped": str(skip)}, args.out)
    seconds = {n: 0.0 for n in active}
    scores: dict[str, list[float]] = {n: [] for n in active}
    step = 2 * args.chunk
    for start in range(0, len(conversations), step):
        chunk = conversations[start : start + step]
        for name, cand in active.items():
            results, dt = timed(cand.score, chunk)
            seconds[name] += dt
            scores[name] += [r.score for r in results]
        print(f"progress: {min(start + step, len(conversations))}/{len(conversations)} conversations through "
              f"{len(active)} candidates", file=sys.stderr, flush=True)  # fmt: skip
    ref = scores["fp32_one_per_forward"]
    mean = sum(ref) / len(ref)
    std = math.sqrt(sum((s - mean) ** 2 for s in ref) / len(ref))
    total = sum(tokens)
    base_rate = total / seconds["fp32_one_per_forward"]
    from rewardsvc.model.scoring_plan import CandidateMeasurement, PlanCriteria, ScoringPlan, choose_plan

    criteria, on_bench = PlanCriteria(), []
    for name in active:
        s = scores[name]
        dev = max(abs(a - b) for a, b in zip(s, ref))
        agree = sum((s[2 * i] > s[2 * i + 1]) == (ref[2 * i] > ref[2 * i + 1]) for i in range(len(pairs))) / len(pairs)
        accuracy = sum(s[2 * i] > s[2 * i + 1] for i in range(len(pairs))) / len(pairs)
        sm = sum(s) / len(s)
        cov = sum((a - sm) * (b - mean) for a, b in zip(s, ref))
        corr = cov / math.sqrt(sum((a - sm) ** 2 for a in s) * sum((b - mean) ** 2 for b in ref) or 1.0)
        rate = total / seconds[name]
        extra = {}
        if name in PLAN_OF_CANDIDATE:
            precision, batch_plan = PLAN_OF_CANDIDATE[name].split("/")
            measured = CandidateMeasurement(ScoringPlan(batch_plan, precision), seconds[name], agree, dev / std if std else math.inf)
            on_bench.append(measured)
            extra = {"plan": PLAN_OF_CANDIDATE[name], "admissible": criteria.admits(measured),
                     "auto_decision": decision.plan.name if decision else None}  # fmt: skip
        emit({"bench": "cpu", "candidate": name, **extra, "model": scorer.model_id, "pairs": len(pairs), "tokens": total,
              "seconds": round(seconds[name], 2), "tokens_per_s": round(rate, 1),
              "ratio_vs_fp32_one_per_forward": round(rate / base_rate, 3), "max_score_deviation": round(dev, 6),
              "deviation_over_std": round(dev / std, 4) if std else None, "score_std": round(std, 4),
              "correlation": round(corr, 5), "preferences_unchanged": round(agree, 4),
              "accuracy": round(accuracy, 4), **info}, args.out)  # fmt: skip
    default = ScoringPlan("padded", "float32")
    if any(x.plan == default for x in on_bench):
        plan, reason = choose_plan(on_bench, default, criteria)
        chosen = next((x for x in on_bench if x.plan == plan), None)
        emit({"bench": "cpu", "auto_rule_on_bench": plan.name, "reason": reason,
              "auto_decision": decision.plan.name if decision else None,
              "auto_decision_admissible_on_bench": (criteria.admits(next(x for x in on_bench if x.plan == decision.plan))
                                                    if decision and any(x.plan == decision.plan for x in on_bench) else None),
              "chosen_seconds": round(chosen.seconds, 2) if chosen else None, **info}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
