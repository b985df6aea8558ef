"""The vidopt pipeline as a Prefect flow: it walks the stage order of vidopt/dag.py, calling each stage's task and
passing artifact records along. Every stage after ingestion is cached on its inputs' content hashes and the config it
reads (tasks/caching.py); a stage the cache answers gets a child MLflow run linking the run that produced its result.
A run first ends what dead vidopt processes left open (flows/runs.py).

    vidopt run --profile demo
"""
from __future__ import annotations

import importlib
import logging

from prefect import flow

from flows.runs import cancel_if_interrupted, clean_at_start, tag_flow_run
from flows.summary import publish_run_artifact
from vidopt.config import PipelineConfig, load_config
from vidopt.dag import LADDER, STAGES, Stage
from vidopt.preflight import check_run
from vidopt.tracking import find_stage_run, link_cached_stage, pipeline_run, tag_stage_runs

log = logging.getLogger("vidopt.pipeline")


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


# [Prefect] the config is the flow's one parameter, so the UI renders PipelineConfig as a form. SIGTERM and Ctrl-C
# end the run Cancelled, not Crashed.
@flow(name="vidopt-pipeline", log_prints=True, on_crashed=[cancel_if_interrupted])
def pipeline(config: PipelineConfig) -> dict:
    return run_pipeline(config)


# [Prefect] the same flow named by a profile and overrides: what infra/prefect.yaml's deployments pass, so they
# follow flows/configs/ instead of copying a profile.
@flow(name="vidopt-pipeline", log_prints=True, on_crashed=[cancel_if_interrupted])
def pipeline_from_profile(profile: str = "demo", overrides: list[str] | None = None) -> dict:
    """profile: a profile in flows/configs/ or a .yaml path; overrides: key.sub=value, as on the command line."""
    return run_pipeline(load_config(profile, overrides or []))


def run_pipeline(config: PipelineConfig) -> dict:
    """Every stage in the order of vidopt/dag.py, inside one parent MLflow run."""
    route_vidopt_logs()
    check_run(config)   # a deployment's run fails in seconds too, on a missing bucket or an unreachable MLflow
    flow_run_id = tag_flow_run()   # [Prefect] this process owns the flow run: `vidopt runs clean` checks it
    clean_at_start(config)
    with pipeline_run(config) as parent:  # [MLflow] parent run; each stage opens a nested run under it
        run_id = parent.run.info.run_id
        if flow_run_id:   # each names the other
            tag_flow_run(run_id)
            parent.set_tags({"vidopt.prefect_flow_run_id": flow_run_id})
        out: dict = {}
        for stage in STAGES:
            task, inputs = stage_task(stage.name), {n: out[n] for n in stage.needs}
            if stage.each:   # one task per item (each export target), submitted together, results in order
                section, field = stage.each.split(".")
                argument = field.removesuffix("s")
                items = getattr(getattr(config, section), field)
                futures = [task.submit(config, **inputs, **{argument: item}, parent_run_id=run_id) for item in items]
                out[stage.gives] = [future.result() for future in futures]
                key = stage_key(stage, config, inputs)
                for item, future, result in zip(items, futures, out[stage.gives]):
                    record_stage_run(stage.name, key, future.state, run_id, target=item,
                                     run_of_result=result.extra.get("mlflow_run_id"))
            else:
                state = task(config, **inputs, parent_run_id=run_id, return_state=True)
                out[stage.gives] = state.result()
                record_stage_run(stage.name, stage_key(stage, config, inputs), state, run_id)
    result = {"mlflow_run_id": run_id, "dataset": out["dataset"].model_dump(),
              "ladder": {name: out[name].model_dump() for name in LADDER},
              "targets": [t.model_dump() for t in out["targets"]], "registry": out["registry"],
              "report": out["report"].model_dump()}
    publish_run_artifact(config, result)   # [Prefect] the run's summary on its page in the UI
    return result


def stage_key(stage: Stage, config: PipelineConfig, inputs: dict) -> str | None:
    """The stage's key (vidopt/stages.py) from its module's work_dir, as its cache key has it; None for a stage with
    no place of its own (ingest: never cached)."""
    work_dir = getattr(importlib.import_module(f"tasks.{stage.name}"), "work_dir", None)
    return work_dir(config, **inputs).key if work_dir else None


def record_stage_run(stage: str, key: str | None, state, parent_run_id: str, target: str | None = None,
                     run_of_result: str | None = None) -> None:
    """[MLflow] A stage that ran: its runs get the stage key. A stage Prefect's cache answered: a child run linking the
    newest finished run with that key (an export target's result names its run), so the tree holds every stage."""
    if key is None:
        return
    if state.name != "Cached":
        tag_stage_runs(parent_run_id, stage, key, [run_of_result] if run_of_result else None)
        return
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    original = None
    if run_of_result:
        try:
            original = MlflowClient().get_run(run_of_result)
        except MlflowException:   # logged to another store
            pass
    original = original or find_stage_run(stage, key, target)
    if original is None:   # a stage that logs no run (crossval without folds), or one logged before stage keys
        log.info("%s: from Prefect's cache; no MLflow run of key %s to link", stage, key)
        return
    link_cached_stage(parent_run_id, original, key)
