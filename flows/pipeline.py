"""The vidopt pipeline as a Prefect flow: it only orders stage tasks and passes their artifact records along.
Every stage after ingestion is cached on its inputs' content hashes and config sections (tasks/caching.py).

    vidopt run --profile demo
"""
from __future__ import annotations

from prefect import flow

from tasks.distill import distill_task
from tasks.export import export_task
from tasks.ingest import ingest_task
from tasks.prune import prune_task
from tasks.quantize import quantize_task
from tasks.register import register_task
from tasks.report import report_task
from tasks.train_teacher import train_teacher_task
from vidopt.config import PipelineConfig
from vidopt.tracking import pipeline_run


# [Prefect] the config is the flow's one parameter, so the UI renders PipelineConfig as a form.
@flow(name="vidopt-pipeline", log_prints=True)
def pipeline(config: PipelineConfig) -> dict:
    with pipeline_run(config) as parent:  # [MLflow] parent run; each stage opens a nested run under it
        run_id = parent.run.info.run_id
        dataset = ingest_task(config, run_id)
        teacher = train_teacher_task(config, dataset, run_id)
        student = distill_task(config, dataset, teacher, run_id)
        pruned = prune_task(config, dataset, student, teacher, run_id)
        int8 = quantize_task(config, dataset, pruned, run_id)
        targets = export_task(config, dataset, int8, run_id)
        registry = register_task(config, dataset, teacher, targets, run_id)
        ladder = {"teacher": teacher, "student": student, "pruned": pruned, "int8": int8}
        report = report_task(config, dataset, ladder, targets, run_id)
    return {"mlflow_run_id": run_id, "dataset": dataset.model_dump(),
            "ladder": {name: artifact.model_dump() for name, artifact in ladder.items()},
            "targets": [t.model_dump() for t in targets], "registry": registry, "report": report.model_dump()}
