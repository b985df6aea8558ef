"""[Prefect] stage caching: a stage task's cache key is its stage's place (the content hashes of its input artifacts
and the config it reads, see vidopt/stages.py) plus that place's incarnation id; results persist as JSON in Prefect's
result storage (under PREFECT_HOME, the project dir by default). An unchanged re-run returns every cached stage without
running it; a change to one section re-runs the stages that read it and everything downstream of a changed artifact.

A cached result is served only while the outputs it names still hash as the stage sealed them (vidopt/stages.py
seal_outputs): a damaged or deleted output gets a fresh incarnation, so the stage runs again and makes it anew.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from vidopt.stages import NOT_SEALED, StageWork, outputs_problem, seal_outputs, stage_incarnation, unseal

log = logging.getLogger("vidopt.caching")


def stage_cache(work_dir: Callable[..., StageWork]) -> dict[str, Any]:
    """Options for `@task(**stage_cache(work_dir))`; `work_dir` takes the task's parameters but parent_run_id (the
    MLflow parent differs every run and says nothing about the result)."""

    def cache_key(context, parameters: dict[str, Any]) -> str:
        work = work_dir(**{k: v for k, v in parameters.items() if k != "parent_run_id"})
        return f"vidopt-{work.stage}-{work.key}-{verified_incarnation(work)}"

    return {"cache_key_fn": cache_key, "persist_result": True, "result_serializer": "json"}


def verified_incarnation(work: StageWork, part: str = "") -> str:
    """The place's incarnation id once its sealed outputs check out; a new one (a cache miss) when they do not."""
    problem = outputs_problem(work, part)
    if problem is not None:
        if problem != NOT_SEALED:
            log.warning("%s: a cached output is damaged (%s); running the stage again", work.stage, problem)
        unseal(work, part)
    return stage_incarnation(work)


def sealed(work: StageWork, result, part: str = ""):
    """`result`, after sealing the outputs it names (the task's last step: what the cache key checks next time)."""
    seal_outputs(work, result, part)
    return result
