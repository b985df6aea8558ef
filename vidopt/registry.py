"""Promotion gates of the model registry, as plain decisions (tasks/register.py applies them with MLflow).

Every new version of a target's registered model becomes the `challenger`; it becomes the `champion` only when every
gate passes: verified on the target's own runtime, significantly better than always answering the majority class,
top-1 at least `budgets.min_top1` and within budget of the teacher, latency (and size) within budget, and not
significantly worse than the current champion (McNemar's test on the same test videos). Each gate keeps its numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vidopt.artifacts import TargetResult
from vidopt.config import BudgetConfig
from vidopt.stats import ALPHA, above_rate, format_top1, mcnemar, unpack_correct, worse_than


@dataclass(frozen=True)
class Gate:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Champion:
    """The current champion as the registry recorded it."""
    version: str
    top1: float | None
    correct: str = ""        # its packed per-video correctness (vidopt/stats.py)
    eval_clips: str = ""     # sha256 of the clip set it was scored on


def promotion_gates(result: TargetResult, teacher_top1: float | None, budgets: BudgetConfig,
                    champion: Champion | None, majority: tuple[str, float] | None = None) -> list[Gate]:
    """The gates a new version of `result.target` must pass. majority: (class, share) of the test split's most
    frequent class: what answering it always scores."""
    gates = [_verified(result, budgets)]
    correct = unpack_correct(result.correct) if result.correct else None
    top1 = video_top1(result)
    if majority is not None:
        gates.append(_above_majority(correct, *majority))
    if budgets.min_top1 is not None:
        gates.append(Gate("min_top1", top1 is not None and top1 >= budgets.min_top1 - 1e-9,
                          f"{_fmt_pct(top1)}, budget {_fmt_pct(budgets.min_top1)}"))
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
    gates.append(_vs_champion(result, correct, champion))
    return gates


def _above_majority(correct: np.ndarray | None, label: str, rate: float) -> Gate:
    """Significantly better (one-sided binomial test, p < 0.05) than always answering the most frequent class."""
    if correct is None or len(correct) == 0:
        return Gate("above_majority", False, "no per-video results to test against the majority class")
    k, n = int(correct.sum()), len(correct)
    p = above_rate(k, n, rate)
    return Gate("above_majority", p < ALPHA, f"{format_top1(k, n)} vs always answering {label!r} "
                                             f"({100 * rate:.1f}%): p={p:.2g}, needs < {ALPHA}")


def _vs_champion(result: TargetResult, correct: np.ndarray | None, champion: Champion | None) -> Gate:
    """Not significantly worse than the champion: McNemar's test on the same videos; where the eval clips differ (new
    data), a one-sided test of the two proportions."""
    if champion is None:
        return Gate("vs_champion", True, "no champion yet")
    same_clips = (correct is not None and champion.correct and result.eval_clips
                  and result.eval_clips == champion.eval_clips)
    if same_clips:
        paired = mcnemar(correct, unpack_correct(champion.correct))
        return Gate("vs_champion", not paired.a_worse(),
                    f"vs champion v{champion.version} on the same {len(correct)} videos: "
                    + paired.describe("this version", "the champion"))
    top1 = video_top1(result)
    if top1 is None or champion.top1 is None or correct is None:
        return Gate("vs_champion", top1 is not None and champion.top1 is not None and top1 >= champion.top1,
                    f"{_fmt_pct(top1)} vs champion v{champion.version} {_fmt_pct(champion.top1)} "
                    "(no per-video results: compared as numbers)")
    p = worse_than(top1, len(correct), champion.top1)
    return Gate("vs_champion", p >= ALPHA, f"{_fmt_pct(top1)} (n={len(correct)}) vs champion "
                                          f"v{champion.version} {_fmt_pct(champion.top1)} on other clips: "
                                          f"p={p:.2g} that it is worse")


def video_top1(result: TargetResult) -> float | None:
    """Top-1 over the eval videos (each one's windows averaged) where the target recorded which it got right, else
    its top-1 per clip: the unit every gate counts."""
    if result.correct:
        correct = unpack_correct(result.correct)
        if len(correct):
            return float(correct.mean())
    return result.top1


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
