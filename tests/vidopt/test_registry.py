from vidopt.artifacts import TargetResult
from vidopt.config import BudgetConfig
from vidopt.registry import promotion_gates


def result(**kw) -> TargetResult:
    base = {"target": "cpu", "status": "ok", "runtime": "onnxruntime", "top1": 0.90, "latency_ms": 2.0,
            "artifact_bytes": 500_000, "parity": {"argmax_agreement": 1.0}}
    return TargetResult(**{**base, **kw})


def failed(gates) -> set[str]:
    return {g.name for g in gates if not g.passed}


def test_a_verified_target_within_budget_and_no_champion_passes_every_gate():
    gates = promotion_gates(result(), teacher_top1=0.91, budgets=BudgetConfig(), champion_top1=None)
    assert failed(gates) == set() and {g.name for g in gates} == {"verified", "top1_vs_teacher", "vs_champion"}


def test_each_gate_fails_on_its_own_cause():
    budgets = BudgetConfig(max_top1_drop=0.02, max_latency_ms=1.5, max_artifact_mb=0.4, min_argmax_agreement=0.99)
    assert failed(promotion_gates(result(top1=0.88), 0.91, budgets, None)) >= {"top1_vs_teacher"}
    assert failed(promotion_gates(result(), 0.91, budgets, None)) == {"latency", "size"}
    low_agreement = result(parity={"argmax_agreement": 0.95}, latency_ms=1.0, artifact_bytes=100_000)
    assert failed(promotion_gates(low_agreement, 0.91, budgets, None)) == {"verified"}
    good = result(latency_ms=1.0, artifact_bytes=100_000)
    assert failed(promotion_gates(good, 0.91, budgets, champion_top1=0.92)) == {"vs_champion"}
    assert failed(promotion_gates(good, 0.91, budgets, champion_top1=0.90)) == set()


def test_a_failed_or_unmeasured_target_is_never_promoted():
    skipped = result(status="skipped", reason="no TPU pool", top1=None, latency_ms=None)
    assert failed(promotion_gates(skipped, 0.9, BudgetConfig(max_latency_ms=5), None)) == {
        "verified", "top1_vs_teacher", "latency"}
    float_target = result(parity={"max_abs_diff": 1e-6})  # float targets: parity already checked in the worker
    assert failed(promotion_gates(float_target, 0.9, BudgetConfig(), None)) == set()
