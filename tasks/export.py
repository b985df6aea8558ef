"""Export stage: fan the final student out to every hardware target's Ray pool at once; each target exports, then
verifies its artifact on its own runtime (parity with PyTorch, top-1 on the test split, latency, size).

    python -m tasks.export --profile tiny      # runs the upstream stages first (cached in the project dir)

Each target becomes a nested MLflow run holding its artifact; tasks/register.py turns those into registered versions.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from prefect import task

from tasks.caching import stage_cache
from tasks.common import TrainingReads, eval_clip_set
from tasks.retry import IO_RETRY_DELAYS, only_io_errors
from vidopt.artifacts import (CpuOptions, DatasetArtifact, ExportJob, FpgaOptions, GpuOptions, ModelArtifact,
                              TargetResult, TpuOptions)
from vidopt.config import BudgetConfig, ClipConfig, ExportConfig, PipelineConfig
from vidopt.stages import StageWork, artifact_hash, forget_incarnation, split_rows, stage_work
from workers.pools import run_jobs

log = logging.getLogger("vidopt.export")
RESULTS = "results.json"


class Reads(TrainingReads):
    export: ExportConfig
    budgets: BudgetConfig   # the CPU target ships only an int8 form within the agreement budget


def target_options(cfg: Reads, target: str) -> CpuOptions | GpuOptions | TpuOptions | FpgaOptions:
    e = cfg.export
    return {"cpu": lambda: CpuOptions(threads=e.cpu_threads, min_argmax_agreement=cfg.budgets.min_argmax_agreement),
            "gpu": lambda: GpuOptions(threads=e.cpu_threads),
            "tpu": lambda: TpuOptions(bf16=e.tpu_bf16),
            "fpga": lambda: FpgaOptions(fixed_width=e.fpga_fixed_width,
                                        calibration_clips=e.fpga_calibration_clips)}[target]()


def work_dir(cfg: PipelineConfig | Reads, dataset: DatasetArtifact, int8: ModelArtifact) -> StageWork:
    return stage_work(Reads.of(cfg), "export", [artifact_hash(dataset), artifact_hash(int8)])


def run(cfg: PipelineConfig | Reads, dataset: DatasetArtifact, int8: ModelArtifact) -> list[TargetResult]:
    """`int8` is the quantize stage's artifact: its folder holds the student's fp32 weights and model_int8.onnx.
    Results where every target is ok are kept for the same inputs; a skipped or failed target makes the next run try
    all targets again (a pool may have joined, a transient failure may have passed)."""
    cfg = Reads.of(cfg)
    work = work_dir(cfg, dataset, int8)
    if work.store.has(work.child(RESULTS)):
        saved = json.loads(work.store.read_text(work.child(RESULTS)))
        log.info("export: %s already holds verified targets for these inputs", work.uri)
        return [TargetResult.model_validate(r) for r in saved["results"]]
    split = "test" if split_rows(dataset, "test", work.store) else "val"
    if not split_rows(dataset, split, work.store):
        raise ValueError(f"export: dataset {dataset.uri} has no test or val videos to verify targets on")
    # The split's clips as the quantize stage already decoded them (one clip set in the store): workers fetch it.
    eval_clips = eval_clip_set(cfg, dataset, split)
    jobs = [ExportJob(target=t, store=work.store.spec, model=int8.uri, eval_clips=eval_clips, out=work.child(t),
                      options=target_options(cfg, t)) for t in cfg.export.targets]
    # The jobs as sent, so `vidopt bench export` can time each target alone against this stage.
    work.store.write_text(work.child("jobs.json"), json.dumps([j.model_dump(mode="json") for j in jobs], indent=2))
    started = time.monotonic()
    results = [r.model_copy(update={"eval_clips": eval_clips.sha256}) for r in run_jobs(jobs, cfg.ray)]
    wall = time.monotonic() - started
    log.info("export: %d targets in %.1f s wall (%s)", len(results), wall,
             ", ".join(f"{r.target} {r.status} {r.seconds:.1f} s" for r in results))
    record = json.dumps({"wall_seconds": wall, "results": [r.model_dump() for r in results]}, indent=2)
    if all(r.status == "ok" for r in results):
        work.store.write_text(work.child(RESULTS), record)
    else:  # not a result to reuse: a fresh incarnation makes Prefect's cache key miss next time too
        work.store.write_text(work.child("results.incomplete.json"), record)
        forget_incarnation(work)
    return results


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
    """[MLflow] the target's package as an MLflow model wherever this machine can run it: an ONNX file that
    onnxruntime's CPU provider runs too (the CPU and GPU packages' runtime.json), or the TPU's StableHLO program
    (torch-xla) -> its ModelInfo; None for the FPGA's HLS projects."""
    import tarfile
    import tempfile

    from vidopt.pyfunc import log_onnx_model, log_stablehlo_model

    if not tarfile.is_tarfile(archive_path):
        return None
    sampling = clips.model_dump(include={"stride", "seconds", "resize"}) if clips else {}
    with tempfile.TemporaryDirectory(prefix="vidopt-package-") as tmp, tarfile.open(archive_path) as tar:
        tar.extractall(tmp, filter="data")
        runtimes = list(Path(tmp).glob("*/runtime.json"))
        signatures = list(Path(tmp).glob("*/signature.json"))      # the TPU's StableHLO program
        if len(runtimes) == 1:
            runtime = json.loads(runtimes[0].read_text())
            if not str(runtime.get("file", "")).endswith(".onnx") or "CPUExecutionProvider" not in runtime.get(
                    "providers", []):
                return None
            _, t, h, w = runtime["input"]["shape"]          # [C, T, H, W]
            return log_onnx_model(runtimes[0].parent, (t, h, w), runtime.get("classes") or [], sampling)
        if len(signatures) == 1:
            signature = json.loads(signatures[0].read_text())
            if "normalise" not in signature["input"]:
                return None
            _, _, t, h, w = signature["input"]["shape"]     # [1, C, T, H, W]
            return log_stablehlo_model(signatures[0].parent, (t, h, w), signature.get("classes") or [], sampling)
        return None


# [Prefect] retries cover object-store reads only; `run` above is the plain function tests call.
@task(name="export", retries=len(IO_RETRY_DELAYS), retry_delay_seconds=IO_RETRY_DELAYS,
      retry_condition_fn=only_io_errors, **stage_cache(work_dir))
def export_task(cfg: PipelineConfig, dataset: DatasetArtifact, int8: ModelArtifact,
                parent_run_id: str) -> list[TargetResult]:
    from vidopt.tracking import stage_run

    store = work_dir(cfg, dataset, int8).store
    with stage_run("export", parent_run_id) as stage:  # [MLflow] nested run; one more level per target
        results = [log_target(r, stage.run.info.run_id, dataset.data_version, store, cfg.clips)
                   for r in run(cfg, dataset, int8)]
        for result in results:
            stage.log(f"{result.target}.ok", float(result.status == "ok"))
    return results


if __name__ == "__main__":
    from tasks.dag import run_stage_standalone

    run_stage_standalone("export")
