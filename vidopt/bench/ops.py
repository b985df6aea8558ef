"""Where a model's time goes, node by node, on onnxruntime or OpenVINO: the runtime's own profiler at batch 1, side
by side.

    vidopt bench ops [FILE.onnx ...] [--project-dir .vidopt] [--runtime onnxruntime] [--threads 1] [--calls 2000]
                     [--out DIR]

With --project-dir: the newest quantize stage's fp32 file and every int8 form it kept (int8_forms/), the files whose
speed-ratio the ladder's int8 bar is about. Why it exists: every question about that ratio so far ("which op keeps
int8 under 2x on this CPU?") was answered by profiling by hand; on the Zen 4 the answer was the stem (fp32 140 us,
int8 125 us) and on the Xeons the 16-wide convs. Each node's time is the median over calls of the profiler's timing
of its kernel; `model_run` is the median of whole runs, which adds the session's own work between nodes (and the
profiler's: a run under it is slower than one without, so compare the nodes of one table, not its totals with the
ladder's latencies). Nodes are the optimized graph's: the runtime's fused and layout-changed nodes, as it runs them;
OpenVINO's name the kernel too (`brgconv_avx512_amx_I8`: an AMX int8 conv; a `Reorder` is a layout change it added).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vidopt import runtimes
from vidopt.bench import write_report
from vidopt.bench.ladder import find_model_dir
from vidopt.onnx_utils import FP32_FILE, INT8_FORMS_DIR, int8_form_files, ort_session, random_input

log = logging.getLogger("vidopt.bench.ops")
DEFAULTS = {"runtime": "onnxruntime", "threads": 1, "calls": 2000, "warmup": 50, "top": 12}
KERNEL_SUFFIX = "_kernel_time"  # the profiler's event for a node's kernel: "<node name>_kernel_time"


def batch_one_input(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    """A random input at batch 1 for the session's one input (any file: its shape is read from the session)."""
    spec = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in spec.shape]   # the symbolic batch dimension -> 1
    return {spec.name: random_input(session, shape)}


def profile_model(path: Path, threads: int, calls: int, warmup: int) -> dict:
    """{"model_run_us": median whole run, "nodes": [{"node", "op", "us"}] slowest first, "nodes_us": their sum}."""
    with tempfile.TemporaryDirectory(prefix="vidopt-bench-ops-") as tmp:
        session = ort_session(path, threads, profile_prefix=Path(tmp) / "profile")
        feed = batch_one_input(session)
        for _ in range(warmup + calls):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    run_starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    first_timed = run_starts[warmup] if len(run_starts) > warmup else 0   # the warm-up calls' events are left out
    kernels, runs, ops = defaultdict(list), [], {}
    for event in (e for e in events if e.get("ts", -1) >= first_timed):
        if event.get("cat") == "Node" and event["name"].endswith(KERNEL_SUFFIX):
            node = event["name"][: -len(KERNEL_SUFFIX)]
            kernels[node].append(event["dur"])
            ops[node] = event["args"]["op_name"]
        elif event.get("cat") == "Session" and event["name"] == "model_run":
            runs.append(event["dur"])
    if not kernels:
        raise ValueError(f"bench ops: onnxruntime's profile of {path} holds no node timings")
    nodes = sorted(({"node": n, "op": ops[n], "us": float(statistics.median(t))} for n, t in kernels.items()),
                   key=lambda row: -row["us"])
    return {"file": str(path), "model_run_us": float(statistics.median(runs)) if runs else None, "nodes": nodes,
            "nodes_us": sum(row["us"] for row in nodes)}


def profile_openvino(path: Path, runtime: str, threads: int, calls: int, warmup: int) -> dict:
    """profile_model's record from OpenVINO's per-layer counters (runtimes.Session(profile=True)); rows add
    "kernel", the implementation that ran."""
    session = runtimes.Session(runtime, path, threads, profile=True)
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    shape = (1, *[d.dim_value for d in dims[1:]])
    x = (np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8) if session.pixels
         else np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
    layers, runs, rows = defaultdict(list), [], {}
    for call in range(warmup + calls):
        started = time.perf_counter()
        session.run(x)
        elapsed = time.perf_counter() - started
        if call >= warmup:
            runs.append(elapsed * 1e6)
            for row in session.layer_times():
                layers[row["node"]].append(row["us"])
                rows[row["node"]] = row
    nodes = sorted(({**rows[n], "us": float(statistics.median(t))} for n, t in layers.items()),
                   key=lambda row: -row["us"])
    return {"file": str(path), "model_run_us": float(statistics.median(runs)), "nodes": nodes,
            "nodes_us": sum(row["us"] for row in nodes)}


