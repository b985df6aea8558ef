"""The vidopt pipeline as a Prefect flow: it walks the stage order of vidopt/dag.py, calling each stage's task and
passing artifact records along. Every stage after ingestion is cached on its inputs' content hashes and the config it
reads (tasks/caching.py).

    vidopt run --profile demo
"""
from __future__ import annotations

import importlib
import logging

from prefect import flow

from flows.summary import publish_run_artifact
from vidopt.config import PipelineConfig, load_config
from vidopt.dag import LADDER, STAGES
from vidopt.tracking import pipeline_run


def route_vidopt_logs() -> None:
    """vidopt's INFO lines (epochs, accuracies, targets) into the flow run's logs in the Prefect UI, however the run
    was started (`vidopt run`, `vidopt serve`, a worker of infra/prefect.yaml): a flow-run process configures no
    logging of its own, so they would stop at Python's WARNING default."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger("vidopt")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):   # PREFECT_LOGGING_EXTRA_LOGGERS adds one
        logger.addHandler(APILogHandler())


def stage_task(name: str):
    """The Prefect task of a stage: tasks/<name>.py's <name>_task."""
    return getattr(importlib.import_module(f"tasks.{name}"), f"{name}_task")


# [Prefect] the config is the flow's one parameter, so the UI renders PipelineConfig as a form.
@flow(name="vidopt-pipeline", log_prints=True)
def pipeline(config: PipelineConfig) -> dict:
    return run_pipeline(config)


# [Prefect] the same flow named by a profile and overrides: what infra/prefect.yaml's deployments pass, so they
# follow flows/configs/ instead of copying a profile.
@flow(name="vidopt-pipeline", log_prints=True)
def pipeline_from_profile(profile: str = "demo", overrides: list[str] | None = None) -> dict:
    """profile: a profile in flows/configs/ or a .yaml path; overrides: key.sub=value, as on the command line."""
    return run_pipeline(load_config(profile, overrides or []))


def run_pipeline(config: PipelineConfig) -> dict:
    """Every stage in the order of vidopt/dag.py, inside one parent MLflow run."""
    route_vidopt_logs()
    with pipeline_run(config) as parent:  # [MLflow] parent run; each stage opens a nested run under it
        run_id = parent.run.info.run_id
        out: dict = {}
        for stage in STAGES:
            task, inputs = stage_task(stage.name), {n: out[n] for n in stage.needs}
            if stage.each:   # one task per item (each export target), submitted together, results in order
                section, field = stage.each.split(".")
                argument = field.removesuffix("s")
                futures = [task.submit(config, **inputs, **{argument: item}, parent_run_id=run_id)
                           for item in getattr(getattr(config, section), field)]
                out[stage.gives] = [future.result() for future in futures]
            else:
                out[stage.gives] = task(config, **inputs, parent_run_id=run_id)
    result = {"mlflow_run_id": run_id, "dataset": out["dataset"].model_dump(),
              "ladder": {name: out[name].model_dump() for name in LADDER},
              "targets": [t.model_dump() for t in out["targets"]], "registry": out["registry"],
              "report": out["report"].model_dump()}
    publish_run_artifact(config, result)   # [Prefect] the run's summary on its page in the UI
    return result
