"""Export stage: fan the final student out to every hardware target's Ray pool at once; each target exports, then
verifies its artifact on its own runtime (parity with PyTorch, top-1 on the test split, latency, size).

    python -m tasks.export --profile tiny      # runs the upstream stages first (cached in the project dir)

In the flow each target is a Prefect task of its own (`export-<target>`) and a nested MLflow run holding its artifact;
tasks/register.py turns those into registered versions.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from prefect import task

from tasks.caching import sealed, verified_incarnation
from tasks.common import TrainingReads, eval_clip_set
from tasks.retry import IO_RETRY_DELAYS, only_io_errors
from vidopt.artifacts import (CpuOptions, DatasetArtifact, ExportJob, FpgaOptions, GpuOptions, ModelArtifact,
                              TargetResult, TpuOptions)
from vidopt.config import BudgetConfig, ClipConfig, ExportConfig, PipelineConfig
from vidopt.stages import StageWork, artifact_hash, forget_incarnation, split_rows, stage_work
from workers.pools import run_jobs

log = logging.getLogger("vidopt.export")
RESULTS = "results.json"
TARGET_RESULTS = "verified"   # <target>.json: one verified target's result, reused for the same inputs


class Reads(TrainingReads):
    export: ExportConfig
    budgets: BudgetConfig   # the CPU target ships only an int8 form within the agreement budget


def target_options(cfg: Reads, target: str) -> CpuOptions | GpuOptions | TpuOptions | FpgaOptions:
    e = cfg.export
    return {"cpu": lambda: CpuOptions(threads=e.cpu_threads, min_argmax_agreement=cfg.budgets.min_argmax_agreement,
                                      runtimes=e.cpu_runtimes),
            "gpu": lambda: GpuOptions(threads=e.cpu_threads, min_argmax_agreement=cfg.budgets.min_argmax_agreement),
            "tpu": lambda: TpuOptions(bf16=e.tpu_bf16),
            "fpga": lambda: FpgaOptions(fixed_width=e.fpga_fixed_width,
                                        calibration_clips=e.fpga_calibration_clips)}[target]()


def work_dir(cfg: PipelineConfig | Reads, dataset: DatasetArtifact, int8: ModelArtifact) -> StageWork:
    return stage_work(Reads.of(cfg), "export", [artifact_hash(dataset), artifact_hash(int8)])


def run(cfg: PipelineConfig | Reads, dataset: DatasetArtifact, int8: ModelArtifact) -> list[TargetResult]:
    """Every target at once. `int8` is the quantize stage's artifact: its folder holds the student's fp32 weights and
    model_int8.onnx. Results where every target is ok are kept for the same inputs; a skipped or failed target makes
    the next run try it again (a pool may have joined, a transient failure may have passed)."""
    cfg = Reads.of(cfg)
    work = work_dir(cfg, dataset, int8)
    if work.store.has(work.child(RESULTS)):
        saved = json.loads(work.store.read_text(work.child(RESULTS)))
        log.info("export: %s already holds verified targets for these inputs", work.uri)
        return [TargetResult.model_validate(r) for r in saved["results"]]
    done = {t: r for t in cfg.export.targets if (r := _saved_target(work, t)) is not None}
    jobs = [job for job in export_jobs(cfg, work, dataset, int8) if job.target not in done]
    started = time.monotonic()
    fresh = {r.target: r for r in _run_jobs(cfg, work, jobs)}
    wall = time.monotonic() - started
    results = [done.get(t) or fresh[t] for t in cfg.export.targets]
    log.info("export: %d targets in %.1f s wall (%s)", len(results), wall,
             ", ".join(f"{r.target} {r.status} {r.seconds:.1f} s" for r in results))
    record = json.dumps({"wall_seconds": wall, "results": [r.model_dump() for r in results]}, indent=2)
    if all(r.status == "ok" for r in results):
        work.store.write_text(work.child(RESULTS), record)
    else:  # not a result to reuse: a fresh incarnation makes Prefect's cache key miss next time too
        work.store.write_text(work.child("results.incomplete.json"), record)
        forget_incarnation(work)
    return results


def run_target(cfg: PipelineConfig | Reads, dataset: DatasetArtifact, int8: ModelArtifact,
               target: str) -> TargetResult:
    """One target, on its pool: what each of the flow's export tasks runs. A verified result is kept for the same
    inputs; anything else is tried again next time."""
    cfg = Reads.of(cfg)
    work = work_dir(cfg, dataset, int8)
    saved = _saved_target(work, target)
    if saved is not None:
        log.info("export: %s already holds the verified %s target for these inputs", work.uri, target)
        return saved
    [job] = [job for job in export_jobs(cfg, work, dataset, int8) if job.target == target]
    [result] = _run_jobs(cfg, work, [job])
    if result.status != "ok":
        forget_incarnation(work)
    return result


def export_jobs(cfg: Reads, work: StageWork, dataset: DatasetArtifact, int8: ModelArtifact) -> list[ExportJob]:
    """One job per target of export.targets, on the test split's eval clips (val where there is no test split)."""
    split = "test" if split_rows(dataset, "test", work.store) else "val"
    if not split_rows(dataset, split, work.store):
        raise ValueError(f"export: dataset {dataset.uri} has no test or val videos to verify targets on")
    # The split's clips as the quantize stage already decoded them (one clip set in the store): workers fetch it.
    eval_clips = eval_clip_set(cfg, dataset, split)
    jobs = [ExportJob(target=t, store=work.store.spec, model=int8.uri, eval_clips=eval_clips, out=work.child(t),
                      options=target_options(cfg, t)) for t in cfg.export.targets]
    # The jobs as sent, so `vidopt bench export` can time each target alone against this stage: the same for every
    # target's task (the stage's key holds all they depend on), so written once.
    if not work.store.has(work.child("jobs.json")):
        work.store.write_text(work.child("jobs.json"), json.dumps([j.model_dump(mode="json") for j in jobs], indent=2))
    return jobs


