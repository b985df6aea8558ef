"""Promotion gates: each fails on its own cause, with its numbers. A candidate must beat answering the majority class
significantly, and must not be significantly worse than the champion on the same videos (McNemar), while a one-video
difference is no reason to keep the old champion."""
import numpy as np

from vidopt.artifacts import TargetResult
from vidopt.config import BudgetConfig
from vidopt.registry import Champion, promotion_gates
from vidopt.stats import pack_correct

CLIPS = "c" * 64   # the sha256 of the eval clip set both were scored on


def correct(right: int, n: int = 100) -> str:
    return pack_correct(np.arange(n) < right)


def result(**kw) -> TargetResult:
    base = {"target": "cpu", "status": "ok", "runtime": "onnxruntime", "top1": 0.90, "latency_ms": 2.0,
            "artifact_bytes": 500_000, "parity": {"argmax_agreement": 1.0}, "correct": correct(90),
            "eval_clips": CLIPS}
    return TargetResult(**{**base, **kw})


def failed(gates) -> set[str]:
    return {g.name for g in gates if not g.passed}


def test_a_verified_target_within_budget_and_no_champion_passes_every_gate():
    gates = promotion_gates(result(), teacher_top1=0.91, budgets=BudgetConfig(), champion=None, majority=("a", 0.5))
    assert failed(gates) == set()
    assert {g.name for g in gates} == {"verified", "above_majority", "top1_vs_teacher", "vs_champion"}


def test_each_gate_fails_on_its_own_cause():
    budgets = BudgetConfig(max_top1_drop=0.02, max_latency_ms=1.5, max_artifact_mb=0.4, min_argmax_agreement=0.99)
    assert failed(promotion_gates(result(top1=0.88, correct=correct(88)), 0.91, budgets, None)) >= {"top1_vs_teacher"}
    assert failed(promotion_gates(result(), 0.91, budgets, None)) == {"latency", "size"}
    low_agreement = result(parity={"argmax_agreement": 0.95}, latency_ms=1.0, artifact_bytes=100_000)
    assert failed(promotion_gates(low_agreement, 0.91, budgets, None)) == {"verified"}
    floor = BudgetConfig(min_top1=0.95)
    [gate] = [g for g in promotion_gates(result(), 0.91, floor, None) if g.name == "min_top1"]
    assert not gate.passed and gate.detail == "90.0%, budget 95.0%"


def test_a_model_no_better_than_the_majority_class_is_refused_with_its_numbers():
    """The tiny profile's case: 1 clip of 13 right, 2 of 13 clips in the most frequent class."""
    chance = result(top1=1 / 13, correct=correct(1, 13))
    [gate] = [g for g in promotion_gates(chance, 0.0, BudgetConfig(), None, ("circle", 2 / 13))
              if g.name == "above_majority"]
    assert not gate.passed and "vs always answering 'circle' (15.4%)" in gate.detail and "p=" in gate.detail
    # the real footage's student: 54 of 71 against a 57.7% majority class
    good = result(top1=54 / 71, correct=correct(54, 71))
    assert "above_majority" not in failed(promotion_gates(good, 0.56, BudgetConfig(max_top1_drop=1), None,
                                                          ("normal", 0.577)))


def test_the_champion_stays_only_where_the_challenger_is_significantly_worse_on_the_same_videos():
    champion = Champion("3", 0.92, correct(92), CLIPS)
    one_clip_worse = result(top1=0.91, correct=correct(91))
    [gate] = [g for g in promotion_gates(one_clip_worse, 0.91, BudgetConfig(), champion) if g.name == "vs_champion"]
    assert gate.passed and "not significant" in gate.detail and "same 100 videos" in gate.detail
    much_worse = result(top1=0.80, correct=correct(80))
    [gate] = [g for g in promotion_gates(much_worse, 0.80, BudgetConfig(), champion) if g.name == "vs_champion"]
    assert not gate.passed and "0 videos only this version got right, 12 only the champion" in gate.detail
    # other clips (new data): the proportions are compared instead
    elsewhere = Champion("3", 0.92, correct(92), "d" * 64)
    [gate] = [g for g in promotion_gates(much_worse, 0.80, BudgetConfig(), elsewhere) if g.name == "vs_champion"]
    assert not gate.passed and "on other clips" in gate.detail


def test_a_failed_or_unmeasured_target_is_never_promoted():
    skipped = result(status="skipped", reason="no TPU pool", top1=None, latency_ms=None, correct="")
    assert failed(promotion_gates(skipped, 0.9, BudgetConfig(max_latency_ms=5), None, ("a", 0.5))) == {
        "verified", "above_majority", "top1_vs_teacher", "latency"}
    float_target = result(parity={"max_abs_diff": 1e-6})  # float targets: parity already checked in the worker
    assert failed(promotion_gates(float_target, 0.9, BudgetConfig(), None)) == set()


def test_gates_count_videos_where_the_target_recorded_them():
    # 80 of 100 clips right, but 45 of 50 videos once each video's windows are averaged: the gates read 90%
    per_video = result(top1=0.80, correct=correct(45, 50))
    gates = {g.name: g for g in promotion_gates(per_video, teacher_top1=0.91, budgets=BudgetConfig(min_top1=0.85),
                                                 champion=None, majority=("a", 0.5))}
    assert gates["min_top1"].passed and gates["min_top1"].detail.startswith("90.0%")
    assert gates["top1_vs_teacher"].passed and "1.00 points lost" in gates["top1_vs_teacher"].detail
    assert "n=50" in gates["above_majority"].detail
