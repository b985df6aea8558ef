"""The statistics behind every number that decides something: a 95% interval for a top-1, whether a model beats the
majority class, and whether two models differ on the same videos (paired: McNemar's exact test). Plain Python and
numpy, exact binomial tails (scipy is not a dependency for these few lines).

The unit is the video (its eval windows averaged). With 71 test videos a top-1 of 77.5% reads 66.5-85.6% at 95%; a
one-video difference between two rungs means nothing, and these are what tell so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054    # two-sided 95% normal quantile
ALPHA = 0.05               # significance level of every test here


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (right at small n and near 0 or 1, where the normal one is not)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed exactly in log space."""
    if k <= 0:
        return 1.0
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
             + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def above_rate(correct: int, n: int, rate: float) -> float:
    """One-sided p-value that a model with `correct` of `n` right is better than always answering with `rate`
    accuracy (the majority class): P(X >= correct) under Binomial(n, rate)."""
    return binomial_tail(correct, n, rate)


def worse_than(top1: float, n: int, reference: float) -> float:
    """One-sided p-value that a top-1 measured on n videos comes from a model worse than `reference` (measured on
    other videos, whose own noise this leaves out): P(X <= top1 * n) under Binomial(n, reference)."""
    k = round(top1 * n)
    return 1.0 - binomial_tail(k + 1, n, reference)


@dataclass(frozen=True)
class Paired:
    """Two models on the same videos: how many only A got right, only B, and McNemar's exact two-sided p-value."""
    only_a: int
    only_b: int
    p_value: float

    @property
    def difference(self) -> int:
        return self.only_a - self.only_b

    def a_worse(self) -> bool:
        """A is significantly worse than B (more videos only B gets right, beyond chance)."""
        return self.only_b > self.only_a and self.p_value < ALPHA

    def describe(self, a: str, b: str) -> str:
        return (f"{self.only_a} videos only {a} got right, {self.only_b} only {b}: McNemar p={self.p_value:.3g}"
                + (" (significant)" if self.p_value < ALPHA else " (not significant)"))


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> Paired:
    """McNemar's exact test on per-video correctness (bool arrays over the same videos, in the same order)."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired test: {a.shape} vs {b.shape} videos; the two models must be scored on the same videos")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    discordant = only_a + only_b
    p = 1.0 if discordant == 0 else min(1.0, 2 * binomial_tail(max(only_a, only_b), discordant, 0.5))
    return Paired(only_a, only_b, p)


def majority_rate(counts: dict[str, int]) -> tuple[str, float]:
    """(the most frequent class, its share): the accuracy of always answering it."""
    total = sum(counts.values())
    label = max(sorted(counts), key=lambda c: counts[c])
    return label, counts[label] / total if total else 0.0


def confusion(labels: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """[true class, predicted class] counts."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, int), np.asarray(predicted, int)), 1)
    return matrix


def per_class_recall(matrix: np.ndarray) -> list[float | None]:
    """Recall per true class (None for a class absent from the videos)."""
    totals = matrix.sum(axis=1)
    return [float(matrix[i, i] / totals[i]) if totals[i] else None for i in range(len(matrix))]


def pack_correct(correct: np.ndarray) -> str:
    """Per-video correctness as a compact string (a bit per video, hex-packed): what a registry tag can hold, so a
    later challenger is tested against the champion on the same videos."""
    bits = np.packbits(np.asarray(correct, bool))
    return f"{len(correct)}:{bits.tobytes().hex()}"


def unpack_correct(packed: str) -> np.ndarray:
    n, _, hexed = packed.partition(":")
    return np.unpackbits(np.frombuffer(bytes.fromhex(hexed), dtype=np.uint8))[: int(n)].astype(bool)


def format_top1(correct: int, n: int) -> str:
    """'77.5% (66.5-85.6, 95% CI, n=71)'."""
    low, high = wilson_interval(correct, n)
    return f"{100 * correct / max(n, 1):.1f}% ({100 * low:.1f}-{100 * high:.1f}, 95% CI, n={n})"