def _run_jobs(cfg: Reads, work: StageWork, jobs: list[ExportJob]) -> list[TargetResult]:
    """The jobs on their pools at once; each verified result kept in the stage's place."""
    results = [r.model_copy(update={"eval_clips": job.eval_clips.sha256})
               for job, r in zip(jobs, run_jobs(jobs, cfg.ray))] if jobs else []
    for result in results:
        if result.status == "ok":
            work.store.write_text(work.child(f"{TARGET_RESULTS}/{result.target}.json"), result.model_dump_json())
    return results


def _saved_target(work: StageWork, target: str) -> TargetResult | None:
    uri = work.child(f"{TARGET_RESULTS}/{target}.json")
    return TargetResult.model_validate_json(work.store.read_text(uri)) if work.store.has(uri) else None


def log_target(result: TargetResult, parent_run_id: str, data_version: str, store,
               clips: ClipConfig | None = None) -> TargetResult:
    """[MLflow] a nested run per target with its verification metrics and its artifact. Returns the result with the
    run id and the logged artifact's URI in `extra`, which registration points the model version at."""
    import mlflow

    with mlflow.start_run(run_name=f"export-{result.target}", parent_run_id=parent_run_id, nested=True) as run:
        mlflow.set_tags({"stage": "export", "target": result.target, "status": result.status,
                         "runtime": result.runtime, "reason": result.reason[:5000], "data_version": data_version})
        metrics = {f"parity.{k}": v for k, v in result.parity.items()}
        metrics.update({k: v for k, v in {"top1": result.top1, "latency_ms": result.latency_ms,
                                           "artifact_bytes": result.artifact_bytes,
                                           "seconds": result.seconds}.items() if v is not None})
        mlflow.log_metrics(metrics)
        mlflow.log_dict(result.model_dump(), "result.json")
        logged = {"mlflow_run_id": run.info.run_id}
        if result.status == "ok" and result.artifact_uri:
            local = store.get_file(result.artifact_uri)
            mlflow.log_artifact(str(local), "artifact")
            logged["mlflow_artifact_uri"] = f"{run.info.artifact_uri}/artifact/{local.name}"
            model = log_pyfunc_model(local, clips)
            if model is not None:
                logged.update(mlflow_model_uri=model.model_uri, mlflow_model_id=model.model_id)
    return result.model_copy(update={"extra": {**result.extra, **logged}})


