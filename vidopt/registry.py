"""Promotion gates of the model registry, as plain decisions (tasks/register.py applies them with MLflow).

Every new version of a target's registered model becomes the `challenger`; it becomes the `champion` only when every
gate passes: verified on the target's own runtime, top-1 within budget of the teacher, latency (and size) within budget,
and not worse than the current champion.
"""
from __future__ import annotations

from dataclasses import dataclass

from vidopt.artifacts import TargetResult
from vidopt.config import BudgetConfig


@dataclass(frozen=True)
class Gate:
    name: str
    passed: bool
    detail: str


def promotion_gates(result: TargetResult, teacher_top1: float | None, budgets: BudgetConfig,
                    champion_top1: float | None) -> list[Gate]:
    """The gates a new version of `result.target` must pass. champion_top1: the current champion's test top-1, or
    None when there is no champion yet."""
    gates = [_verified(result, budgets)]
    top1 = result.top1
    if top1 is None or teacher_top1 is None:
        gates.append(Gate("top1_vs_teacher", False, "no test top-1 measured for the target or the teacher"))
    else:
        drop = teacher_top1 - top1
        gates.append(Gate("top1_vs_teacher", drop <= budgets.max_top1_drop + 1e-9,
                          f"{100 * top1:.1f}% vs teacher {100 * teacher_top1:.1f}%: "
                          f"{100 * drop:+.2f} points lost, budget {100 * budgets.max_top1_drop:.1f}"))  # 2.03 > 2.0
    if budgets.max_latency_ms is not None:
        latency = result.latency_ms
        gates.append(Gate("latency", latency is not None and latency <= budgets.max_latency_ms,
                          f"{_fmt(latency)} ms on {result.runtime or 'no runtime'}, budget {budgets.max_latency_ms} ms"))
    if budgets.max_artifact_mb is not None:
        mb = result.artifact_bytes / 1e6
        gates.append(Gate("size", 0 < mb <= budgets.max_artifact_mb,
                          f"{mb:.2f} MB, budget {budgets.max_artifact_mb} MB"))
    if champion_top1 is None:
        gates.append(Gate("vs_champion", True, "no champion yet"))
    else:
        gates.append(Gate("vs_champion", top1 is not None and top1 >= champion_top1,
                          f"{_fmt_pct(top1)} vs champion {_fmt_pct(champion_top1)}"))
    return gates


def _verified(result: TargetResult, budgets: BudgetConfig) -> Gate:
    """Float targets already fail in their worker when parity is outside tolerance; int8 and fixed-point targets
    report argmax agreement, held to the budget here."""
    if result.status != "ok":
        return Gate("verified", False, f"{result.status}: {result.reason}")
    agreement = result.parity.get("argmax_agreement")
    if agreement is not None and agreement < budgets.min_argmax_agreement:
        # 4 decimals: 195 of 197 clips (0.98985) must not read as "0.990 < 0.99"
        return Gate("verified", False, f"argmax agreement {agreement:.4f} < {budgets.min_argmax_agreement}")
    return Gate("verified", True, ", ".join(f"{k} {v:.3g}" for k, v in result.parity.items()) or "ok")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
