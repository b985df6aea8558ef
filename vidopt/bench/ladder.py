"""The speed/size ladder on every CPU runtime here: teacher fp32 -> student fp32 -> pruned fp32 -> pruned int8.

    python -m vidopt.bench.ladder [--arch student/arch.json] [--project-dir .vidopt] [--out DIR]

Every model's file (fp32, or int8 QDQ) runs on every runtime vidopt.runtimes finds on this machine (onnxruntime;
OpenVINO f32 and with its bf16 hint). A model's time is that of its fastest runtime (ranked by the quietest round), and
every comparison, bars and headline included, sets fastest against fastest and names both runtimes; the teacher-vs-
student ratio with both on onnxruntime is reported beside the headline, labelled. Per model and runtime: achieved GMAC/s
(MACs / p50) and its share of this CPU's peak at the precision that runtime computes in (vidopt/hardware.py).
(a) Full size, always: torchvision's r2plus1d_18 (width 1.0) fp32 against the student architecture in fp32 and int8,
    at 16x112x112, batch 1, 1 thread. Random weights: latency and file size depend on shapes, not on weight values, so
    this needs no training, and it says nothing about accuracy. The project's bars: >= 100x faster, >= 100x smaller.
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

from vidopt import hardware
from vidopt.bench import write_report
from vidopt.checkpoint import load_model_dir
from vidopt.config import DistillConfig
from vidopt.metrics import CONV_TYPES, count_macs, count_params
from vidopt.models import StudentArch, TeacherArch, arch_from_dict, build_model
from vidopt.onnx_utils import INT8_FILE, export_onnx, file_mb, int8_form_files, quantize_model_int8
from vidopt.runtimes import available, compare, version
from vidopt.storage import atomic_path

log = logging.getLogger("vidopt.bench.ladder")
FULL_SIZE_INPUT, FULL_SIZE_CLASSES = (16, 112, 112), 400  # T, H, W and classes of the published r2plus1d_18
BARS = {"speedup": 100.0, "size_ratio": 100.0}  # the goal: teacher fp32 vs deployed student int8, each on its fastest
# The trained ladder's bars (batch 1, the first thread count, each model on its fastest runtime; top-1 losses in
# points of the test split):
# (rung, baseline, measure, bar, higher is better)
TRAINED_BARS = [("pruned fp32", "student fp32", "speedup", 1.7, True),
                ("pruned fp32", "student fp32", "top1_loss_points", 1.0, False),
                ("pruned int8", "pruned fp32", "speedup", 2.0, True),
                ("pruned int8", "teacher fp32", "speedup", 10.0, True),
                ("pruned int8", "teacher fp32", "top1_loss_points", 2.0, False),
                ("pruned int8", "pruned fp32 uint8-in", "speedup", None, True)]  # no bar: the same input
MIN_SECONDS = 0.25  # each measurement times calls for at least this long (~600 of a 0.4 ms student)
FULL_SIZE_NOTE = ("full-size architectures with random weights: latency and size only (they do not depend on weight "
                  "values); int8 calibrated on random clips; no accuracy")
STAGES = [  # (row name, stage folder, file timed: exported from the weights, or the stage's own int8,
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


def runtime_precision(runtime: str, quantized: bool) -> str:
    """The precision a file's MACs run in: a QDQ file's convs in int8 on every runtime, an fp32 file's in bf16 under
    OpenVINO's bf16 hint, else in fp32."""
    return "int8" if quantized else "bf16" if runtime == "openvino-bf16" else "fp32"


def time_everywhere(paths: dict[str, Path], runtimes: list[str], shape, batch: int, threads: int, rounds: int,
                    warmup: int, iters: int, min_seconds: float) -> dict[str, dict[str, dict]]:
    """Every file on every runtime, interleaved (a slow spell hits all alike): {model: {runtime: stats}}."""
    pairs = {f"{name} @ {runtime}": (name, runtime) for name in paths for runtime in runtimes}
    timed = compare({key: (runtime, paths[name]) for key, (name, runtime) in pairs.items()}, shape, batch=batch,
                    threads=threads, rounds=rounds, warmup=warmup, iters=iters, min_seconds=min_seconds)
    out: dict[str, dict[str, dict]] = {name: {} for name in paths}
    for key, (name, runtime) in pairs.items():
        out[name][runtime] = timed[key]
    return out


