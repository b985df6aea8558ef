"""The run report: every model variant on every target as a point (top-1 vs latency), the Pareto front, the best
variant per target under the user's budgets, and energy and cost per million clips *estimated* from the editable
target profiles (`report.profiles`). Written as a self-contained HTML page, the Pareto plot (PNG), the rows (JSON) and
a plain-text table for the terminal. Plain Python and matplotlib (Agg, no pyplot state): no Prefect, no MLflow.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vidopt.artifacts import CrossValArtifact, ModelArtifact, TargetResult
from vidopt.config import BudgetConfig, TargetProfile, TargetProfiles
from vidopt.storage import atomic_path, atomic_write_text
from vidopt.verdicts import Verdicts, confusion_png, interval_text, ladder_verdicts

CLIPS = 1_000_000        # estimates are per million clips, run one after another at batch 1
LADDER = "ladder"        # pseudo-target: the ladder's rungs as timed on onnxruntime CPU by the quantize stage ...
LADDER_PROFILE = "cpu"   # ... so the CPU profile prices them
# A runtime string holding one of these ran on the target's own kind of device; anything else was a stand-in.
DEVICE_MARKERS = {"cpu": ("cpu",), "gpu": ("cuda", "tensorrt", "nvidia"), "tpu": ("pjrt tpu",), "fpga": ("xrt",)}
COLOURS = {LADDER: "#7f7f7f", "cpu": "#1f77b4", "gpu": "#2ca02c", "tpu": "#ff7f0e", "fpga": "#9467bd"}
MIN_AREA, MAX_AREA = 15.0, 900.0  # marker area in pt^2: the largest artifact gets MAX_AREA, others in proportion
FILES = {"html": "report.html", "plot": "pareto.png", "rows": "rows.json", "table": "report.txt"}
CONFUSION_FILE = "confusion.png"   # the shipped model's confusion matrix, where the run has one
ESTIMATE_NOTE = (
    "Estimates, not measurements. Energy = profile watts x latency x 1e6 clips; cost = profile $/hour x the hours "
    "1e6 clips take one after another at batch 1. The latency is the one measured on the runtime that really ran: "
    "where that runtime is a stand-in (a CPU standing in for a GPU, TPU or FPGA), the estimate prices the target's "
    "device at the stand-in's speed. Edit report.profiles.<target> (device, watts, usd_per_hour) for your own fleet.")


@dataclass
class Point:
    """One model variant on one target. Only points with both top-1 and latency are plotted; `note` says why not."""
    target: str                       # "cpu", "gpu", "tpu", "fpga", or LADDER
    variant: str
    runtime: str = ""                 # what really ran
    top1: float | None = None         # test split, per clip
    latency_ms: float | None = None   # batch 1, p50, on `runtime`
    artifact_bytes: int | None = None
    on_device: bool = False           # False: `runtime` stood in for the target's device (see DEVICE_MARKERS)
    headline: bool = False            # the variant whose numbers the export stage reports for its target
    note: str = ""
    pareto: bool = False              # no other point is as accurate and as fast, and better in one of the two
    over_budget: list[str] = field(default_factory=list)  # each budget this point misses, with its numbers
    kwh_per_million: float | None = None  # estimate from the target's profile
    usd_per_million: float | None = None  # estimate from the target's profile

    @property
    def label(self) -> str:
        return f"{self.target}/{self.variant}"

    @property
    def plotted(self) -> bool:
        return self.top1 is not None and self.latency_ms is not None and self.latency_ms > 0


@dataclass
class Report:
    points: list[Point]
    best: dict[str, dict]             # target -> {"variant": label or None, "reason": why it, or why none}
    targets: list[TargetResult]
    ladder: dict[str, ModelArtifact]
    budgets: BudgetConfig
    profiles: TargetProfiles
    teacher_top1: float | None
    context: dict[str, str] = field(default_factory=dict)  # data version, config hash, ...: shown at the top
    verdicts: Verdicts | None = None                     # intervals, paired tests, headlines (vidopt/verdicts.py)
    classes: list[str] = field(default_factory=list)
    registry: list[dict] = field(default_factory=list)   # the register stage's decision per target
    crossval: CrossValArtifact | None = None             # k-fold scores of the teacher and the student (data.folds)


# ---- points -------------------------------------------------------------------------------------------------------

def on_target_device(target: str, runtime: str) -> bool:
    return any(marker in runtime.lower() for marker in DEVICE_MARKERS.get(target, ()))


def _ladder_latency(metrics: dict, precision: str, threads: int) -> tuple[float, int] | None:
    """(p50 ms, threads) at batch 1 from the quantize stage's `latency.<precision>.b1.t<n>.p50_ms`: `threads` if
    timed, else the fewest threads timed."""
    timed = {int(m.group(1)): v for k, v in metrics.items()
             if (m := re.fullmatch(rf"latency\.{precision}\.b1\.t(\d+)\.p50_ms", k))}
    if not timed:
        return None
    n = threads if threads in timed else min(timed)
    return timed[n], n


def _rung_bytes(metrics: dict) -> int | None:
    """The int8 ONNX file of the quantize stage, else the safetensors weights of the others."""
    size = metrics["size_int8_mb"] * 1e6 if "size_int8_mb" in metrics else metrics.get("size_bytes")
    return None if size is None else int(size)


def ladder_points(ladder: dict[str, ModelArtifact], threads: int = 1) -> list[Point]:
    """Each rung with its test top-1 and size; latency where onnxruntime CPU timed it. The quantize stage times the
    int8 model and, beside it, the fp32 export of the same (pruned) architecture: that is the pruned rung's latency
    (QAT may have changed its weights, which latency does not depend on). Teacher and student are not timed by the
    pipeline (`vidopt bench ladder --project-dir` times them)."""
    int8 = next((a for a in ladder.values() if a.kind == "int8"), None)
    points = []
    for rung, artifact in ladder.items():
        m = artifact.metrics
        precision = "int8" if artifact.kind == "int8" else "fp32"
        timed = _ladder_latency(m, precision, threads)
        if timed is None and artifact.kind == "pruned" and int8 is not None:
            timed = _ladder_latency(int8.metrics, "fp32", threads)
        variant = rung if precision in rung else f"{rung} {precision}"   # "teacher fp32", ..., "int8"
        point = Point(target=LADDER, variant=variant, top1=m.get("test_top1_clip"),
                      artifact_bytes=_rung_bytes(m), on_device=True)
        if timed:
            point.latency_ms = timed[0]
            point.runtime = f"onnxruntime CPUExecutionProvider, batch 1, {timed[1]} thread(s) (quantize stage)"
        else:
            point.note = "latency not timed by the pipeline (vidopt bench ladder --project-dir times it)"
        points.append(point)
    return points


def target_points(result: TargetResult) -> list[Point]:
    """An ok target's variants (extra["variants"]: GPU fp16/int8/AOTInductor, TPU fp32/bf16), or its one headline
    result. A variant that errored is a point without numbers, its error as the note."""
    variants = result.extra.get("variants") or {}
    if not variants:
        note = form_note(result) if result.latency_ms is not None else str(result.extra.get("latency_note",
                                                                                             "no latency measured"))
        return [Point(target=result.target, variant="shipped", runtime=result.runtime, top1=result.top1,
                      latency_ms=result.latency_ms, artifact_bytes=result.artifact_bytes, headline=True,
                      on_device=on_target_device(result.target, result.runtime), note=note)]
    points = []
    for name, v in variants.items():
        if "error" in v:
            points.append(Point(target=result.target, variant=name, note=f"failed: {v['error']}"))
            continue
        size = v.get("bytes")
        if size is None and v.get("artifact") and Path(v["artifact"]).is_file():
            size = Path(v["artifact"]).stat().st_size
        runtime = str(v.get("runtime", ""))
        headline = (name == result.extra["shipped"] if "shipped" in result.extra else
                    (runtime, v.get("latency_ms"), v.get("top1")) == (result.runtime, result.latency_ms, result.top1))
        points.append(Point(target=result.target, variant=name, runtime=runtime, top1=v.get("top1"),
                            latency_ms=v.get("latency_ms"), artifact_bytes=size, headline=headline,
                            on_device=on_target_device(result.target, runtime),
                            note=shipped_note(result) if headline and "shipped" in result.extra else ""))
    return points


def shipped_note(result: TargetResult) -> str:
    """Why a target with several servable variants (workers/gpu.py choose_shipped) serves the one it does."""
    extra, variants = result.extra, result.extra["variants"]
    shipped, faithful = extra["shipped"], extra.get("faithful") or []
    if shipped not in faithful:
        return (f"served: the most faithful; no servable variant agrees with the reference within "
                f"{extra.get('min_argmax_agreement')}")
    note = f"served: the fastest of {len(faithful)} faithful servable variant(s)"
    fastest = extra.get("fastest")
    if fastest and fastest != shipped:
        note += (f"; {fastest} ran faster ({variants[fastest]['latency_ms']:.3f} ms) but is not served "
                 "(an engine is tied to one GPU model and TensorRT version)")
    return note


def form_note(result: TargetResult) -> str:
    """Which int8 form a target shipped and why, where it had several on its own machine (workers/cpu): the forms
    it ranked by speed, and those it left out for agreeing with the reference below the budget."""
    times = result.extra.get("int8_forms_best_p50_ms") or {}
    agreement = result.extra.get("int8_forms_argmax_agreement") or {}
    chosen = result.extra.get("int8_form")
    budget = result.extra.get("min_argmax_agreement")
    left_out = [f"{name} ({value:.4f})" for name, value in agreement.items()
                if budget is not None and value < budget and name != chosen]
    notes = []
    if len(times) >= 2 and chosen in times:
        others = [ms for name, ms in times.items() if name != chosen]
        notes.append(f"int8 form {chosen}: the fastest of {len(times)} on this machine ({times[chosen]:.3f} ms in "
                     f"its quietest round; the others {min(others):.3f}-{max(others):.3f})")
    elif chosen in agreement:
        notes.append(f"int8 form {chosen}")
    if left_out:
        notes.append(f"not shipped, argmax agreement below {budget}: {', '.join(left_out)}")
    return "; ".join(notes)


def pareto_front(points: list[Point]) -> list[bool]:
    """True for each plotted point that no other plotted point dominates (top-1 as high or higher and latency as low
    or lower, strictly better in one). Ties are all on the front."""
    shown = [(p.top1, p.latency_ms) if p.plotted else None for p in points]
    return [s is not None and not any(o is not None and o[0] >= s[0] and o[1] <= s[1] and o != s for o in shown)
            for s in shown]


def budget_failures(point: Point, budgets: BudgetConfig, teacher_top1: float | None) -> list[str]:
    """Each budget `point` misses, with its numbers; [] when it fits (an unmeasured value misses a budget that is
    set). Without a teacher top-1 the accuracy budget cannot apply."""
    misses = []
    if teacher_top1 is not None:
        if point.top1 is None:
            misses.append("top-1 not measured")
        elif teacher_top1 - point.top1 > budgets.max_top1_drop + 1e-9:
            misses.append(f"top-1 {100 * point.top1:.1f}% is {100 * (teacher_top1 - point.top1):.2f} points below "
                          f"the teacher's {100 * teacher_top1:.1f}% (budget {100 * budgets.max_top1_drop:.1f})")
    if budgets.max_latency_ms is not None:
        if point.latency_ms is None:
            misses.append(f"latency not measured (budget {budgets.max_latency_ms:g} ms)")
        elif point.latency_ms > budgets.max_latency_ms:
            misses.append(f"latency {point.latency_ms:.2f} ms > {budgets.max_latency_ms:g} ms")
    if budgets.max_artifact_mb is not None:
        if point.artifact_bytes is None:
            misses.append(f"artifact size unknown (budget {budgets.max_artifact_mb:g} MB)")
        elif point.artifact_bytes / 1e6 > budgets.max_artifact_mb:
            misses.append(f"artifact {point.artifact_bytes / 1e6:.2f} MB > {budgets.max_artifact_mb:g} MB")
    return misses


def estimate_per_million(latency_ms: float, profile: TargetProfile) -> tuple[float, float]:
    """(kWh, USD) for CLIPS clips one after another at batch 1: profile watts x time, profile $/hour x time."""
    seconds = latency_ms / 1e3 * CLIPS
    return profile.watts * seconds / 3.6e6, profile.usd_per_hour * seconds / 3600


def best_per_target(points: list[Point], targets: list[TargetResult]) -> dict[str, dict]:
    """Per export target, the fastest variant that fits every budget (ties: higher top-1, then smaller artifact; a
    variant without latency only when no latency budget is set, after every timed one). `points` carry their
    `over_budget` already. A skipped or failed target, or one with nothing that fits, gets None and the reason."""
    best = {}
    for result in targets:
        if result.status != "ok":
            best[result.target] = {"variant": None, "reason": f"target {result.status}: {result.reason}"}
            continue
        mine = [p for p in points if p.target == result.target and p.top1 is not None]
        fits = [p for p in mine if not p.over_budget]
        if not fits:
            why = "; ".join(f"{p.variant}: {', '.join(p.over_budget)}" for p in mine) or "no variant has a top-1"
            best[result.target] = {"variant": None, "reason": f"no variant fits the budgets ({why})"}
            continue
        pick = min(fits, key=lambda p: (p.latency_ms if p.latency_ms is not None else float("inf"), -p.top1,
                                        p.artifact_bytes or 0))
        best[result.target] = {"variant": pick.label, "reason": f"fastest of {len(fits)} of {len(mine)} variants "
                                                                "within every budget"}
    return best


def build_report(ladder: dict[str, ModelArtifact], targets: list[TargetResult], budgets: BudgetConfig,
                 profiles: TargetProfiles, threads: int = 1, context: dict[str, str] | None = None,
                 classes: list[str] | None = None, registry: list[dict] | None = None,
                 crossval: CrossValArtifact | None = None) -> Report:
    """`threads`: the onnxruntime thread count whose ladder latencies to show (the CPU target's, export.cpu_threads);
    `registry`: the register stage's decisions, shown with their reasons; `crossval`: k-fold scores, when run."""
    points = ladder_points(ladder, threads)
    points += [p for result in targets if result.status == "ok" for p in target_points(result)]
    teacher = next((a for a in ladder.values() if a.kind == "teacher"), None)
    teacher_top1 = teacher.metrics.get("test_top1_clip") if teacher else None
    for point, on_front in zip(points, pareto_front(points)):
        point.pareto = on_front
        point.over_budget = budget_failures(point, budgets, teacher_top1)
        profile = getattr(profiles, LADDER_PROFILE if point.target == LADDER else point.target, None)
        if isinstance(profile, TargetProfile) and point.latency_ms is not None:
            point.kwh_per_million, point.usd_per_million = estimate_per_million(point.latency_ms, profile)
    return Report(points, best_per_target(points, targets), targets, ladder, budgets, profiles, teacher_top1,
                  dict(context or {}), ladder_verdicts(ladder), list(classes or []), list(registry or []), crossval)


def best_summary(report: Report) -> dict[str, dict]:
    """`report.best` with the chosen point's numbers and estimates: what the report record and MLflow carry."""
    by_label = {p.label: p for p in report.points}
    keys = ("top1", "latency_ms", "artifact_bytes", "kwh_per_million", "usd_per_million", "runtime", "on_device")
    return {target: {**choice, **({k: getattr(by_label[choice["variant"]], k) for k in keys}
                                  if choice["variant"] in by_label else {})}
            for target, choice in report.best.items()}


def budget_text(budgets: BudgetConfig, teacher_top1: float | None) -> str:
    if teacher_top1 is None:
        top1 = "top-1: no teacher top-1, budget not applied"
    else:
        top1 = (f"top-1 >= {100 * (teacher_top1 - budgets.max_top1_drop):.1f}% (teacher {100 * teacher_top1:.1f}% "
                f"- {100 * budgets.max_top1_drop:.1f} points)")
    latency = "no latency limit" if budgets.max_latency_ms is None else f"latency <= {budgets.max_latency_ms:g} ms"
    size = "no size limit" if budgets.max_artifact_mb is None else f"artifact <= {budgets.max_artifact_mb:g} MB"
    return f"{top1}; {latency}; {size}"


# ---- cells shared by the HTML and the text table ------------------------------------------------------------------

def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _pct(fraction: float | None) -> str:
    return _num(None if fraction is None else 100 * fraction, ".1f")


def _mb(size_bytes: int | None) -> str:
    return _num(None if size_bytes is None else size_bytes / 1e6, ".3f")


def _measured_on(p: Point) -> str:
    """The runtime that ran, marked when it stood in for the target's device, and the point's note."""
    runtime = p.runtime + ("" if p.on_device or not p.runtime else "  [stand-in, not the target's device]")
    return "; ".join(s for s in (runtime, p.note) if s)


POINT_HEADERS = ["target", "variant", "top-1 %", "latency ms", "size MB", "front", "budgets",
                 "kWh / 1M clips (estimate)", "USD / 1M clips (estimate)", "measured on / note"]


def _point_cells(p: Point, best_labels: set[str]) -> list[str]:
    budgets = "fits" if not p.over_budget else "; ".join(p.over_budget)
    variant = p.variant + (" (best)" if p.label in best_labels else "")
    variant += " (headline)" if p.headline and p.variant != "shipped" else ""
    return [p.target, variant, _pct(p.top1), _num(p.latency_ms, ".2f"), _mb(p.artifact_bytes),
            "yes" if p.pareto else "", budgets, _num(p.kwh_per_million, ".3g"), _num(p.usd_per_million, ".3g"),
            _measured_on(p)]


BEST_HEADERS = ["target", "best variant", "top-1 %", "latency ms", "size MB", "kWh / 1M clips (estimate)",
                "USD / 1M clips (estimate)", "profile", "measured on / reason"]


def _best_cells(report: Report, target: str) -> list[str]:
    choice = report.best[target]
    profile = getattr(report.profiles, target, None)
    device = f"{profile.device}, {profile.watts:g} W, ${profile.usd_per_hour:g}/h" if profile else "no profile"
    p = next((p for p in report.points if p.label == choice["variant"]), None)
    if p is None:
        return [target, "none", "-", "-", "-", "-", "-", device, choice["reason"]]
    return [target, p.variant, _pct(p.top1), _num(p.latency_ms, ".2f"), _mb(p.artifact_bytes),
            _num(p.kwh_per_million, ".3g"), _num(p.usd_per_million, ".3g"), device, _measured_on(p)]


def _ladder_cells(rung: str, a: ModelArtifact) -> list[str]:
    m = a.metrics
    return [rung, a.kind, _pct(m.get("test_top1_clip")), _pct(m.get("test_top1_video")),
            _num(m.get("macs", 0) / 1e9, ".4f"), f"{m.get('params', 0):,.0f}", _mb(_rung_bytes(m)),
            "; ".join(f"{k}: {v}" for k, v in a.notes.items())]


LADDER_HEADERS = ["rung", "kind", "test top-1 clip %", "test top-1 video %", "GMACs", "params", "size MB", "notes"]
STATS_HEADERS = ["rung", "test top-1 %", "95% CI", "videos", "vs the teacher (same videos)", "vs the rung before"]
REGISTRY_HEADERS = ["model", "version", "champion", "reason", "gates"]
CROSSVAL_HEADERS = ["rung", "top-1 % (every video once)", "95% CI", "videos", "per fold %", "fold mean +- sd"]


def _crossval_rows(report: Report) -> list[list[str]]:
    cv = report.crossval
    if cv is None:
        return []
    return [[rung, _pct(p["top1"]), f"{100 * p['low']:.1f}-{100 * p['high']:.1f}", str(int(p["videos"])),
             " / ".join(f"{100 * f.top1[rung]:.1f}" for f in cv.folds),
             f"{100 * p['fold_mean']:.1f} +- {100 * p['fold_sd']:.1f}"] for rung, p in cv.pooled.items()]


def _crossval_title(report: Report) -> str:
    return (f"Cross-validation: {len(report.crossval.folds)} folds, every video tested once "
            f"(student vs teacher: {report.crossval.student_vs_teacher})")


def _stats_rows(report: Report) -> list[list[str]]:
    if report.verdicts is None:
        return []
    return [[r.rung, _pct(r.top1), interval_text(r), str(r.videos), r.vs_teacher or "-", r.vs_previous or "-"]
            for r in report.verdicts.rungs]


def _registry_rows(report: Report) -> list[list[str]]:
    return [[d["model"], str(d.get("version") or "-"), "yes" if d.get("champion") else "no", d.get("reason", ""),
             "; ".join(f"{g['name']} {'pass' if g['passed'] else 'FAIL'}: {g['detail']}" for g in d.get("gates", []))]
            for d in report.registry]


def _confusion_html(report: Report) -> str:
    v = report.verdicts
    if v is None or not v.confusion or len(report.classes) != len(v.confusion):
        return ""
    png = confusion_png(v.confusion, report.classes, f"{report.verdicts.rungs[-1].rung}: test videos")
    return ('<h2>Confusion matrix of the shipped model</h2>'
            f'<img alt="confusion matrix" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
TARGET_HEADERS = ["target", "status", "top-1 %", "latency ms", "artifact MB", "parity", "runtime / reason"]


def _target_cells(t: TargetResult) -> list[str]:
    parity = ", ".join(f"{k} {v:.3g}" for k, v in t.parity.items())
    return [t.target, t.status, _pct(t.top1), _num(t.latency_ms, ".2f"), _mb(t.artifact_bytes or None), parity,
            t.runtime if t.status == "ok" else t.reason]


# ---- plot -------------------------------------------------------------------------------------------------------

def pareto_png(report: Report) -> bytes:
    """Top-1 vs latency (log), marker area in proportion to artifact size, a colour per target, the front
    connected, hollow markers for points over a budget, budget lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax, key = fig.subplots(1, 2, width_ratios=[3, 1])
    key.set_axis_off()
    shown = [p for p in report.points if p.plotted]
    if shown:
        _draw_points(ax, shown, report)
        _draw_key(key, shown)
    else:
        ax.text(0.5, 0.5, "no variant has both a top-1 and a latency to plot", ha="center", transform=ax.transAxes)
        ax.set_axis_off()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _draw_key(ax, shown: list[Point]) -> None:
    """The plot's numbers, each with its variant, top-1 and latency."""
    lines = [f"{i:>2}  {_short(p.label, 26):<26} {100 * p.top1:5.1f}% {p.latency_ms:8.3g} ms"
             for i, p in enumerate(shown, 1)]
    ax.text(0, 1, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=7, transform=ax.transAxes,
            parse_math=False)


def _short(text: str, limit: int = 32) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _tick_label(value: float, _position) -> str:
    """Plain numbers on the log axis, minor ticks labelled at 2x and 5x only (10^x mathtext reads badly in ms)."""
    mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
    return f"{value:g}" if mantissa in (1, 2, 5) else ""


def _draw_points(ax, shown: list[Point], report: Report) -> None:
    from matplotlib.colors import to_rgba
    from matplotlib.ticker import FuncFormatter

    biggest = max(p.artifact_bytes or 0 for p in shown) or 1
    placed: list[tuple[float, float]] = []  # where numbers already are: a near one goes below it
    number = {id(p): i for i, p in enumerate(shown, 1)}
    for target in dict.fromkeys(p.target for p in shown):
        mine = [p for p in shown if p.target == target]
        colour = COLOURS.get(target, "#17becf")
        ax.scatter([p.latency_ms for p in mine], [100 * p.top1 for p in mine], label=_short(target),
                   linewidths=1.5, s=[max(MIN_AREA, MAX_AREA * (p.artifact_bytes or 0) / biggest) for p in mine],
                   facecolors=[to_rgba(colour, 0.0 if p.over_budget else 0.6) for p in mine],
                   edgecolors=to_rgba(colour, 0.9))
        for p in mine:   # a number per point, named in the key beside the plot: names overlap, numbers barely
            x, y = math.log10(p.latency_ms), 100 * p.top1
            near = sum(1 for px, py in placed if abs(px - x) < 0.06 and abs(py - y) < 1.5)
            placed.append((x, y))
            ax.annotate(str(number[id(p)]), (p.latency_ms, y), xytext=(6 + 12 * near, 3),
                        textcoords="offset points", fontsize=7, color=colour)
    front = sorted((p for p in shown if p.pareto), key=lambda p: p.latency_ms)
    ax.plot([p.latency_ms for p in front], [100 * p.top1 for p in front], "--", color="black", lw=1,
            label="Pareto front")
    if report.teacher_top1 is not None:
        ax.axhline(100 * report.teacher_top1, color="grey", ls=":", lw=1, label="teacher top-1")
        ax.axhline(100 * (report.teacher_top1 - report.budgets.max_top1_drop), color="red", ls="-.", lw=1,
                   label="top-1 budget")
    if report.budgets.max_latency_ms is not None:
        ax.axvline(report.budgets.max_latency_ms, color="red", ls="--", lw=1, label="latency budget")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(_tick_label))
    ax.xaxis.set_minor_formatter(FuncFormatter(_tick_label))
    ax.set_xlabel("latency ms (batch 1, p50, on the runtime that really ran; log scale)")
    ax.set_ylabel("test top-1 per clip (%)")
    ax.set_title(f"marker area in proportion to artifact size (largest {biggest / 1e6:.2f} MB); hollow: misses "
                 "a budget", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    legend = ax.legend(fontsize=8, loc="best")
    for text in legend.get_texts():
        text.set_parse_math(False)
    for handle in legend.legend_handles:  # one marker size in the legend, whatever the first point's size
        if hasattr(handle, "set_sizes"):
            handle.set_sizes([40])


# ---- HTML, text, JSON -------------------------------------------------------------------------------------------

def _html_table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
         "margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left;"
         "vertical-align:top}th{background:#f3f3f3}.estimate{background:#fff6d5;border-left:4px solid #e0a800;"
         "padding:0.5em 1em}img{max-width:100%}")


def render_html(report: Report, png: bytes) -> str:
    best_labels = {c["variant"] for c in report.best.values() if c["variant"]}
    e = html.escape
    meta = "; ".join(f"{k}: {v}" for k, v in report.context.items())
    profiles = [[t, p.device, f"{p.watts:g}", f"{p.usd_per_hour:g}"]
                for t, p in ((t, getattr(report.profiles, t)) for t in type(report.profiles).model_fields)]
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8"><title>vidopt run report</title>',
        f"<style>{STYLE}</style></head><body>", "<h1>vidopt run report</h1>", f"<p>{e(meta)}</p>",
        f"<p><b>Budgets</b>: {e(budget_text(report.budgets, report.teacher_top1))}</p>",
        "<h2>Best variant per target</h2>", f'<p class="estimate">{e(ESTIMATE_NOTE)}</p>',
        _html_table(BEST_HEADERS, [_best_cells(report, t.target) for t in report.targets]),
        "<h2>Pareto plot: top-1 vs latency</h2>",
        f'<img alt="Pareto plot: test top-1 vs latency per variant and target" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">',
        "<h2>Every variant on every target</h2>",
        "<p>front: on the Pareto front over all points (top-1 up, latency down). Only rows with a top-1 and a "
        "latency are plotted. Estimates are labelled as such; see the note above.</p>",
        _html_table(POINT_HEADERS, [_point_cells(p, best_labels) for p in report.points]),
        "<h2>Targets</h2>", _html_table(TARGET_HEADERS, [_target_cells(t) for t in report.targets]),
        "<h2>Compression ladder</h2>",
        _html_table(LADDER_HEADERS, [_ladder_cells(r, a) for r, a in report.ladder.items()]),
        "<h2>How sure: 95% intervals and paired tests on the same test videos</h2>",
        "<p>A difference between two rungs means something only where McNemar's test on the videos one got right "
        "and the other wrong says so (p &lt; 0.05).</p>",
        _html_table(STATS_HEADERS, _stats_rows(report)), _confusion_html(report),
        *(["<h2>Registry</h2>", _html_table(REGISTRY_HEADERS, _registry_rows(report))] if report.registry else []),
        *([f"<h2>{e(_crossval_title(report))}</h2>", _html_table(CROSSVAL_HEADERS, _crossval_rows(report))]
          if report.crossval else []),
        "<h2>Target profiles behind the estimates</h2>", f'<p class="estimate">{e(ESTIMATE_NOTE)}</p>',
        _html_table(["target", "device", "watts", "USD / hour"], profiles),
        "</body></html>", ""])


