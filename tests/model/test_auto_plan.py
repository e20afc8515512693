"""`auto` on a CPU: the decision from measurements (a pure function, checked with injected figures), the
on-disk cache of decisions, explicit flags winning, and the real measurement returning a valid plan (slow tier;
it never checks a timing)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rewardsvc.config import BackboneConfig, ScorerConfig
from rewardsvc.errors import InvalidInputError
from rewardsvc.model import plan_measurement
from rewardsvc.model.plan_cache import cache_key, cache_key_fields, cache_path, read_cached, write_cached
from rewardsvc.model.plan_measurement import compare_scores, measure_and_choose, measurement_set, resolve_auto_plan
from rewardsvc.model.scorer import Scorer
from rewardsvc.model.scoring_plan import (PLAN_BATCH_PLANS, PLAN_PRECISIONS, CandidateMeasurement, PlanCriteria,
                                          PlanDecision, ScoringPlan, choose_plan)  # fmt: skip

PADDED = ScoringPlan("padded", "float32")
ONE = ScoringPlan("one-per-forward", "float32")
PACKED = ScoringPlan("packed", "float32")


def m(plan, seconds, preferences=1.0, deviation=0.0, error=None):
    return CandidateMeasurement(plan, seconds, preferences, deviation, error)


# ---- the decision ---------------------------------------------------------------------------------------


def test_the_amd_epyc_figures_keep_fp32_padded():
    # bench/results/cpu-2026-11-30.jsonl: padded 5.13x one-per-forward (bf16 not measured there).
    plan, reason = choose_plan([m(PADDED, 1.0), m(PACKED, 1.05), m(ONE, 5.13)], PADDED)
    assert plan == PADDED and "fastest" in reason


def test_the_intel_amx_figures_pick_one_per_forward_and_refuse_bf16():
    # Reported for an Intel Xeon with AMX: fp32 padded 0.69x one-per-forward; bf16 1.71x one-per-forward but
    # 97.5 % of preferences and 0.25 std. bf16 is not admissible; one-per-forward fp32 is 1/0.69 = 1.45x padded.
    one_s = 0.69
    measured = [m(PADDED, 1.0), m(ONE, one_s), m(ScoringPlan("one-per-forward", "bfloat16"), one_s / 1.71, 0.975, 0.25)]
    plan, reason = choose_plan(measured, PADDED)
    assert plan == ONE
    assert "bfloat16/one-per-forward kept 97.5% of preferences" in reason


def test_an_accurate_mixed_precision_that_is_faster_wins():
    mixed = ScoringPlan("padded", "mixed")
    plan, _ = choose_plan([m(PADDED, 1.0), m(mixed, 0.7, 1.0, 0.02), m(ScoringPlan("padded", "bfloat16"), 0.6, 0.975, 0.25)], PADDED)
    assert plan == mixed


def test_the_criteria_bounds_are_inclusive_and_strict_beyond():
    mixed = ScoringPlan("padded", "mixed")
    assert choose_plan([m(PADDED, 1.0), m(mixed, 0.5, 0.99, 0.05)], PADDED)[0] == mixed
    assert choose_plan([m(PADDED, 1.0), m(mixed, 0.5, 0.9899, 0.0)], PADDED)[0] == PADDED
    assert choose_plan([m(PADDED, 1.0), m(mixed, 0.5, 1.0, 0.0501)], PADDED)[0] == PADDED


def test_a_small_gain_keeps_the_default_and_so_its_scores():
    plan, reason = choose_plan([m(PADDED, 1.0), m(PACKED, 0.95)], PADDED)
    assert plan == PADDED and "only 1.05x" in reason
    assert choose_plan([m(PADDED, 1.0), m(PACKED, 0.95)], PADDED, PlanCriteria(min_speedup=1.0))[0] == PACKED


def test_failed_candidates_and_a_missing_default():
    assert choose_plan([m(PADDED, 1.0), m(PACKED, math.inf, 0.0, math.inf, "RuntimeError: no")], PADDED)[0] == PADDED
    plan, reason = choose_plan([m(PACKED, 0.1)], PADDED)
    assert plan == PADDED and "no valid measurement" in reason
    assert choose_plan([], PADDED)[0] == PADDED


def test_plans_are_validated():
    with pytest.raises(InvalidInputError, match="plan.batch_plan"):
        ScoringPlan("sideways", "float32")
    with pytest.raises(InvalidInputError, match="plan.precision"):
        ScoringPlan("padded", "int3")


def test_compare_scores():
    reference = [1.0, 0.0, 2.0, 3.0]  # population std 1.118
    agree, dev = compare_scores([1.0, 0.0, 2.0, 3.0], reference, [(0, 1), (2, 3)])
    assert (agree, dev) == (1.0, 0.0)
    agree, dev = compare_scores([1.0, 0.0, 3.5, 3.0], reference, [(0, 1), (2, 3)])
    assert agree == 0.5 and dev == pytest.approx(1.5 / math.sqrt(1.25))


def test_measurements_round_trip_through_dicts():
    one = CandidateMeasurement(ScoringPlan("packed", "mixed"), 0.25, 0.99, 0.01, None, 2)
    failed = CandidateMeasurement(PADDED, math.inf, 0.0, math.inf, "boom")
    for x in (one, failed):
        assert CandidateMeasurement.from_dict(json.loads(json.dumps(x.as_dict()))) == x


# ---- the cache and the flags --------------------------------------------------------------------------------


@pytest.fixture
def measured_calls(monkeypatch):
    """Replace the timed measurement by an injected decision; record what it was asked to choose between."""
    calls = []

    def fake(scorer, batch_plans, precisions, *args, **kwargs):
        calls.append((list(batch_plans), list(precisions)))
        return PlanDecision(ScoringPlan(batch_plans[-1], precisions[0]), "measured", "injected",
                            (m(ScoringPlan(batch_plans[-1], precisions[0]), 0.5),), 0.1)  # fmt: skip

    monkeypatch.setattr(plan_measurement, "measure_and_choose", fake)
    return calls


def fresh(tiny_scorer, **config):
    """The session's tiny scorer with its own copy of the model and heads (plans convert backbones in place;
    tests here change weights)."""
    import copy

    clone = tiny_scorer.with_config(ScorerConfig(**{"token_budget": 200, "max_batch_size": 5, **config}))
    clone.backbone = copy.copy(tiny_scorer.backbone)
    clone.backbone.model = copy.deepcopy(tiny_scorer.backbone.model)
    clone.heads = copy.deepcopy(tiny_scorer.heads)
    return clone


def test_the_second_start_reads_the_cache(tiny_scorer, tmp_path, measured_calls):
    first = resolve_auto_plan(fresh(tiny_scorer), "auto", cache_dir=tmp_path, mode="measure")
    assert measured_calls == [(list(PLAN_BATCH_PLANS), list(PLAN_PRECISIONS))]
    assert first.plan_decision.source == "measured" and first.config.batch_plan == "one-per-forward"
    [stored] = list(tmp_path.glob("*.json"))
    second = resolve_auto_plan(fresh(tiny_scorer), "auto", cache_dir=tmp_path, mode="measure")
    assert len(measured_calls) == 1  # not measured again
    assert second.plan_decision.source == "cache" and second.plan_decision.plan == first.plan_decision.plan
    assert second.config.batch_plan == "one-per-forward" and str(stored) in second.plan_decision.reason
    assert second.model_info()["scoring_plan"]["source"] == "cache"


def test_the_cache_key_covers_what_the_speed_depends_on(tiny_scorer, tmp_path, monkeypatch):
    scorer = fresh(tiny_scorer)
    fields = cache_key_fields(scorer, {"batch_plans": ["padded"], "precisions": ["float32"]})
    assert {"cpu", "torch", "threads", "backbone", "backbone_weights", "heads_sha256", "measurement_version"} <= set(fields)
    assert fields["torch"] == torch.__version__ and fields["threads"] == torch.get_num_threads()
    other_threads = {**fields, "threads": fields["threads"] + 1}
    assert cache_key(other_threads) != cache_key(fields)
    with torch.no_grad():
        scorer.heads.regression_layer.weight.add_(1.0)
    assert cache_key_fields(scorer, {"batch_plans": ["padded"], "precisions": ["float32"]})["heads_sha256"] != fields["heads_sha256"]
    with torch.no_grad():
        next(scorer.backbone.model.parameters()).mul_(2.0)
    assert cache_key_fields(scorer, {"batch_plans": ["padded"], "precisions": ["float32"]})["backbone_weights"] != fields["backbone_weights"]
    # Stored for other fields (a hash collision, a hand-copied file): not used.
    decision = PlanDecision(PACKED, "measured", "x", (m(PACKED, 1.0),))
    write_cached(tmp_path, fields, decision, "2026-12-06T00:00:00+00:00")
    assert read_cached(tmp_path, fields).plan == PACKED
    cache_path(tmp_path, other_threads).write_text(cache_path(tmp_path, fields).read_text())
    assert read_cached(tmp_path, other_threads) is None


def test_an_unreadable_cache_file_is_measured_again(tiny_scorer, tmp_path, measured_calls):
    scorer = fresh(tiny_scorer)
    fields = cache_key_fields(scorer, {"batch_plans": list(PLAN_BATCH_PLANS), "precisions": list(PLAN_PRECISIONS)})
    cache_path(tmp_path, fields).parent.mkdir(parents=True, exist_ok=True)
    cache_path(tmp_path, fields).write_text("{not json")
    resolved = resolve_auto_plan(scorer, "auto", cache_dir=tmp_path, mode="measure")
    assert len(measured_calls) == 1 and resolved.plan_decision.source == "measured"
    assert read_cached(tmp_path, fields) is not None  # rewritten


def test_explicit_flags_win_over_auto(tiny_scorer, tmp_path, measured_calls):
    both = resolve_auto_plan(fresh(tiny_scorer, batch_plan="packed"), "float32", cache_dir=tmp_path, mode="measure")
    assert measured_calls == [] and both.plan_decision.source == "explicit" and both.config.batch_plan == "packed"
    only_plan = resolve_auto_plan(fresh(tiny_scorer, batch_plan="packed"), "auto", cache_dir=tmp_path, mode="measure")
    assert measured_calls == [(["packed"], list(PLAN_PRECISIONS))] and only_plan.config.batch_plan == "packed"
    resolve_auto_plan(fresh(tiny_scorer), "float32", cache_dir=tmp_path, mode="measure")
    assert measured_calls[-1] == (list(PLAN_BATCH_PLANS), ["float32"])
    invariant = resolve_auto_plan(fresh(tiny_scorer, batch_invariant=True), "auto", cache_dir=tmp_path, mode="measure")
    assert measured_calls[-1] == (["one-per-forward"], list(PLAN_PRECISIONS)) and invariant.config.batch_invariant


def test_device_mode_and_the_environment_switch(tiny_scorer, tmp_path, measured_calls, monkeypatch):
    kept = resolve_auto_plan(fresh(tiny_scorer), "auto", cache_dir=tmp_path, mode="device")
    assert measured_calls == [] and kept.plan_decision.plan == PADDED and kept.plan_decision.source == "device default"
    monkeypatch.setenv("REWARDSVC_AUTO_PLAN", "sometimes")
    with pytest.raises(InvalidInputError, match="REWARDSVC_AUTO_PLAN"):
        resolve_auto_plan(fresh(tiny_scorer), "auto", cache_dir=tmp_path)


def test_the_suite_loads_with_the_device_rule(tiny_scorer):
    # tests/conftest.py sets REWARDSVC_AUTO_PLAN=device: score comparisons never depend on a timing.
    assert tiny_scorer.plan_decision.source == "explicit" or tiny_scorer.plan_decision.plan == PADDED
    assert tiny_scorer.model_info()["scoring_plan"]["batch_plan"] == tiny_scorer.config.batch_plan


def test_the_measurement_set_is_the_packaged_samples(tiny_scorer):
    encoded, pairs = measurement_set(tiny_scorer)
    assert len(pairs) == 2 + plan_measurement.REFERENCE_PAIRS
    assert all(e.num_tokens <= plan_measurement.MAX_SIDE_TOKENS for e in encoded)
    assert len({i for p in pairs for i in p}) == 2 * len(pairs)


# ---- the real measurement (timing-dependent result, so only its validity is checked) ---------------------------


@pytest.mark.slow
def test_the_real_measurement_returns_a_valid_plan_and_caches_it(tiny_llama_dir, tmp_path, monkeypatch):
    from tiny_models import save_tiny_heads

    monkeypatch.setenv("REWARDSVC_AUTO_PLAN", "measure")
    monkeypatch.setenv("REWARDSVC_CACHE", str(tmp_path / "cache"))
    heads = save_tiny_heads(tmp_path / "heads", tiny_llama_dir)
    scorer = Scorer.load(heads)
    decision = scorer.plan_decision
    assert decision.source == "measured" and decision.plan.batch_plan in PLAN_BATCH_PLANS
    assert decision.plan.precision in PLAN_PRECISIONS
    assert {x.plan for x in decision.measurements if x.stage == 1} == {ScoringPlan(b, "float32") for b in PLAN_BATCH_PLANS}
    # On a loaded machine the time budget may stop the measurement early: those candidates say so, no other error.
    assert all(x.error is None or "time budget" in x.error for x in decision.measurements)
    assert decision.measurements[0].error is None  # the reference always runs
    assert scorer.config.batch_plan == decision.plan.batch_plan
    assert len(list((tmp_path / "cache" / "plans").glob("*.json"))) == 1
    again = Scorer.load(heads)
    assert again.plan_decision.source == "cache" and again.plan_decision.plan == decision.plan
    results = again.score([[{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]])
    assert math.isfinite(results[0].score)


def test_measure_and_choose_on_a_tiny_model_returns_a_valid_plan(tiny_scorer, monkeypatch):
    # One round on two conversations: the real code path, seconds even on a loaded machine; the plan it picks
    # depends on the timing, so only its validity is checked.
    full = measurement_set
    monkeypatch.setattr(plan_measurement, "measurement_set", lambda s: (full(s)[0][:4], [(0, 1), (2, 3)]))
    decision = measure_and_choose(fresh(tiny_scorer), ["padded", "one-per-forward"], ["float32", "mixed"], rounds=1, budget_s=600)
    assert decision.plan in {ScoringPlan(b, p) for b in ("padded", "one-per-forward") for p in ("float32", "mixed")}
    assert [x.plan.name for x in decision.measurements] == [
        "float32/padded", "float32/one-per-forward", f"float32/{decision.measurements[2].plan.batch_plan}",
        f"mixed/{decision.measurements[2].plan.batch_plan}"]  # fmt: skip
    assert decision.measurements[0].deviation_over_std == 0.0


def test_backbone_config_accepts_mixed_and_one_per_forward():
    assert BackboneConfig(dtype="mixed").dtype == "mixed"
    assert ScorerConfig(batch_plan="one-per-forward").batch_plan == "one-per-forward"


def test_past_the_time_budget_only_the_reference_runs_and_the_default_is_kept(tiny_scorer, monkeypatch):
    full = measurement_set
    monkeypatch.setattr(plan_measurement, "measurement_set", lambda s: (full(s)[0][:2], [(0, 1)]))
    decision = measure_and_choose(fresh(tiny_scorer), list(PLAN_BATCH_PLANS), list(PLAN_PRECISIONS), budget_s=0.0, rounds=2)
    assert decision.plan == PADDED and "precisions not measured" in decision.reason
    [ref, *rest] = decision.measurements
    assert ref.plan == PADDED and ref.error is None and math.isfinite(ref.seconds)
    assert [x.plan for x in rest] == [PACKED, ONE] and all("time budget" in x.error for x in rest)