def project_files(project: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """The newest quantize model dir's fp32 file and its int8 forms -> ({short name: file}, {short name: the form's
    name in its index}): "int8 form_3" fits a table's column, "frames_per_stem=4, pool_as_conv=True, ..." does not."""
    model_dir = find_model_dir(project, "quantize")
    if model_dir is None:
        raise SystemExit(f"bench ops: no quantize model dir under {project}/stages/quantize; run the pipeline first")
    forms = int8_form_files(model_dir / INT8_FORMS_DIR)
    files = {"fp32": model_dir / FP32_FILE, **{f"int8 {path.stem}": path for path in forms.values()}}
    return files, {f"int8 {path.stem}": name for name, path in forms.items()}


def by_op(profile: dict) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for row in profile["nodes"]:
        totals[row["op"]] += row["us"]
    return dict(totals)


def markdown(report: dict, top: int) -> str:
    setup, models = report["setup"], report["models"]
    lines = [f"## Time per node, {setup.get('runtime', 'onnxruntime')} CPU, batch 1, {setup['threads']} thread(s), "
             f"median of {setup['calls']} calls under the profiler", "", "Per op type (us, summed over its nodes):", ""]
    op_types = sorted({op for profile in models.values() for op in by_op(profile)},
                      key=lambda op: -max(by_op(p).get(op, 0.0) for p in models.values()))
    lines += ["| op | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    totals = {name: by_op(profile) for name, profile in models.items()}
    lines += [f"| {op} | " + " | ".join(f"{totals[name].get(op, 0.0):.1f}" for name in models) + " |"
              for op in op_types]
    lines += ["| **all nodes** | " + " | ".join(f"**{p['nodes_us']:.1f}**" for p in models.values()) + " |",
              "| whole run (`model_run`) | " + " | ".join(
                  "-" if p["model_run_us"] is None else f"{p['model_run_us']:.1f}" for p in models.values()) + " |"]
    lines += [f"\n`{name}`: {what}" for name, what in report["forms"].items()]
    for name, profile in models.items():
        kernels = any("kernel" in row for row in profile["nodes"])
        lines += ["", f"### {name}: the {min(top, len(profile['nodes']))} slowest nodes ({profile['file']})", "",
                  "| node | op |" + (" kernel |" if kernels else "") + " us | share of all nodes |",
                  "|---|---|" + ("---|" if kernels else "") + "---:|---:|"]
        lines += [f"| {row['node']} | {row['op']} |" + (f" {row.get('kernel', '')} |" if kernels else "")
                  + f" {row['us']:.1f} | {row['us'] / profile['nodes_us']:.0%} |" for row in profile["nodes"][:top]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="vidopt bench ops", description=__doc__.split("\n")[0])
    parser.add_argument("files", type=Path, nargs="*", help="ONNX files to profile (batch 1, random input)")
    parser.add_argument("--project-dir", type=Path, default=None,
                        help="profile this project's newest fp32 file and its int8 forms (with or without files)")
    parser.add_argument("--runtime", choices=runtimes.RUNTIMES, default=DEFAULTS["runtime"],
                        help="whose profiler: onnxruntime's, or OpenVINO's per-layer counters (f32 or bf16 hint)")
    parser.add_argument("--threads", type=int, default=DEFAULTS["threads"], help="the runtime's threads")
    parser.add_argument("--calls", type=int, default=DEFAULTS["calls"], help="profiled calls per model")
    parser.add_argument("--warmup", type=int, default=DEFAULTS["warmup"], help="calls before those, not counted")
    parser.add_argument("--top", type=int, default=DEFAULTS["top"], help="slowest nodes listed per model")
    parser.add_argument("--out", type=Path, default=Path(".vidopt/bench/ops"), help="writes ops.json and ops.md")
    args = parser.parse_args(argv)
    files, forms = {str(path): path for path in args.files}, {}
    if args.project_dir is not None:
        project, forms = project_files(args.project_dir)
        files.update(project)
    if not files:
        parser.error("name ONNX files to profile, or --project-dir of a finished run")
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        parser.error(f"no such ONNX file: {', '.join(missing)}")
    if args.runtime not in runtimes.available():
        parser.error(f"--runtime {args.runtime} does not run here (this machine runs "
                     f"{', '.join(runtimes.available())})")
    if args.calls < 1 or args.threads < 1:
        parser.error(f"--calls and --threads must be at least 1, got {args.calls} and {args.threads}")

    models = {}
    for i, (name, path) in enumerate(files.items(), start=1):
        log.info("bench ops: %s (%d of %d), %d calls", name, i, len(files), args.calls)
        models[name] = (profile_model(path, args.threads, args.calls, args.warmup) if args.runtime == "onnxruntime"
                        else profile_openvino(path, args.runtime, args.threads, args.calls, args.warmup))
    report = {"setup": {"runtime": args.runtime, "threads": args.threads, "calls": args.calls, "batch": 1},
              "forms": forms, "models": models}
    write_report(args.out, "ops", report, markdown(report, args.top))
    return report


if __name__ == "__main__":
    main()
