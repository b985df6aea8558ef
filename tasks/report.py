"""Report stage: the run report over the compression ladder and every export target (Pareto plot, best variant per
target under `budgets`, energy and cost per million clips estimated from `report.profiles`) as HTML, PNG, JSON, text.

    python -m tasks.report --profile tiny      # runs the upstream stages first (cached in the project dir)

Cached like every stage on its inputs (tasks/caching.py); the nested MLflow run `report` holds its files. See vidopt/report.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone

from prefect import task

from tasks.caching import sealed, stage_cache
from tasks.retry import IO_RETRY_DELAYS, only_io_errors
from vidopt.artifacts import CrossValArtifact, DatasetArtifact, ModelArtifact, ReportArtifact, TargetResult
from vidopt.config import BudgetConfig, ExportConfig, PipelineConfig, ReportConfig
from vidopt.report import best_summary, build_report, write_report
from vidopt.stages import StageReads, StageWork, artifact_hash, open_store, stage_work

log = logging.getLogger("vidopt.report")


class Reads(StageReads):
    budgets: BudgetConfig
    report: ReportConfig
    export: ExportConfig   # cpu_threads picks which of the ladder's latencies are shown


def work_dir(cfg: PipelineConfig | Reads, dataset: DatasetArtifact, teacher: ModelArtifact, student: ModelArtifact,
             pruned: ModelArtifact, int8: ModelArtifact, targets: list[TargetResult],
             registry: list[dict] | None = None, crossval: CrossValArtifact | None = None) -> StageWork:
    ladder = {"teacher": teacher, "student": student, "pruned": pruned, "int8": int8}
    results = json.dumps([[t.model_dump(mode="json") for t in targets], registry or [],
                          crossval.model_dump(mode="json") if crossval else None], sort_keys=True)
    inputs = [artifact_hash(dataset), *(f"{name}:{a.weights_sha256}" for name, a in ladder.items()),
              hashlib.sha256(results.encode()).hexdigest()]
    return stage_work(Reads.of(cfg), "report", inputs)


def run(cfg: PipelineConfig | Reads, dataset: DatasetArtifact, teacher: ModelArtifact, student: ModelArtifact,
        pruned: ModelArtifact, int8: ModelArtifact, targets: list[TargetResult],
        registry: list[dict] | None = None, crossval: CrossValArtifact | None = None) -> ReportArtifact:
    """The compression ladder's models, the export stage's results, the registry's decisions and the k-fold scores
    (when run) -> the report, published to the store."""
    reads = Reads.of(cfg)
    work = work_dir(reads, dataset, teacher, student, pruned, int8, targets, registry, crossval)
    ladder = {"teacher": teacher, "student": student, "pruned": pruned, "int8": int8}
    context = {"data version": dataset.data_version, "classes": str(len(dataset.classes)),
               "config hash": cfg.config_hash() if isinstance(cfg, PipelineConfig) else "-",
               "run name": reads.run.name or "-",
               "written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    report = build_report(ladder, targets, reads.budgets, reads.report.profiles, reads.export.cpu_threads, context,
                          dataset.classes, registry, crossval)
    folder = work.child("report")
    paths = write_report(report, work.local / "report")
    work.store.put_dir(work.local / "report", folder)
    best = best_summary(report)
    uris = {kind: f"{folder}/{path.name}" for kind, path in paths.items()}
    log.info("report: %s (best per target: %s)", uris["html"],
             ", ".join(f"{t} {c['variant'] or 'none'}" for t, c in best.items()))
    return ReportArtifact(uri=folder, html_uri=uris["html"], plot_uri=uris["plot"], rows_uri=uris["rows"],
                          table_uri=uris["table"], best=best)


def log_report(stage, record: ReportArtifact, store) -> None:
    """[MLflow] the report's files under `report/`, the best variant per target as tags, its numbers as metrics
    (energy and cost named *_estimate: they come from the profiles, not from a meter)."""
    folder = store.get_dir(record.uri)
    for path in sorted(folder.iterdir()):   # html, table, rows, the Pareto plot, the confusion matrix
        if not path.name.startswith("_"):
            stage.log_artifact(path, "report")
    rows = json.loads((folder / record.rows_uri.rsplit("/", 1)[1]).read_text())
    stage.set_tags({f"headline.{i}": text[:5000] for i, text in enumerate(rows["headlines"])})
    for rung in rows["statistics"]:   # every rung's test top-1 with its 95% interval
        if rung["interval"]:
            stage.log(f"{rung['rung']}.test_top1_ci_low", rung["interval"][0])
            stage.log(f"{rung['rung']}.test_top1_ci_high", rung["interval"][1])
    for target, best in record.best.items():
        stage.set_tags({f"best.{target}": best["variant"] or "none", f"best.{target}.reason": best["reason"][:5000]})
        names = {"top1": "top1", "latency_ms": "latency_ms", "artifact_bytes": "artifact_bytes",
                 "kwh_per_million": "kwh_per_1m_clips_estimate", "usd_per_million": "usd_per_1m_clips_estimate"}
        for key, name in names.items():
            if best.get(key) is not None:
                stage.log(f"best.{target}.{name}", float(best[key]))
    stage.log_dict(record.model_dump(), "artifact.json")


# [Prefect] retries cover I/O only (an MLflow server or object store that blips); `run` is the plain function.
@task(name="report", retries=len(IO_RETRY_DELAYS), retry_delay_seconds=IO_RETRY_DELAYS,
      retry_condition_fn=only_io_errors, **stage_cache(work_dir))
def report_task(cfg: PipelineConfig, dataset: DatasetArtifact, teacher: ModelArtifact, student: ModelArtifact,
                pruned: ModelArtifact, int8: ModelArtifact, targets: list[TargetResult], registry: list[dict],
                parent_run_id: str, crossval: CrossValArtifact | None = None) -> ReportArtifact:
    from vidopt.tracking import stage_run

    with stage_run("report", parent_run_id) as stage:  # [MLflow] nested run holding the report
        record = run(cfg, dataset, teacher, student, pruned, int8, targets, registry, crossval)
        log_report(stage, record, open_store(cfg.run))
    log_run_summary(parent_run_id, {"teacher": teacher, "student": student, "pruned": pruned, "int8": int8},
                    targets)
    return sealed(work_dir(cfg, dataset, teacher, student, pruned, int8, targets, registry, crossval), record)


def run_summary(ladder: dict[str, ModelArtifact], targets: list[TargetResult]) -> dict[str, float]:
    """The numbers a runs table compares: each rung's test top-1, MACs and size, int8's speed-up over its fp32 twin,
    and each verified target's top-1 and latency."""
    summary = {}
    for rung, artifact in ladder.items():
        m = artifact.metrics
        summary |= {f"{rung}.{k}": m[k] for k in ("test_top1_clip", "test_top1_video", "macs", "size_bytes")
                    if k in m}
    int8 = ladder["int8"].metrics
    summary |= {f"int8.{k}": int8[k] for k in ("speedup.b1.t1", "size_ratio") if k in int8}
    for t in targets:
        if t.status == "ok":
            summary |= {f"{t.target}.{k}": v for k, v in (("top1", t.top1), ("latency_ms", t.latency_ms),
                                                           ("artifact_bytes", t.artifact_bytes)) if v is not None}
    return {k: float(v) for k, v in summary.items()}


def log_run_summary(parent_run_id: str, ladder: dict[str, ModelArtifact], targets: list[TargetResult]) -> None:
    """[MLflow] the summary on the parent run, so the experiment's runs table compares pipeline runs."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    MlflowClient().log_batch(parent_run_id, metrics=[Metric(k, v, now, 0)
                                                     for k, v in run_summary(ladder, targets).items()])


if __name__ == "__main__":
    from tasks.dag import run_stage_standalone

    run_stage_standalone("report")
