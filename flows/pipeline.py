"""The vidopt pipeline as a Prefect flow: it only orders stage tasks and passes their artifact records along.

    vidopt run --profile demo
"""
from __future__ import annotations

from prefect import flow

from tasks.ingest import ingest_task
from vidopt.config import PipelineConfig
from vidopt.tracking import pipeline_run


# [Prefect] the config is the flow's one parameter, so the UI renders PipelineConfig as a form.
@flow(name="vidopt-pipeline", log_prints=True)
def pipeline(config: PipelineConfig) -> dict:
    with pipeline_run(config) as parent:  # [MLflow] parent run; each stage opens a nested run under it
        parent_id = parent.run.info.run_id
        dataset = ingest_task(config, parent_id)
    return {"mlflow_run_id": parent_id, "dataset": dataset.model_dump()}