def log_pyfunc_model(archive_path: Path, clips: ClipConfig | None = None):
    """[MLflow] the target's package as an MLflow model: an ONNX file that onnxruntime's CPU provider runs too (the
    CPU and GPU packages' runtime.json), the GPU package's AOTInductor program (torch), the TPU's StableHLO program
    (torch-xla), or the FPGA's HLS project (hls4ml's C++ emulation) -> its ModelInfo, or None."""
    import tarfile
    import tempfile

    from vidopt.pyfunc import log_aoti_model, log_hls_model, log_onnx_model, log_stablehlo_model

    if not tarfile.is_tarfile(archive_path):
        return None
    sampling = clips.model_dump(include={"stride", "seconds", "resize"}) if clips else {}
    with tempfile.TemporaryDirectory(prefix="vidopt-package-") as tmp, tarfile.open(archive_path) as tar:
        tar.extractall(tmp, filter="data")
        runtimes = list(Path(tmp).glob("*/runtime.json"))
        signatures = list(Path(tmp).glob("*/signature.json"))      # the TPU's StableHLO program
        if len(runtimes) == 1:
            runtime = json.loads(runtimes[0].read_text())
            if "ips" in runtime:   # the FPGA's HLS project: its emulation compiles with g++ where it loads
                clip = (runtime["frames"], runtime["height"], runtime["width"])
                return log_hls_model(runtimes[0].parent, clip, runtime.get("classes") or [], sampling)
            _, t, h, w = runtime["input"]["shape"]          # [C, T, H, W]
            if runtime.get("runtime") == "aotinductor":
                return log_aoti_model(runtimes[0].parent, (t, h, w), runtime.get("classes") or [], sampling)
            if not str(runtime.get("file", "")).endswith(".onnx") or "CPUExecutionProvider" not in runtime.get(
                    "providers", []):
                return None
            return log_onnx_model(runtimes[0].parent, (t, h, w), runtime.get("classes") or [], sampling)
        if len(signatures) == 1:
            signature = json.loads(signatures[0].read_text())
            if "normalise" not in signature["input"]:
                return None
            _, _, t, h, w = signature["input"]["shape"]     # [1, C, T, H, W]
            return log_stablehlo_model(signatures[0].parent, (t, h, w), signature.get("classes") or [], sampling)
        return None


def target_cache_key(context, parameters: dict) -> str:
    """[Prefect] an export task's key: the stage's inputs and place (tasks/caching.py), and its target."""
    work = work_dir(parameters["cfg"], parameters["dataset"], parameters["int8"])
    return f"vidopt-export-{work.key}-{parameters['target']}-{verified_incarnation(work, '-' + parameters['target'])}"


# [Prefect] one task per target (the flow submits them together): each is seen, cached and retried on its own, while
# the targets still run concurrently on their Ray pools. Retries cover object-store reads only.
@task(name="export", task_run_name="export-{target}", retries=len(IO_RETRY_DELAYS),
      retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=only_io_errors, cache_key_fn=target_cache_key,
      persist_result=True, result_serializer="json")
def export_task(cfg: PipelineConfig, dataset: DatasetArtifact, int8: ModelArtifact, target: str,
                parent_run_id: str) -> TargetResult:
    result = run_target(cfg, dataset, int8, target)
    work = work_dir(cfg, dataset, int8)
    # [MLflow] a nested run per target under the pipeline's run, holding its artifact
    logged = log_target(result, parent_run_id, dataset.data_version, work.store, cfg.clips)
    return sealed(work, logged, f"-{target}") if logged.status == "ok" else logged   # only a verified one is reused


if __name__ == "__main__":
    from tasks.dag import run_stage_standalone

    run_stage_standalone("export")
