"""The speed/size ladder on onnxruntime CPU: teacher fp32 -> student fp32 -> pruned fp32 -> pruned int8.

    python -m vidopt.bench.ladder [--arch student/arch.json] [--project-dir .vidopt] [--out DIR]

(a) Full size, always: torchvision's r2plus1d_18 (width 1.0) fp32 against the student architecture int8, both at
    16x112x112, batch 1, 1 thread. Random weights: latency and file size depend on shapes, not on weight values, so this
    needs no training, and it says nothing about accuracy. The project's bars: >= 100x faster, >= 100x smaller.
(b) With --project-dir of a finished run: the trained models side by side (params, size, GMACs, p50/p95 at batch 1 and
    throughput at batch 8 with 1 and 2 threads, test top-1 from each model dir's metrics.json), and the compression
    bars (TRAINED_BARS) each marked met or not. One more row, the pruned model in fp32 reading the same uint8 pixels
    as its int8 file (normalisation folded into the stem, a Cast where the pixels enter), gives int8's speed-up on
    the same input, reported beside the bar and not judged: the bar's baseline is fp32's fastest form, on
    normalised float input whose normalisation its client does untimed.
Every latency is measured interleaved across the models compared and is the median over rounds: the machine is noisy.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch

from vidopt.bench import write_report
from vidopt.checkpoint import load_model_dir
from vidopt.config import DistillConfig
from vidopt.metrics import count_macs, count_params
from vidopt.models import StudentArch, TeacherArch, arch_from_dict, build_model
from vidopt.onnx_utils import INT8_FILE, compare_latency, export_onnx, file_mb, quantize_model_int8
from vidopt.storage import atomic_path

log = logging.getLogger("vidopt.bench.ladder")
FULL_SIZE_INPUT, FULL_SIZE_CLASSES = (16, 112, 112), 400  # T, H, W and classes of the published r2plus1d_18
BARS = {"speedup": 100.0, "size_ratio": 100.0}  # the project's goal: teacher fp32 vs deployed student int8
# The trained ladder's bars (batch 1, the first thread count; top-1 losses in points of the test split):
# (rung, baseline, measure, bar, higher is better)
TRAINED_BARS = [("pruned fp32", "student fp32", "speedup", 1.7, True),
                ("pruned fp32", "student fp32", "top1_loss_points", 1.0, False),
                ("pruned int8", "pruned fp32", "speedup", 2.0, True),
                ("pruned int8", "teacher fp32", "speedup", 10.0, True),
                ("pruned int8", "teacher fp32", "top1_loss_points", 2.0, False),
                ("pruned int8", "pruned fp32 uint8-in", "speedup", None, True)]  # no bar: the same input
MIN_SECONDS = 0.25  # (b): each measurement times calls for at least this long (~600 of a 0.4 ms student)
FULL_SIZE_NOTE = ("full-size architectures with random weights: latency and size only (they do not depend on weight "
                  "values); int8 calibrated on random clips; no accuracy")
STAGES = [  # (row name, stage folder, file run by onnxruntime: exported from the weights, or the stage's own int8,
    #          export_onnx options for an exported student)
    ("teacher fp32", "train_teacher", None, {}),
    ("student fp32", "distill", None, {}),
    ("pruned fp32", "prune", None, {}),
    ("pruned fp32 uint8-in", "prune", None, {"pixel_input": True}),
    ("pruned int8", "quantize", INT8_FILE, {}),
]


def _random_clips(shape, batches: int, batch: int = 4) -> list[torch.Tensor]:
    """Random uint8 clips [B, T, H, W, C] as stored (`shape` = [C, T, H, W]), for calibration."""
    generator = torch.Generator().manual_seed(0)
    c, t, h, w = shape
    return [torch.randint(0, 256, (batch, t, h, w, c), generator=generator, dtype=torch.uint8) for _ in range(batches)]


def full_size_ladder(student: StudentArch, teacher: TeacherArch, work: Path, rounds: int = 3,
                     iters: int = 3) -> dict:
    """(a): teacher fp32, student fp32 and student int8 at the student's input size, batch 1, 1 thread."""
    shape = (3, student.frames, student.height, student.width)  # [C, T, H, W]
    torch.manual_seed(0)
    models = {"teacher fp32": build_model(teacher), "student fp32": build_model(student)}
    log.info("ladder (a): exporting and quantizing at %s", "x".join(map(str, shape[1:])))
    paths = {name: export_onnx(m, shape, work / f"full_{name.replace(' ', '_')}.onnx") for name, m in models.items()}
    paths["student int8"] = quantize_model_int8(models["student fp32"], shape, work / "full_student_int8.onnx",
                                                _random_clips(shape, batches=2))
    log.info("ladder (a): timing %d models, %d rounds", len(paths), rounds)
    latency = compare_latency(paths, shape, batch=1, threads=1, rounds=rounds, warmup=1, iters=iters)
    rows = {name: {"params": count_params(models[name.replace("int8", "fp32")]),
                   "gmacs": count_macs(models[name.replace("int8", "fp32")], shape) / 1e9,
                   "size_mb": file_mb(path), **latency[name]} for name, path in paths.items()}
    teacher_row, int8_row = rows["teacher fp32"], rows["student int8"]
    speedup = teacher_row["p50_ms"] / int8_row["p50_ms"]
    size_ratio = teacher_row["size_mb"] / int8_row["size_mb"]
    return {"note": FULL_SIZE_NOTE, "input": list(shape), "batch": 1, "threads": 1,
            "teacher": teacher.model_dump(), "student": student.model_dump(), "rows": rows,
            "speedup": speedup, "size_ratio": size_ratio,
            "meets_bars": {"speedup": speedup >= BARS["speedup"], "size_ratio": size_ratio >= BARS["size_ratio"]}}


