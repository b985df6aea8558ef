"""CPU target: the student on the fastest CPU runtime of the machine that serves it, packaged with the thread
settings it was measured with.

    python -m workers.cpu JOB.json      # run one export job (see vidopt.artifacts.LocalExportJob) and print its result

Every variant this machine can run competes (vidopt/runtimes.py): each int8 form the quantize stage kept (the same
function, laid out for different kernels: vidopt/onnx_utils.py int8_forms) and the fp32 file, each on onnxruntime,
OpenVINO f32 and OpenVINO's bf16 hint where the CPU has bf16. The fastest form differs by runtime (OpenVINO pays
layout reorders that onnxruntime does not), so forms and runtimes are ranked together. A variant ships only if its
argmax agreement with the fp32 PyTorch reference on the eval clips is within `min_argmax_agreement` (the registry's
gate; forms round differently in int8, by a clip or two); of those, the fastest at batch 1 and the shipped thread
count, by each one's quietest round. Verified on the runtime it ships on: agreement and max |logit| difference with
the reference, top-1 on the test clips, batch-1 latency.
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
from vidopt.onnx_utils import FORMS_INDEX, FP32_FILE, INT8_FILE, INT8_FORMS_DIR, int8_form_files
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
    choice = choose_variant(candidate_files(Path(job.int8_dir), job.options.precisions), job.options.runtimes,
                            shape, threads, stored, reference, min_agreement)
    runtime, precision, form = choice["chosen"]
    form = form if precision == "int8" else None   # an fp32 file is the one form there is
    file = f"student_{precision}.onnx"
    shutil.copy2(choice["file"], package / file)
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
               **forms_on(runtime, choice), "min_argmax_agreement": min_agreement},
    )


def candidate_files(int8_dir: Path, precisions: list[str]) -> dict[tuple[str, str], Path]:
    """{(precision, form): file} the target may ship: every int8 form the quantize stage kept (a model dir without
    forms: its model_int8.onnx, as form INT8_FILE) and the fp32 file (form FP32_FILE), of the precisions asked for."""
    files: dict[tuple[str, str], Path] = {}
    if "int8" in precisions:
        if (int8_dir / INT8_FORMS_DIR / FORMS_INDEX).exists():
            files.update({("int8", form): path for form, path in int8_form_files(int8_dir / INT8_FORMS_DIR).items()})
        else:
            files[("int8", INT8_FILE)] = int8_dir / INT8_FILE
    if "fp32" in precisions and (int8_dir / FP32_FILE).exists():
        files[("fp32", FP32_FILE)] = int8_dir / FP32_FILE
    return files


def variant_name(runtime: str, precision: str, form: str) -> str:
    """"openvino int8 frames_per_stem=4, ..." / "onnxruntime fp32": how results and the report name a variant."""
    return f"{runtime} {precision}" + (f" {form}" if precision == "int8" else "")


def choose_variant(files: dict[tuple[str, str], Path], allowed: list[str] | None, shape: tuple[int, ...],
                   threads: int, stored, reference: np.ndarray, min_agreement: float) -> dict:
    """Every (runtime, file) variant this machine runs -> {"chosen": (runtime, precision, form), "file": its file,
    "best_p50_ms": {variant_name: ms}, "agreement": {variant_name: argmax agreement}, "variants": {variant_name:
    (runtime, precision, form)}}. Variants whose agreement with
    `reference` logits [N, classes] on `stored` clips is below `min_agreement` are scored and not timed; where none
    is within it, the most faithful ships (the registry's gate then says why it is not promoted); where one is, it
    ships untimed."""
    names = [r for r in runtimes.available() if allowed is None or r in allowed] or ["onnxruntime"]
    variants = {variant_name(runtime, precision, form): (runtime, precision, form)
                for (precision, form) in files for runtime in names}
    agreement = {}
    for name, (runtime, precision, form) in variants.items():
        logits = runtimes.Session(runtime, files[(precision, form)], threads).predict(batches(stored))
        agreement[name] = float((logits.argmax(1) == reference.argmax(1)).mean())
    within = [name for name in variants if agreement[name] >= min_agreement]
    if len(within) <= 1:   # nothing to rank
        best = within[0] if within else max(agreement, key=agreement.get)
        return {"chosen": variants[best], "file": files[variants[best][1:]], "best_p50_ms": {}, "agreement": agreement,
                "variants": variants}
    timed = runtimes.compare({name: (variants[name][0], files[variants[name][1:]]) for name in within}, shape,
                             batch=1, threads=threads, rounds=CHOICE_ROUNDS, warmup=3, iters=5,
                             min_seconds=CHOICE_MIN_SECONDS)
    best = {name: stats["best_p50_ms"] for name, stats in timed.items()}
    chosen = variants[min(best, key=best.get)]
    return {"chosen": chosen, "file": files[chosen[1:]], "best_p50_ms": best, "agreement": agreement,
            "variants": variants}


def forms_on(runtime: str, choice: dict) -> dict:
    """The int8 forms' times and agreements on the runtime that ships ({form: value}), for the report's note."""
    forms = {name: form for name, (on, precision, form) in choice["variants"].items()
             if on == runtime and precision == "int8"}
    return {"int8_forms_best_p50_ms": {forms[n]: ms for n, ms in choice["best_p50_ms"].items() if n in forms},
            "int8_forms_argmax_agreement": {forms[n]: value for n, value in choice["agreement"].items() if n in forms}}


if __name__ == "__main__":
    import sys

    print(run_target(LocalExportJob.model_validate_json(Path(sys.argv[1]).read_text())).model_dump_json(indent=2))