def add_timings(row: dict, timed: dict[str, dict], threads: int, machine: dict, suffix: str = "",
                batched: dict[str, dict] | None = None) -> None:
    """`row` gains, per runtime, its timings at `threads` (keys ending in `suffix`), achieved GMAC/s and peak share,
    then `fastest<suffix>`, the runtime of its quietest round, whose timings become the row's own."""
    for runtime, stats in timed.items():
        share = hardware.peak_share(row["gmacs"], stats["p50_ms"], runtime_precision(runtime, row["quantized"]),
                                    threads, machine)
        cell = row["runtimes"].setdefault(runtime, {"precision": share["precision"], "unit": share["unit"]})
        cell.update({f"{k}{suffix}": stats[k] for k in ("p50_ms", "p95_ms", "best_p50_ms")})
        cell.update({f"gmac_s{suffix}": share["gmac_s"], f"peak_share{suffix}": share["peak_share"]})
        if batched is not None:
            cell[f"b8_clips_s{suffix}"] = batched[runtime]["throughput_clips_s"]
    best = min(timed, key=lambda runtime: timed[runtime]["best_p50_ms"])
    row[f"fastest{suffix}"] = best
    row.update({key: value for key, value in row["runtimes"][best].items()
                if key in {f"{k}{suffix}" for k in ("p50_ms", "p95_ms", "best_p50_ms", "b8_clips_s")}})


def model_row(model, shape, path: Path, quantized: bool) -> dict:
    layers = sum(isinstance(m, (*CONV_TYPES, torch.nn.Linear)) for m in model.modules())
    return {"params": count_params(model), "gmacs": count_macs(model, shape) / 1e9, "layers": layers,
            "size_mb": file_mb(path), "quantized": quantized, "runtimes": {}}


def headline(rows: dict, teacher: str, student: str, suffix: str = "") -> dict | None:
    """The shipped student on its fastest runtime against the teacher on the teacher's fastest, and the same two files
    both on onnxruntime (labelled as such wherever shown)."""
    if teacher not in rows or student not in rows:
        return None
    t, s = rows[teacher], rows[student]
    ort = {name: r["runtimes"]["onnxruntime"][f"p50_ms{suffix}"] for name, r in ((teacher, t), (student, s))}
    return {"teacher": teacher, "student": student, "teacher_runtime": t[f"fastest{suffix}"],
            "student_runtime": s[f"fastest{suffix}"], "speedup": t[f"p50_ms{suffix}"] / s[f"p50_ms{suffix}"],
            "quietest": t[f"best_p50_ms{suffix}"] / s[f"best_p50_ms{suffix}"],
            "onnxruntime_only": ort[teacher] / ort[student]}


def precision_verdict(rows: dict, fp32: str, int8: str, teacher: str, suffix: str = "") -> dict | None:
    """int8 or bf16 for a student on this machine: its int8 file on that file's fastest runtime against its fp32 file
    under the bf16 hint, each with its share of its precision's peak; the teacher's share under the bf16 hint shows
    what large layers reach on the same unit. None without the bf16 hint."""
    bf16 = rows.get(fp32, {}).get("runtimes", {}).get("openvino-bf16")
    if bf16 is None or int8 not in rows:
        return None
    int8_runtime = rows[int8][f"fastest{suffix}"]
    q = rows[int8]["runtimes"][int8_runtime]
    teacher_row = rows.get(teacher, {})
    teacher_bf16 = teacher_row.get("runtimes", {}).get("openvino-bf16", {})
    peaks = [c[f"gmac_s{suffix}"] / c[f"peak_share{suffix}"] if c[f"peak_share{suffix}"] else None for c in (q, bf16)]
    return {"fp32": fp32, "int8": int8, "int8_runtime": int8_runtime, "int8_p50_ms": q[f"p50_ms{suffix}"],
            "int8_share": q[f"peak_share{suffix}"], "int8_unit": q["unit"], "bf16_p50_ms": bf16[f"p50_ms{suffix}"],
            "bf16_share": bf16[f"peak_share{suffix}"], "bf16_unit": bf16["unit"],
            "winner": "int8" if q[f"p50_ms{suffix}"] < bf16[f"p50_ms{suffix}"] else "bf16",
            "peak_ratio": peaks[0] / peaks[1] if None not in peaks else None,
            "teacher_bf16_share": teacher_bf16.get(f"peak_share{suffix}"),
            "mmacs_per_layer": 1e3 * rows[fp32]["gmacs"] / rows[fp32]["layers"],
            "teacher_mmacs_per_layer": 1e3 * teacher_row["gmacs"] / teacher_row["layers"] if teacher_row else None}


