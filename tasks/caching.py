"""[Prefect] stage caching: a stage task's cache key is its stage's place (the content hashes of its input artifacts
and the config it reads, see vidopt/stages.py) plus that place's incarnation id; results persist as JSON in Prefect's
result storage (under PREFECT_HOME, the project dir by default). An unchanged re-run returns every cached stage without
running it; a change to one section re-runs the stages that read it and everything downstream of a changed artifact.
"""
from __future__ import annotations

from typing import Any, Callable

from vidopt.stages import StageWork, stage_incarnation


def stage_cache(work_dir: Callable[..., StageWork]) -> dict[str, Any]:
    """Options for `@task(**stage_cache(work_dir))`; `work_dir` takes the task's parameters but parent_run_id (the
    MLflow parent differs every run and says nothing about the result)."""

    def cache_key(context, parameters: dict[str, Any]) -> str:
        work = work_dir(**{k: v for k, v in parameters.items() if k != "parent_run_id"})
        return f"vidopt-{work.stage}-{work.key}-{stage_incarnation(work)}"

    return {"cache_key_fn": cache_key, "persist_result": True, "result_serializer": "json"}
