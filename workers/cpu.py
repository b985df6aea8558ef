"""CPU target: the int8 onnxruntime model from the ladder, packaged with the thread settings it was measured with.

    python -m workers.cpu JOB.json      # run one export job (see vidopt.artifacts.LocalExportJob) and print its result

This is what most video-analytics servers run. The int8 form shipped is the fastest on this machine (the quantize
stage's choice was made on its own) of those that agree with the reference within the argmax-agreement budget
(option `min_argmax_agreement`, the registry's gate). Verified on onnxruntime's CPU execution provider: argmax
agreement with the fp32 PyTorch reference, top-1 on the test clips, batch-1 latency at the shipped thread count.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vidopt.artifacts import LocalExportJob, TargetResult
from vidopt.data import normalise_clips
from vidopt.onnx_utils import (FORMS_INDEX, INT8_FILE, INT8_FORMS_DIR, faithful_int8_forms,
                               int8_form_files, measure_latency, ort_predict, ort_session,
                               rank_int8_forms, takes_pixels)
from workers.common import (VERIFIED_LOGITS, archive, batches, correct, load_stored_clips, model_classes,
                            onnx_runtime_json, parity, reference_logits, top1)


def run_target(job: LocalExportJob) -> TargetResult:
    started = time.monotonic()
    threads, min_agreement = job.options.threads, job.options.min_argmax_agreement
    source = Path(job.int8_dir or "") / INT8_FILE
    if not source.exists():
        return TargetResult(target="cpu", status="failed", reason=f"{source}: no int8 model (run the quantize stage)")
    package = Path(job.out_dir) / "cpu_int8"
    package.mkdir(parents=True, exist_ok=True)
    stored, truth = load_stored_clips(job)      # [N, T, H, W, C] uint8: ort_predict gives the file what it reads
    x = normalise_clips(stored)                   # [N, C, T, H, W] float, for the PyTorch reference
    reference = reference_logits(job, x)
    form, shipped, form_times, form_agreement = int8_to_ship(Path(job.int8_dir), tuple(x.shape[1:]), threads,
                                                             stored, reference, min_agreement)
    shutil.copy2(shipped, package / "student_int8.onnx")
    session = ort_session(package / "student_int8.onnx", threads)
    pixels = takes_pixels(session)
    runtime = onnx_runtime_json("student_int8.onnx", ["CPUExecutionProvider"], threads, list(x.shape[1:]), pixels,
                                model_classes(job), runtime=f"onnxruntime>={ort.__version__}", int8_form=form)
    (package / "runtime.json").write_text(json.dumps(runtime, indent=2))
    logits = ort_predict(session, batches(stored))
    np.save(Path(job.out_dir) / VERIFIED_LOGITS, logits)   # what the registered model must reproduce
    latency = measure_latency(package / "student_int8.onnx", tuple(x.shape[1:]), batch=1, threads=threads)
    artifact = archive(package, Path(job.out_dir) / "cpu_int8.tar.gz")
    return TargetResult(
        target="cpu", status="ok",
        runtime=f"onnxruntime {ort.__version__} {session.get_providers()[0]} ({threads} thread(s))",
        artifact_uri=str(artifact), artifact_bytes=artifact.stat().st_size,
        parity=parity(logits, reference), top1=top1(logits, truth), correct=correct(logits, truth),
        latency_ms=latency["p50_ms"], seconds=time.monotonic() - started,
        extra={"latency": latency, "threads": threads, "int8_form": form,
               "int8_forms_best_p50_ms": form_times, "int8_forms_argmax_agreement": form_agreement,
               "min_argmax_agreement": min_agreement},
    )


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