def full_size_ladder(student: StudentArch, teacher: TeacherArch, work: Path, machine: dict, rounds: int = 3,
                     iters: int = 3) -> dict:
    """(a): teacher fp32, student fp32 and student int8 at the student's input size, batch 1, 1 thread, each on every
    runtime (the int8 student: every int8 form, each runtime's cell its fastest, as the CPU target ranks them); the
    headline and the bars set the student int8's fastest runtime against the teacher's fastest."""
    shape = (3, student.frames, student.height, student.width)  # [C, T, H, W]
    torch.manual_seed(0)
    models = {"teacher fp32": build_model(teacher), "student fp32": build_model(student)}
    log.info("ladder (a): exporting and quantizing at %s", "x".join(map(str, shape[1:])))
    paths = {name: export_onnx(m, shape, work / f"full_{name.replace(' ', '_')}.onnx") for name, m in models.items()}
    forms_dir = work / "full_student_int8_forms"
    paths["student int8"] = quantize_model_int8(models["student fp32"], shape, work / "full_student_int8.onnx",
                                                _random_clips(shape, batches=2), forms_dir=forms_dir)
    # As the CPU target ships: every int8 form on every runtime, each runtime's cell its fastest form
    kept = int8_form_files(forms_dir)
    form_of = {f"student int8 [{name}]": name for name in kept}   # a row name per form -> the form's name
    forms = {key: kept[name] for key, name in form_of.items()}
    runtimes = available()
    log.info("ladder (a): timing %d files on %s, %d rounds", len(paths) - 1 + len(forms), ", ".join(runtimes), rounds)
    timed = time_everywhere({**{n: p for n, p in paths.items() if n != "student int8"}, **forms}, runtimes, shape,
                            batch=1, threads=1, rounds=rounds, warmup=1, iters=iters, min_seconds=MIN_SECONDS)
    int8_forms = {runtime: min(forms, key=lambda form: timed[form][runtime]["best_p50_ms"]) for runtime in runtimes}
    timed["student int8"] = {runtime: timed[form][runtime] for runtime, form in int8_forms.items()}
    rows = {}
    for name, path in paths.items():
        rows[name] = model_row(models[name.replace("int8", "fp32")], shape, path, quantized=name.endswith("int8"))
        add_timings(rows[name], timed[name], threads=1, machine=machine)
    for runtime, form in int8_forms.items():
        rows["student int8"]["runtimes"][runtime]["int8_form"] = form_of[form]
    head = headline(rows, "teacher fp32", "student int8")
    size_ratio = rows["teacher fp32"]["size_mb"] / rows["student int8"]["size_mb"]
    return {"note": FULL_SIZE_NOTE, "input": list(shape), "batch": 1, "threads": 1,
            "teacher": teacher.model_dump(), "student": student.model_dump(), "rows": rows, "headline": head,
            "speedup": head["speedup"], "size_ratio": size_ratio,
            "meets_bars": {"speedup": head["speedup"] >= BARS["speedup"],
                           "size_ratio": size_ratio >= BARS["size_ratio"]},
            "precision": precision_verdict(rows, "student fp32", "student int8", "teacher fp32")}


