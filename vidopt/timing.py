"""The latency protocol every timing in vidopt shares: one model's calls timed after a warm-up, and several models
timed interleaved, round by round, so a slow spell of a shared machine hits them all alike."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def time_calls(call: Callable[[], object], batch: int, warmup: int, iters: int,
               min_seconds: float = 0.0) -> dict[str, float]:
    """Wall time of at least `iters` calls, and of as many more as fill `min_seconds`, after `warmup` calls: p50/p95
    per call in ms, and clips per second at the median (batch / p50; the median resists the noisy neighbours a shared
    machine has). A sub-millisecond model needs the time floor: 5 calls gave its p50 +-20%."""
    for _ in range(warmup):
        call()
    times: list[float] = []
    while len(times) < iters or sum(times) < min_seconds:
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    p50, p95 = np.percentile(times, [50, 95]) * 1000.0
    return {"p50_ms": float(p50), "p95_ms": float(p95), "throughput_clips_s": float(batch * 1000.0 / p50)}


def interleaved(measures: dict[str, Callable[[], dict[str, float]]], rounds: int) -> dict[str, dict[str, float]]:
    """Each measure once per round, every round: the median over rounds of each statistic, and best_p50_ms, the
    lowest round's p50 -> {name: {p50_ms, p95_ms, throughput_clips_s, best_p50_ms}}.

    best_p50_ms is what to rank models by: a neighbour on a shared machine only ever adds time, and it does not add
    it evenly (on a 2-vCPU VM int8 slowed more than fp32 under load: one ladder pass gave int8 1.65x its fp32 in
    the median rounds and 1.95x between each model's quietest). The median is what a user of that machine would
    typically see."""
    per_round: dict[str, list[dict[str, float]]] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            per_round[name].append(measure())
    return {name: {**{key: float(np.median([r[key] for r in results])) for key in results[0]},
                   "best_p50_ms": float(min(r["p50_ms"] for r in results))}
            for name, results in per_round.items()}