def _text_table(headers: list[str], rows: list[list[str]], max_cell: int = 110) -> list[str]:
    rows = [[_short(c, max_cell) for c in row] for row in rows]  # the HTML has every character
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [headers, *rows]]


def render_table(report: Report) -> str:
    """The terminal's view: every point, then the best per target with its estimates."""
    best_labels = {c["variant"] for c in report.best.values() if c["variant"]}
    lines = [f"!! {h}" for h in (report.verdicts.headlines if report.verdicts else [])]
    if _stats_rows(report):
        lines += ["Test top-1 with 95% intervals; paired tests on the same videos (McNemar)"]
        lines += _text_table(STATS_HEADERS, _stats_rows(report)) + [""]
    if report.crossval:
        lines += [_crossval_title(report)] + _text_table(CROSSVAL_HEADERS, _crossval_rows(report)) + [""]
    lines += ["Every variant on every target (front: Pareto front; top-1 vs latency)"]
    lines += _text_table(POINT_HEADERS, [_point_cells(p, best_labels) for p in report.points])
    lines += ["", f"Best variant per target. Budgets: {budget_text(report.budgets, report.teacher_top1)}"]
    lines += _text_table(BEST_HEADERS, [_best_cells(report, t.target) for t in report.targets])
    if report.registry:
        lines += ["", "Registry"] + _text_table(REGISTRY_HEADERS[:4], [r[:4] for r in _registry_rows(report)])
    return "\n".join(lines + ["", ESTIMATE_NOTE]) + "\n"


