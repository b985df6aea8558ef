"""CPU target: the student on the fastest CPU runtime of the machine that serves it, packaged with the thread
settings it was measured with.

    python -m workers.cpu JOB.json      # run one export job (see vidopt.artifacts.LocalExportJob) and print its result

Every variant this machine can run competes (vidopt/runtimes.py): the int8 file (the fastest int8 form on
onnxruntime, the quantize stage kept them all) and the fp32 file, each on onnxruntime, OpenVINO f32 and OpenVINO's
bf16 hint where the CPU has bf16. A variant ships only if its argmax agreement with the fp32 PyTorch reference on the
eval clips is within `min_argmax_agreement` (the registry's gate); of those, the fastest at batch 1 and the shipped
thread count, by each one's quietest round. Verified on the runtime it ships on: agreement and max |logit| difference
with the reference, top-1 on the test clips, batch-1 latency.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from vidopt import runtimes
from vidopt.artifacts import LocalExportJob, TargetResult
from vidopt.data import normalise_clips
from vidopt.onnx_utils import (FORMS_INDEX, FP32_FILE, INT8_FILE, INT8_FORMS_DIR, faithful_int8_forms,
                               int8_form_files, rank_int8_forms)
from workers.common import (VERIFIED_LOGITS, archive, batches, correct, load_stored_clips, model_classes,
                            onnx_runtime_json, parity, reference_logits, top1)

CHOICE_ROUNDS, CHOICE_MIN_SECONDS = 3, 0.2   # per variant: interleaved rounds, each timing calls for this long


def run_target(job: LocalExportJob) -> TargetResult:
    started = time.monotonic()
    threads, min_agreement = job.options.threads, job.options.min_argmax_agreement
    source = Path(job.int8_dir or "") / INT8_FILE
    if not source.exists():
        return TargetResult(target="cpu", status="failed", reason=f"{source}: no int8 model (run the quantize stage)")
    package = Path(job.out_dir) / "cpu_int8"
    package.mkdir(parents=True, exist_ok=True)
    stored, truth = load_stored_clips(job)      # [N, T, H, W, C] uint8: each session gives its file what it reads
    x = normalise_clips(stored)                   # [N, C, T, H, W] float, for the PyTorch reference
    reference = reference_logits(job, x)
    shape = tuple(x.shape[1:])
    form, int8_file, form_times, form_agreement = int8_to_ship(Path(job.int8_dir), shape, threads, stored, reference,
                                                               min_agreement)
    files = {"int8": int8_file, "fp32": Path(job.int8_dir) / FP32_FILE}
    files = {precision: path for precision, path in files.items()
             if precision in job.options.precisions and path.exists()}
    choice = choose_runtime(files, job.options.runtimes, shape, threads, stored, reference, min_agreement)
    runtime, precision = choice["chosen"]
    file = f"student_{precision}.onnx"
    shutil.copy2(files[precision], package / file)
    session = runtimes.Session(runtime, package / file, threads)
    runtime_json = onnx_runtime_json(file, ["CPUExecutionProvider"] if runtime == "onnxruntime" else [], threads,
                                     list(shape), session.pixels, model_classes(job), runtime=runtime,
                                     runtime_version=runtimes.version(runtime), precision=precision, int8_form=form)
    (package / "runtime.json").write_text(json.dumps(runtime_json, indent=2))
    logits = session.predict(batches(stored))
    np.save(Path(job.out_dir) / VERIFIED_LOGITS, logits)   # what the registered model must reproduce
    latency = runtimes.measure(session, shape, batch=1, warmup=3, iters=20)
    artifact = archive(package, Path(job.out_dir) / "cpu_int8.tar.gz")
    return TargetResult(
        target="cpu", status="ok",
        runtime=f"{runtimes.version(runtime)}, {precision} file ({threads} thread(s))",
        artifact_uri=str(artifact), artifact_bytes=artifact.stat().st_size,
        parity=parity(logits, reference), top1=top1(logits, truth), correct=correct(logits, truth),
        latency_ms=latency["p50_ms"], seconds=time.monotonic() - started,
        extra={"latency": latency, "threads": threads, "int8_form": form, "runtime": runtime, "precision": precision,
               "runtimes_best_p50_ms": choice["best_p50_ms"], "runtimes_argmax_agreement": choice["agreement"],
               "int8_forms_best_p50_ms": form_times, "int8_forms_argmax_agreement": form_agreement,
               "min_argmax_agreement": min_agreement},
    )


def choose_runtime(files: dict[str, Path], allowed: list[str] | None, shape: tuple[int, ...], threads: int,
                   stored, reference: np.ndarray, min_agreement: float) -> dict:
    """Every (runtime, precision) variant this machine runs -> {"chosen": (runtime, precision), "best_p50_ms":
    {"runtime precision": ms}, "agreement": {...}}. Variants whose argmax agreement with `reference` is below
    `min_agreement` are scored and not timed; where none is within it, the most faithful ships (the registry's gate
    then says why it is not promoted)."""
    names = [r for r in runtimes.available() if allowed is None or r in allowed] or ["onnxruntime"]
    variants = {f"{runtime} {precision}": (runtime, precision) for precision in files for runtime in names}
    agreement = {}
    for name, (runtime, precision) in variants.items():
        logits = runtimes.Session(runtime, files[precision], threads).predict(batches(stored))
        agreement[name] = float((logits.argmax(1) == reference.argmax(1)).mean())
    within = [name for name in variants if agreement[name] >= min_agreement]
    if not within:
        best = max(agreement, key=agreement.get)
        return {"chosen": variants[best], "best_p50_ms": {}, "agreement": agreement}
    timed = runtimes.compare({name: (variants[name][0], files[variants[name][1]]) for name in within}, shape,
                             batch=1, threads=threads, rounds=CHOICE_ROUNDS, warmup=3, iters=5,
                             min_seconds=CHOICE_MIN_SECONDS)
    best = {name: stats["best_p50_ms"] for name, stats in timed.items()}
    return {"chosen": variants[min(best, key=best.get)], "best_p50_ms": best, "agreement": agreement}


def int8_to_ship(int8_dir: Path, input_shape: tuple[int, ...], threads: int, stored, reference,
                 min_agreement: float) -> tuple[str, Path, dict[str, float], dict[str, float]]:
    """The int8 form to ship -> (its name, its file, {form ranked: best round's p50 ms}, {form: argmax agreement}).

    The quantize stage kept every form (INT8_FORMS_DIR) and ranked them on its own machine at 1 thread; this is the
    target, so they are ranked again here at the thread count shipped, but only those whose argmax agreement with
    the reference on the eval clips (`stored` uint8 [N, T, H, W, C]; `reference` logits [N, classes]) is within
    `min_agreement` (faithful_int8_forms: forms round differently, by a clip or two); where none is, the most
    faithful ships, and the registry's gate says why it is not promoted. A model dir without forms ships its
    model_int8.onnx as it is."""
    if not (int8_dir / INT8_FORMS_DIR / FORMS_INDEX).exists():
        return INT8_FILE, int8_dir / INT8_FILE, {}, {}
    forms = int8_form_files(int8_dir / INT8_FORMS_DIR)
    eligible, agreement = faithful_int8_forms(forms, batches(stored), reference, min_agreement)
    chosen, times = rank_int8_forms({name: forms[name] for name in eligible}, input_shape, threads)
    return chosen, forms[chosen], times, agreement


if __name__ == "__main__":
    import sys

    print(run_target(LocalExportJob.model_validate_json(Path(sys.argv[1]).read_text())).model_dump_json(indent=2))