def find_model_dir(project: Path, stage: str, seed: int | None = None) -> Path | None:
    """The newest finished model dir of a stage (a model dir is written whole by a rename, arch.json inside), of the
    runs with `seed` (run.seed in its config.json) where given. A project dir holding runs of one seed with different
    settings mixes their newest models: each row records the model dir it used."""
    found = sorted((project / "stages" / stage).glob("*/model/arch.json"), key=lambda p: p.stat().st_mtime)
    found = [p.parent for p in found if seed is None or _run_seed(p.parent) == seed]
    return found[-1] if found else None


def _run_seed(model_dir: Path) -> int | None:
    return json.loads((model_dir / "config.json").read_text()).get("run", {}).get("seed")


def trained_ladder(project: Path, work: Path, threads: list[int], rounds: int = 5, iters: int = 10,
                   machine: dict | None = None) -> dict:
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
        rows[name] = {"model_dir": str(model_dir), **model_row(model, shape, paths[name], quantized=file == INT8_FILE),
                      **{k: metrics.get(k) for k in ("test_top1_clip", "test_top1_video")}}
    runtimes, machine = available(), machine or hardware.describe()
    for n in threads:
        log.info("ladder (b): timing %d models on %s at %d thread(s), batch 1 and 8, %d rounds", len(paths),
                 ", ".join(runtimes), n, rounds)
        single = time_everywhere(paths, runtimes, shape, batch=1, threads=n, rounds=rounds, warmup=3, iters=iters,
                                 min_seconds=MIN_SECONDS)
        batched = time_everywhere(paths, runtimes, shape, batch=8, threads=n, rounds=rounds, warmup=3,
                                  iters=max(2, iters // 2), min_seconds=MIN_SECONDS)
        for name, row in rows.items():  # batch 8's clips/s are the batch-1 fastest runtime's
            add_timings(row, single[name], n, machine, suffix=f".t{n}", batched=batched[name])
    t = f".t{threads[0]}"
    teacher = rows.get("teacher fp32")
    for row in rows.values():  # how far each rung is from the teacher (batch 1, first thread count, fastest runtimes)
        row["vs_teacher"] = None if teacher is None else {
            "speedup": teacher[f"p50_ms{t}"] / row[f"p50_ms{t}"], "size_ratio": teacher["size_mb"] / row["size_mb"]}
    return {"project": str(project), "input": list(shape), "threads": threads, "rows": rows, "missing": missing,
            "bars": trained_bars(rows, threads[0]), "headline": headline(rows, "teacher fp32", "pruned int8", t),
            "precision": precision_verdict(rows, "pruned fp32", "pruned int8", "teacher fp32", t)}


def trained_bars(rows: dict, threads: int) -> list[dict]:
    """Each TRAINED_BARS entry whose two rows were measured: the value, the bar and whether it is met. A speed-up sets
    each model's fastest runtime against the other's (both named) and is judged on the median rounds (what the machine
    typically gave); `quietest` is the same ratio of each model's best round (runtimes.compare: on a shared machine a
    neighbour slows models unevenly), reported beside it, never judged. An entry without a bar has `met` None."""
    out = []
    for rung, base, measure, bar, higher in TRAINED_BARS:
        if rung not in rows or base not in rows:
            continue
        r, b, extra = rows[rung], rows[base], {}
        if measure == "speedup":
            value = b[f"p50_ms.t{threads}"] / r[f"p50_ms.t{threads}"]
            extra = {"quietest": b[f"best_p50_ms.t{threads}"] / r[f"best_p50_ms.t{threads}"],
                     "rung_runtime": r[f"fastest.t{threads}"], "baseline_runtime": b[f"fastest.t{threads}"]}
        elif r["test_top1_clip"] is None or b["test_top1_clip"] is None:
            continue
        else:
            value = 100 * (b["test_top1_clip"] - r["test_top1_clip"])
        met = None if bar is None else value >= bar if higher else value <= bar
        out.append({"rung": rung, "baseline": base, "measure": measure, "value": value, "bar": bar, "met": met,
                    **extra})
    return out


def _share(cell: dict, suffix: str) -> str:
    share = cell[f"peak_share{suffix}"]
    return "no peak known" if share is None else f"{100 * share:.1f}% of {cell['unit']}"


def runtime_table(rows: dict, runtimes: list[str], columns: list[tuple[str, str]]) -> list[str]:
    """Rows = models, columns = runtimes (per (label, key suffix) of `columns`): p50 ms, achieved GMAC/s and its share
    of the peak of the precision that runtime computes in; each model's fastest in bold."""
    head = ["model"] + [f"{runtime}{label}" for label, _ in columns for runtime in runtimes]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name, row in rows.items():
        cells = [name]
        for _, sfx in columns:
            for runtime in runtimes:
                cell = row["runtimes"][runtime]
                text = f"{cell[f'p50_ms{sfx}']:.2f} ms, {cell[f'gmac_s{sfx}']:.3g} GMAC/s, {_share(cell, sfx)}"
                cells.append(f"**{text}**" if row[f"fastest{sfx}"] == runtime else text)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def headline_lines(head: dict, bar: float | None = None, size: tuple[float, float] | None = None) -> list[str]:
    judged = "" if bar is None else f" ({'meets' if head['speedup'] >= bar else 'misses'} the {bar:g}x bar)"
    smaller = "" if size is None else (f", **{size[0]:.0f}x smaller** ({'meets' if size[0] >= size[1] else 'misses'} "
                                       f"the {size[1]:g}x bar)")
    return [f"headline: {head['student']} on {head['student_runtime']} vs {head['teacher']} on "
            f"{head['teacher_runtime']}, each on its fastest runtime: **{head['speedup']:.1f}x faster**{judged}"
            f"{smaller}; {head['quietest']:.1f}x between each one's quietest rounds", "",
            f"onnxruntime only ({head['student']} and {head['teacher']} both on onnxruntime, not the bar's baseline): "
            f"{head['onnxruntime_only']:.1f}x faster", ""]


def precision_lines(v: dict | None) -> list[str]:
    """int8 or bf16 for the student, from the measured times and shares of peak."""
    if v is None:
        return []
    int8, bf16, teacher = (f"{100 * share:.1f}%" if share is not None else "an unknown share"
                           for share in (v["int8_share"], v["bf16_share"], v["teacher_bf16_share"]))
    ratio = max(v["int8_p50_ms"], v["bf16_p50_ms"]) / min(v["int8_p50_ms"], v["bf16_p50_ms"])
    per_layer = v["teacher_mmacs_per_layer"]
    text = (f"**int8 or bf16 on this CPU?** {v['winner']} wins for the student, {ratio:.2f}x: {v['int8']} on "
            f"{v['int8_runtime']} {v['int8_p50_ms']:.2f} ms, {v['fp32']} under the bf16 hint "
            f"{v['bf16_p50_ms']:.2f} ms. ")
    if v["peak_ratio"] is not None:
        text += f"The {v['int8_unit']} peak is {v['peak_ratio']:.1f}x the {v['bf16_unit']} peak; "
    text += (f"int8 reaches {int8} of its peak, bf16 {bf16} of its own (the teacher under the bf16 hint: {teacher}). "
             f"The student's conv and linear layers average {v['mmacs_per_layer']:.1f} MMACs"
             + ("" if per_layer is None else f", the teacher's {per_layer:.0f}"))
    if v["teacher_bf16_share"] and max(v["int8_share"] or 0, v["bf16_share"] or 0) < v["teacher_bf16_share"]:
        text += (": too little work per layer to keep the matrix units busy, so most of a call's time is spent "
                 "outside them and the ratio of the peaks does not carry over to the student")
    return [text + ".", ""]


def markdown(report: dict) -> str:
    runtimes = list(report.get("runtimes", {}))
    lines = []
    machine = report.get("machine")
    if machine:
        peaks = ", ".join(f"{p} {v['gmac_s_per_core']:.0f} GMAC/s ({v['unit']}, {v['macs_per_cycle']} MAC/cycle)"
                          for p, v in machine["peaks"].items() if v)
        lines += [f"_{machine['model']}, {machine['cores']} cores at {machine['ghz']:.2f} GHz "
                  f"({machine['clock_source']}); flags {' '.join(machine['flags'])}; peak per core: {peaks}. "
                  f"Runtimes: {', '.join(report['runtimes'].values())}._", ""]
    full = report.get("full_size")
    if full:
        widths = f"{full['student']['conv_widths']} / {full['student']['temporal_widths']}"
        lines += [f"## (a) Full size at {'x'.join(map(str, full['input'][1:]))}, batch 1, 1 thread",
                  f"_{full['note']}; student widths {widths}._", "",
                  "| model | params | GMACs | size MB | fastest runtime | p50 ms | p95 ms |",
                  "|---|---:|---:|---:|---|---:|---:|"]
        lines += [f"| {name} | {r['params']:,} | {r['gmacs']:.3f} | {r['size_mb']:.2f} | {r['fastest']} | "
                  f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} |" for name, r in full["rows"].items()]
        lines += ["", "Per runtime (p50, achieved GMAC/s, share of the peak of the precision it computes in):", ""]
        lines += runtime_table(full["rows"], runtimes, [("", "")]) + [""]
        forms = {runtime: cell.get("int8_form") for runtime, cell in full["rows"]["student int8"]["runtimes"].items()}
        lines += ["student int8, the fastest int8 form on each runtime: "
                  + "; ".join(f"{runtime}: {form}" for runtime, form in forms.items() if form), ""]
        lines += headline_lines(full["headline"], BARS["speedup"], (full["size_ratio"], BARS["size_ratio"]))
        lines += precision_lines(full["precision"])
    trained = report.get("trained")
    if trained:
        t = trained["threads"]
        head = ["model", "params", "GMACs", "size MB", "test top-1 clip / video", f"vs teacher ({t[0]} thr)"]
        head += [f"{k} ({n} thr)" for n in t for k in ("fastest runtime", "p50 ms", "p95 ms", "b8 clips/s")]
        lines += [f"## (b) Trained ladder: {trained['project']}, input {'x'.join(map(str, trained['input'][1:]))}",
                  "", "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
        for name, r in trained["rows"].items():
            acc = " / ".join("n/a" if r[k] is None else f"{r[k]:.3f}" for k in ("test_top1_clip", "test_top1_video"))
            vs = r["vs_teacher"]
            ratio = "n/a" if vs is None else f"{vs['speedup']:.1f}x faster, {vs['size_ratio']:.1f}x smaller"
            cells = [name, f"{r['params']:,}", f"{r['gmacs']:.4f}", f"{r['size_mb']:.3f}", acc, ratio]
            for n in t:
                cells += [r[f"fastest.t{n}"]] + [f"{r[f'{k}.t{n}']:.2f}" for k in ("p50_ms", "p95_ms", "b8_clips_s")]
            lines.append("| " + " | ".join(cells) + " |")
        if trained["missing"]:
            lines += ["", f"not found: {', '.join(trained['missing'])}"]
        lines += ["", "Per runtime, batch 1 (p50, achieved GMAC/s, share of the peak of the precision it computes in "
                      "on that many cores):", ""]
        lines += runtime_table(trained["rows"], runtimes, [(f" ({n} thr)", f".t{n}") for n in t]) + [""]
        for bar in trained["bars"]:
            quiet = f"; {bar['quietest']:.2f}x between each model's quietest rounds" if "quietest" in bar else ""
            where = (f"{bar['rung']} on {bar['rung_runtime']}, {bar['baseline']} on {bar['baseline_runtime']}; "
                     if "rung_runtime" in bar else "")
            if bar["bar"] is None:
                lines.append(f"- {bar['rung']} vs {bar['baseline']}: {bar['value']:.2f}x faster ({where}the same "
                             f"uint8 input; no bar){quiet}")
                continue
            what = (f"{bar['value']:.2f}x faster ({where}bar >= {bar['bar']:g}x" if bar["measure"] == "speedup" else
                    f"test top-1 {-bar['value']:+.2f} points (bar: at most {bar['bar']:g} lost")
            lines.append(f"- {bar['rung']} vs {bar['baseline']}: {what}, {'met' if bar['met'] else 'NOT met'}){quiet}")
        lines.append("")
        if trained["headline"]:
            lines += headline_lines(trained["headline"])
        lines += precision_lines(trained["precision"])
    return "\n".join(lines).rstrip("\n") + "\n"


def ladder_png(trained: dict) -> bytes:
    """The trained ladder at a glance: p50 latency per rung on its fastest runtime (log scale, batch 1, first thread
    count; the runtime in the label) beside its test top-1, the teacher's top-1 as a line. Agg canvas, no pyplot."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names, rows, threads = list(trained["rows"]), trained["rows"], trained["threads"][0]
    fig = Figure(figsize=(10, 3.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    speed, accuracy = fig.subplots(1, 2)
    latency = [rows[n][f"p50_ms.t{threads}"] for n in names]
    bars = speed.barh(names, latency, color="#1f77b4")
    speed.bar_label(bars, labels=[f"{v:.2f} ms, {rows[n][f'fastest.t{threads}']}" for v, n in zip(latency, names)],
                    padding=3, fontsize=8)
    speed.set_xscale("log")
    speed.set_xlim(min(latency) / 2, max(latency) * 12)
    speed.invert_yaxis()
    speed.set_xlabel(f"p50 latency, batch 1, {threads} thread(s), each on its fastest CPU runtime (log scale)")
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
                        "400 classes (default: the final student of --project-dir, else the pipeline's default)")
    parser.add_argument("--project-dir", type=Path, help="a finished run's project dir: adds the trained ladder (b)")
    parser.add_argument("--out", type=Path, default=Path(".vidopt/bench/ladder"),
                        help="writes ladder.json, ladder.md (and ladder.png with --project-dir)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="(b) intra-op threads, every runtime")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians over rounds")
    parser.add_argument("--iters", type=int, default=3, help="timed runs per model per round")
    parser.add_argument("--no-full-size", action="store_true", help="skip (a)")
    parser.add_argument("--keep", type=Path, help="keep (a)'s ONNX files in this folder (to profile them: vidopt "
                        "bench ops FILE --runtime openvino)")
    # Smoke-test knobs: (a) only means something at the defaults (width 1.0, 16x112x112).
    parser.add_argument("--teacher-width", type=float, default=1.0)
    parser.add_argument("--shape", type=int, nargs=3, metavar=("T", "H", "W"), help="override the student's T H W")
    args = parser.parse_args(argv)

    machine = hardware.describe()
    report: dict = {"machine": machine, "runtimes": {runtime: version(runtime) for runtime in available()}}
    with tempfile.TemporaryDirectory(prefix="vidopt-ladder-") as tmp:
        work = Path(tmp)
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
        if not args.no_full_size:
            student = full_size_student(args.arch, args.project_dir)
            # A trained arch.json keeps its widths; input and classes become Kinetics-400's, like the teacher's.
            size = dict(zip(("frames", "height", "width"), args.shape or FULL_SIZE_INPUT))
            student = student.model_copy(update={**size, "num_classes": FULL_SIZE_CLASSES})
            teacher = TeacherArch(arch="r2plus1d_18", width=args.teacher_width, num_classes=student.num_classes)
            report["full_size"] = full_size_ladder(student, teacher, args.keep or work, machine, args.rounds,
                                                   args.iters)
        if args.project_dir:
            report["trained"] = trained_ladder(args.project_dir.resolve(), work, args.threads, args.rounds,
                                               max(args.iters, 5), machine)
    if "trained" in report:
        with atomic_path(args.out / "ladder.png") as tmp:
            tmp.write_bytes(ladder_png(report["trained"]))
    write_report(args.out, "ladder", report, markdown(report))
    return report


if __name__ == "__main__":
    main()