def rows_json(report: Report) -> dict:
    return {"points": [{**asdict(p), "label": p.label, "plotted": p.plotted} for p in report.points],
            "best": report.best, "teacher_top1": report.teacher_top1,
            "budgets": report.budgets.model_dump(), "profiles": report.profiles.model_dump(),
            "targets": [t.model_dump(include={"target", "status", "reason", "runtime", "top1", "latency_ms",
                                              "artifact_bytes", "parity"}) for t in report.targets],
            "estimate_note": ESTIMATE_NOTE, "context": report.context,
            "statistics": [asdict(r) for r in report.verdicts.rungs] if report.verdicts else [],
            "headlines": report.verdicts.headlines if report.verdicts else [],
            "confusion": {"classes": report.classes, "matrix": report.verdicts.confusion if report.verdicts else [],
                          "recall": report.verdicts.recall if report.verdicts else []},
            "registry": report.registry,
            "crossval": report.crossval.model_dump() if report.crossval else None}


def write_report(report: Report, out_dir: Path) -> dict[str, Path]:
    """report.html (plot embedded), pareto.png, rows.json, report.txt in `out_dir`, each written atomically."""
    paths = {kind: out_dir / name for kind, name in FILES.items()}
    png = pareto_png(report)
    with atomic_path(paths["plot"]) as tmp:
        tmp.write_bytes(png)
    atomic_write_text(paths["rows"], json.dumps(rows_json(report), indent=2))
    atomic_write_text(paths["table"], render_table(report))
    atomic_write_text(paths["html"], render_html(report, png))
    v = report.verdicts
    if v is not None and v.confusion and len(report.classes) == len(v.confusion):
        with atomic_path(out_dir / CONFUSION_FILE) as tmp:
            tmp.write_bytes(confusion_png(v.confusion, report.classes, f"{v.rungs[-1].rung}: test videos"))
    return paths


def terminal_summary(record, store) -> tuple[str, str]:
    """(the report's text table, the HTML report's URI) of a ReportArtifact or its model_dump(): what `vidopt run`
    prints at the end; `store` is the run's artifact store, which holds the files."""
    fields = record if isinstance(record, dict) else record.model_dump()
    return store.read_text(fields["table_uri"]), fields["html_uri"]
