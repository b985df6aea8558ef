"""The vidopt pipeline as a Prefect flow: it walks the stage order of vidopt/dag.py, calling each stage's task and
passing artifact records along. Every stage after ingestion is cached on its inputs' content hashes and the config it
reads (tasks/caching.py).

    vidopt run --profile demo
"""
from __future__ import annotations

import importlib

from prefect import flow

from vidopt.config import PipelineConfig
from vidopt.dag import LADDER, STAGES
from vidopt.tracking import pipeline_run


def stage_task(name: str):
    """The Prefect task of a stage: tasks/<name>.py's <name>_task."""
    return getattr(importlib.import_module(f"tasks.{name}"), f"{name}_task")


# [Prefect] the config is the flow's one parameter, so the UI renders PipelineConfig as a form.
@flow(name="vidopt-pipeline", log_prints=True)
def pipeline(config: PipelineConfig) -> dict:
    with pipeline_run(config) as parent:  # [MLflow] parent run; each stage opens a nested run under it
        run_id = parent.run.info.run_id
        out: dict = {}
        for stage in STAGES:
            out[stage.gives] = stage_task(stage.name)(config, **{n: out[n] for n in stage.needs},
                                                      parent_run_id=run_id)
    return {"mlflow_run_id": run_id, "dataset": out["dataset"].model_dump(),
            "ladder": {name: out[name].model_dump() for name in LADDER},
            "targets": [t.model_dump() for t in out["targets"]], "registry": out["registry"],
            "report": out["report"].model_dump()}
