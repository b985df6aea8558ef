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
from pathlib import Path

from prefect import task

from tasks.caching import stage_cache
from tasks.retry import IO_RETRY_DELAYS, only_io_errors
from vidopt.artifacts import DatasetArtifact, ModelArtifact, ReportArtifact, TargetResult
from vidopt.config import PipelineConfig
from vidopt.report import best_summary, build_report, write_report
from vidopt.stages import artifact_hash, stage_dir

log = logging.getLogger("vidopt.report")
SECTIONS = ["budgets", "report", "export"]  # export: cpu_threads picks which of the ladder's latencies are shown


def work_dir(cfg: PipelineConfig, dataset: DatasetArtifact, ladder: dict[str, ModelArtifact],
             targets: list[TargetResult]) -> Path:
    results = json.dumps([t.model_dump(mode="json") for t in targets], sort_keys=True)
    inputs = [artifact_hash(dataset), *(f"{name}:{a.weights_sha256}" for name, a in ladder.items()),
              hashlib.sha256(results.encode()).hexdigest()]
    return stage_dir(cfg, "report", SECTIONS, inputs)


def run(cfg: PipelineConfig, dataset: DatasetArtifact, ladder: dict[str, ModelArtifact],
        targets: list[TargetResult]) -> ReportArtifact:
    """`ladder`: {"teacher", "student", "pruned", "int8"} artifacts; `targets`: the export stage's results."""
    work = work_dir(cfg, dataset, ladder, targets)
    context = {"data version": dataset.data_version, "classes": str(len(dataset.classes)),
               "config hash": cfg.config_hash(), "run name": cfg.run.name or "-",
               "written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    report = build_report(ladder, targets, cfg.budgets, cfg.report.profiles, cfg.export.cpu_threads, context)
    paths = write_report(report, work)
    best = best_summary(report)
    log.info("report: %s (best per target: %s)", paths["html"],
             ", ".join(f"{t} {c['variant'] or 'none'}" for t, c in best.items()))
    return ReportArtifact(uri=str(work), html_uri=str(paths["html"]), plot_uri=str(paths["plot"]),
                          rows_uri=str(paths["rows"]), table_uri=str(paths["table"]), best=best)


def log_report(stage, record: ReportArtifact) -> None:
    """[MLflow] the report's files under `report/`, the best variant per target as tags, its numbers as metrics
    (energy and cost named *_estimate: they come from the profiles, not from a meter)."""
    for uri in (record.html_uri, record.plot_uri, record.rows_uri, record.table_uri):
        stage.log_artifact(uri, "report")
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
def report_task(cfg: PipelineConfig, dataset: DatasetArtifact, ladder: dict[str, ModelArtifact],
                targets: list[TargetResult], parent_run_id: str) -> ReportArtifact:
    from vidopt.tracking import stage_run

    with stage_run("report", parent_run_id) as stage:  # [MLflow] nested run holding the report
        record = run(cfg, dataset, ladder, targets)
        log_report(stage, record)
    return record


def _standalone(cfg: PipelineConfig) -> ReportArtifact:
    from tasks import distill, export, ingest, prune, quantize, train_teacher

    dataset = ingest.run(cfg)
    teacher = train_teacher.run(cfg, dataset)
    student = distill.run(cfg, dataset, teacher)
    pruned = prune.run(cfg, dataset, student, teacher)
    int8 = quantize.run(cfg, dataset, pruned)
    ladder = {"teacher": teacher, "student": student, "pruned": pruned, "int8": int8}
    return run(cfg, dataset, ladder, export.run(cfg, dataset, int8))


if __name__ == "__main__":
    from vidopt.config import run_stage_standalone

    run_stage_standalone(_standalone)
