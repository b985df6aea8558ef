"""What the numbers of one run say once their noise is counted: each rung's test top-1 with its 95% interval, each
rung against the teacher and against the rung before it on the same test videos (McNemar), the headlines a reader must
not miss (a student that beats its teacher, a teacher that did not teach), and the final model's confusion matrix.
The report shows them; the registry's gates use the same tests (vidopt/registry.py).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

from vidopt.artifacts import ModelArtifact
from vidopt.stats import ALPHA, format_top1, mcnemar, per_class_recall, unpack_correct, wilson_interval


@dataclass
class RungStats:
    rung: str
    top1: float | None
    interval: tuple[float, float] | None
    videos: int
    vs_teacher: str = ""          # paired test against the teacher on the same videos
    vs_previous: str = ""         # against the rung before it


@dataclass
class Verdicts:
    rungs: list[RungStats]
    headlines: list[str] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)   # the final rung's, [true][predicted]
    recall: list[float | None] = field(default_factory=list)


def ladder_verdicts(ladder: dict[str, ModelArtifact]) -> Verdicts:
    """`ladder`: the rungs in order (teacher first, the shipped int8 last)."""
    names = list(ladder)
    correct = {n: unpack_correct(a.test_correct) if a.test_correct else None for n, a in ladder.items()}
    rungs, headlines = [], []
    for i, name in enumerate(names):
        c = correct[name]
        top1 = float(c.mean()) if c is not None and len(c) else ladder[name].metrics.get("test_top1_video")
        stats = RungStats(name, top1, wilson_interval(int(c.sum()), len(c)) if c is not None else None,
                          len(c) if c is not None else 0)
        teacher = correct[names[0]]
        if i > 0 and c is not None and teacher is not None and len(c) == len(teacher):
            paired = mcnemar(c, teacher)
            stats.vs_teacher = paired.describe(name, names[0])
            if paired.only_a > paired.only_b and paired.p_value < ALPHA:
                headlines.append(f"The {name} beats its teacher on the test videos: {format_top1(int(c.sum()), len(c))}"
                                 f" against {format_top1(int(teacher.sum()), len(teacher))}; {stats.vs_teacher}. "
                                 "The teacher is the weak rung: a better teacher (teacher.init from published "
                                 "weights, more data) would raise the ceiling.")
        previous = correct[names[i - 1]] if i > 0 else None
        if previous is not None and c is not None and len(previous) == len(c):
            stats.vs_previous = mcnemar(c, previous).describe(name, names[i - 1])
        rungs.append(stats)
    check = next((a.notes["teacher_check"] for a in ladder.values() if "teacher_check" in a.notes), "")
    if check and "not significantly better" in check:
        headlines.insert(0, f"The teacher did not teach: {check}. The student learned from the labels alone.")
    final = ladder[names[-1]]
    return Verdicts(rungs, headlines, final.test_confusion,
                    per_class_recall(np.array(final.test_confusion)) if final.test_confusion else [])


def interval_text(stats: RungStats) -> str:
    if stats.interval is None:
        return "-"
    return f"{100 * stats.interval[0]:.1f}-{100 * stats.interval[1]:.1f}"


def confusion_png(matrix: list[list[int]], classes: list[str], title: str) -> bytes:
    """The confusion matrix as a heatmap, counts in the cells, recall per true class on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.array(matrix)
    recall = per_class_recall(m)
    size = max(4.0, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    ax.imshow(m / np.maximum(m.sum(axis=1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), [f"{c} ({'-' if r is None else f'{100 * r:.0f}%'})"
                                        for c, r in zip(classes, recall)])
    for (i, j), count in np.ndenumerate(m):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                    color="white" if count > 0.6 * max(m[i].sum(), 1) else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true class (recall)")
    ax.set_title(title)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)
    return out.getvalue()