def find_model_dir(project: Path, stage: str, seed: int | None = None) -> Path | None:
    """The newest finished model dir of a stage (a model dir is written whole by a rename, arch.json inside), of the
    runs with `seed` (run.seed in its config.json) where given. A project dir holding runs of one seed with different
    settings mixes their newest models: each row records the model dir it used."""
    found = sorted((project / "stages" / stage).glob("*/model/arch.json"), key=lambda p: p.stat().st_mtime)
    found = [p.parent for p in found if seed is None or _run_seed(p.parent) == seed]
    return found[-1] if found else None


def _run_seed(model_dir: Path) -> int | None:
    return json.loads((model_dir / "config.json").read_text()).get("run", {}).get("seed")


def trained_ladder(project: Path, work: Path, threads: list[int], rounds: int = 5, iters: int = 10) -> dict:
    """(b): every stage's model of a finished run, at the clip size the run used: the run of the newest int8 model's
    seed (a project that ran seeds 0 and 2 compared seed 2's teacher with seed 0's int8 before)."""
    final = find_model_dir(project, "quantize")
    seed = None if final is None else _run_seed(final)
    found = {name: (stage, file, options, find_model_dir(project, stage, seed))
             for name, stage, file, options in STAGES}
    missing = [f"{name} ({stage})" for name, (stage, _, _, d) in found.items() if d is None]
    present = {name: (file, options, d) for name, (_, file, options, d) in found.items() if d is not None}
    if not present:
        raise SystemExit(f"bench.ladder: no model dirs under {project}/stages/*/*/model; run the pipeline first")
    clips = json.loads((next(iter(present.values()))[2] / "config.json").read_text())["clips"]
    shape = (3, clips["frames"], clips["height"], clips["width"])  # every stage of one run sees the same clips
    rows, paths = {}, {}
    for name, (file, options, model_dir) in present.items():
        model, _ = load_model_dir(model_dir)
        paths[name] = (model_dir / file if file else
                       export_onnx(model, shape, work / f"{name.replace(' ', '_')}.onnx", **options))
        metrics = json.loads((model_dir / "metrics.json").read_text())
        rows[name] = {"model_dir": str(model_dir), "params": count_params(model),
                      "gmacs": count_macs(model, shape) / 1e9, "size_mb": file_mb(paths[name]),
                      **{k: metrics.get(k) for k in ("test_top1_clip", "test_top1_video")}}
    for n in threads:
        log.info("ladder (b): timing %d models at %d thread(s), batch 1 and 8, %d rounds", len(paths), n, rounds)
        single = compare_latency(paths, shape, batch=1, threads=n, rounds=rounds, iters=iters, min_seconds=MIN_SECONDS)
        batched = compare_latency(paths, shape, batch=8, threads=n, rounds=rounds, iters=max(2, iters // 2),
                                  min_seconds=MIN_SECONDS)
        for name in rows:
            rows[name].update({f"p50_ms.t{n}": single[name]["p50_ms"], f"p95_ms.t{n}": single[name]["p95_ms"],
                               f"best_p50_ms.t{n}": single[name]["best_p50_ms"],
                               f"b8_clips_s.t{n}": batched[name]["throughput_clips_s"]})
    teacher = rows.get("teacher fp32")
    for row in rows.values():  # how far each rung is from the teacher (batch 1, first thread count)
        row["vs_teacher"] = None if teacher is None else {
            "speedup": teacher[f"p50_ms.t{threads[0]}"] / row[f"p50_ms.t{threads[0]}"],
            "size_ratio": teacher["size_mb"] / row["size_mb"]}
    return {"project": str(project), "input": list(shape), "threads": threads, "rows": rows, "missing": missing,
            "bars": trained_bars(rows, threads[0])}


def trained_bars(rows: dict, threads: int) -> list[dict]:
    """Each TRAINED_BARS entry whose two rows were measured: the value, the bar and whether it is met. A speed-up is
    judged on the median rounds (what the machine typically gave); `quietest` is the same ratio of each model's best
    round (compare_latency: on a shared machine a neighbour slows models unevenly), reported beside it, never judged.
    An entry without a bar is reported with `met` None."""
    out = []
    for rung, base, measure, bar, higher in TRAINED_BARS:
        if rung not in rows or base not in rows:
            continue
        r, b, extra = rows[rung], rows[base], {}
        if measure == "speedup":
            value = b[f"p50_ms.t{threads}"] / r[f"p50_ms.t{threads}"]
            extra = {"quietest": b[f"best_p50_ms.t{threads}"] / r[f"best_p50_ms.t{threads}"]}
        elif r["test_top1_clip"] is None or b["test_top1_clip"] is None:
            continue
        else:
            value = 100 * (b["test_top1_clip"] - r["test_top1_clip"])
        met = None if bar is None else value >= bar if higher else value <= bar
        out.append({"rung": rung, "baseline": base, "measure": measure, "value": value, "bar": bar, "met": met,
                    **extra})
    return out


def markdown(report: dict) -> str:
    lines = []
    full = report.get("full_size")
    if full:
        widths = f"{full['student']['conv_widths']} / {full['student']['temporal_widths']}"
        lines += [f"## (a) Full size at {'x'.join(map(str, full['input'][1:]))}, batch 1, 1 thread",
                  f"_{full['note']}; student widths {widths}._", "",
                  "| model | params | GMACs | size MB | p50 ms | p95 ms |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {name} | {r['params']:,} | {r['gmacs']:.3f} | {r['size_mb']:.2f} | {r['p50_ms']:.2f} | "
                  f"{r['p95_ms']:.2f} |" for name, r in full["rows"].items()]
        bars = full["meets_bars"]
        lines += ["", f"teacher fp32 / student int8: **{full['speedup']:.0f}x faster** "
                      f"({'meets' if bars['speedup'] else 'misses'} the {BARS['speedup']:.0f}x bar), "
                      f"**{full['size_ratio']:.0f}x smaller** "
                      f"({'meets' if bars['size_ratio'] else 'misses'} the {BARS['size_ratio']:.0f}x bar)", ""]
    trained = report.get("trained")
    if trained:
        t = trained["threads"]
        head = ["model", "params", "GMACs", "size MB", "test top-1 clip / video", f"vs teacher ({t[0]} thr)"]
        head += [f"{k} ({n} thr)" for n in t for k in ("p50 ms", "p95 ms", "b8 clips/s")]
        lines += [f"## (b) Trained ladder: {trained['project']}, input {'x'.join(map(str, trained['input'][1:]))}",
                  "", "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
        for name, r in trained["rows"].items():
            acc = " / ".join("n/a" if r[k] is None else f"{r[k]:.3f}" for k in ("test_top1_clip", "test_top1_video"))
            vs = r["vs_teacher"]
            ratio = "n/a" if vs is None else f"{vs['speedup']:.1f}x faster, {vs['size_ratio']:.1f}x smaller"
            cells = [name, f"{r['params']:,}", f"{r['gmacs']:.4f}", f"{r['size_mb']:.3f}", acc, ratio]
            cells += [f"{r[f'{k}.t{n}']:.2f}" for n in t for k in ("p50_ms", "p95_ms", "b8_clips_s")]
            lines.append("| " + " | ".join(cells) + " |")
        if trained["missing"]:
            lines += ["", f"not found: {', '.join(trained['missing'])}"]
        lines.append("")
        for bar in trained["bars"]:
            quiet = f"; {bar['quietest']:.2f}x between each model's quietest rounds" if "quietest" in bar else ""
            if bar["bar"] is None:
                lines.append(f"- {bar['rung']} vs {bar['baseline']}: {bar['value']:.2f}x faster (the same uint8 input; "
                             f"no bar){quiet}")
                continue
            what = (f"{bar['value']:.2f}x faster (bar >= {bar['bar']:g}x" if bar["measure"] == "speedup" else
                    f"test top-1 {-bar['value']:+.2f} points (bar: at most {bar['bar']:g} lost")
            lines.append(f"- {bar['rung']} vs {bar['baseline']}: {what}, {'met' if bar['met'] else 'NOT met'}){quiet}")
    return "\n".join(lines) + "\n"


def ladder_png(trained: dict) -> bytes:
    """The trained ladder at a glance: p50 latency per rung (log scale, batch 1, first thread count) beside its test
    top-1, the teacher's top-1 as a line. Agg canvas, no pyplot state."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names, rows, threads = list(trained["rows"]), trained["rows"], trained["threads"][0]
    fig = Figure(figsize=(10, 3.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    speed, accuracy = fig.subplots(1, 2)
    latency = [rows[n][f"p50_ms.t{threads}"] for n in names]
    bars = speed.barh(names, latency, color="#1f77b4")
    speed.bar_label(bars, labels=[f"{v:.2f} ms" for v in latency], padding=3, fontsize=8)
    speed.set_xscale("log")
    speed.set_xlim(min(latency) / 2, max(latency) * 4)
    speed.invert_yaxis()
    speed.set_xlabel(f"p50 latency, batch 1, {threads} thread(s), onnxruntime CPU (log scale)")
    top1 = [100 * (rows[n]["test_top1_clip"] or 0) for n in names]
    bars = accuracy.barh(names, top1, color="#2ca02c")
    accuracy.bar_label(bars, labels=[f"{v:.1f}%" if rows[n]["test_top1_clip"] is not None else "n/a"
                                     for v, n in zip(top1, names)], padding=3, fontsize=8)
    accuracy.set_xlim(max(0.0, min(top1) - 10), 100)
    accuracy.invert_yaxis()
    accuracy.set_yticklabels([])
    accuracy.set_xlabel("test top-1 per clip (%)")
    teacher = rows.get("teacher fp32", {}).get("test_top1_clip")
    if teacher is not None:
        accuracy.axvline(100 * teacher, color="grey", ls=":", lw=1, label="teacher")
        accuracy.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"trained ladder, input {'x'.join(map(str, trained['input'][1:]))}", fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def full_size_student(arch_file: Path | None, project: Path | None) -> StudentArch:
    """(a)'s student: `arch_file`, else the final (quantize stage) student of `project`, else the pipeline's default
    student (DistillConfig's architecture) at StudentArch's full size."""
    final = find_model_dir(project.resolve(), "quantize") if project and arch_file is None else None
    arch_file = arch_file or (final / "arch.json" if final else None)
    student = arch_from_dict(json.loads(arch_file.read_text())) if arch_file else \
        StudentArch(**DistillConfig().architecture())
    if student.kind != "student":
        raise SystemExit(f"bench.ladder: {arch_file} describes a {student.kind}, not a student")
    return student


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="vidopt bench ladder", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=Path, help="student arch.json for (a); its widths are used at 16x112x112 with "
                        "400 classes (default: the final student of --project-dir, else the pipeline's default student)")
    parser.add_argument("--project-dir", type=Path, help="a finished run's project dir: adds the trained ladder (b)")
    parser.add_argument("--out", type=Path, default=Path(".vidopt/bench/ladder"),
                        help="writes ladder.json, ladder.md (and ladder.png with --project-dir)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="(b) onnxruntime intra-op threads")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians over rounds")
    parser.add_argument("--iters", type=int, default=3, help="timed runs per model per round")
    parser.add_argument("--no-full-size", action="store_true", help="skip (a)")
    # Smoke-test knobs: (a) only means something at the defaults (width 1.0, 16x112x112).
    parser.add_argument("--teacher-width", type=float, default=1.0)
    parser.add_argument("--shape", type=int, nargs=3, metavar=("T", "H", "W"), help="override the student's T H W")
    args = parser.parse_args(argv)

    report: dict = {}
    with tempfile.TemporaryDirectory(prefix="vidopt-ladder-") as tmp:
        work = Path(tmp)
        if not args.no_full_size:
            student = full_size_student(args.arch, args.project_dir)
            # A trained arch.json keeps its widths; input and classes become Kinetics-400's, like the teacher's.
            size = dict(zip(("frames", "height", "width"), args.shape or FULL_SIZE_INPUT))
            student = student.model_copy(update={**size, "num_classes": FULL_SIZE_CLASSES})
            teacher = TeacherArch(arch="r2plus1d_18", width=args.teacher_width, num_classes=student.num_classes)
            report["full_size"] = full_size_ladder(student, teacher, work, args.rounds, args.iters)
        if args.project_dir:
            report["trained"] = trained_ladder(args.project_dir.resolve(), work, args.threads, args.rounds,
                                               max(args.iters, 5))
    if "trained" in report:
        with atomic_path(args.out / "ladder.png") as tmp:
            tmp.write_bytes(ladder_png(report["trained"]))
    write_report(args.out, "ladder", report, markdown(report))
    return report


if __name__ == "__main__":
    main()
