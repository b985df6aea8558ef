"""Registration stage: every verified target becomes a new version of its registered model `vidopt-<target>` with
alias `challenger`; alias `champion` moves to it only when the promotion gates of vidopt/registry.py all pass.

Versions point at the artifact the export stage logged in its per-target MLflow run, so with a remote tracking server
whose artifact store is S3 the registry points into S3. Tags carry data version, config hash, code version, the
runtime that verified the artifact, its numbers and every gate's outcome.
"""
from __future__ import annotations

import hashlib
import json
import logging

from prefect import task

from tasks.caching import sealed, stage_cache
from tasks.retry import IO_RETRY_DELAYS, only_io_errors
from vidopt.artifacts import DatasetArtifact, ModelArtifact, TargetResult
from vidopt.config import BudgetConfig, PipelineConfig
from vidopt.registry import Champion, promotion_gates, video_top1
from vidopt.stages import StageReads, StageWork, artifact_hash, stage_work
from vidopt.stats import majority_rate, unpack_correct, wilson_interval
from vidopt.tracking import code_version

log = logging.getLogger("vidopt.register")
CHALLENGER, CHAMPION = "challenger", "champion"
TAG_LIMIT = 5000   # characters an MLflow tag value holds
DECISIONS = "decisions.json"


def model_name(target: str) -> str:
    return f"vidopt-{target}"


# Where tasks/export.py logged a result, not what was verified: an export task run again after Prefect's results were
# lost logs the same verified results under new MLflow runs, and that is no reason to register new versions.
LOGGED_AT = ("mlflow_run_id", "mlflow_artifact_uri", "mlflow_model_uri", "mlflow_model_id")


class Reads(StageReads):
    budgets: BudgetConfig


def work_dir(cfg: PipelineConfig | Reads, dataset: DatasetArtifact, teacher: ModelArtifact,
             targets: list[TargetResult]) -> StageWork:
    verified = [t.model_copy(update={"extra": {k: v for k, v in t.extra.items() if k not in LOGGED_AT}})
                for t in targets]
    results = json.dumps([t.model_dump(mode="json") for t in verified], sort_keys=True)
    return stage_work(Reads.of(cfg), "register", [artifact_hash(dataset), artifact_hash(teacher),
                                                  hashlib.sha256(results.encode()).hexdigest()])


def run(cfg: PipelineConfig, dataset: DatasetArtifact, teacher: ModelArtifact,
        targets: list[TargetResult]) -> list[dict]:
    """One decision per target: {target, model, version (None when not registered), champion, gates, reason}. The
    config hash tagged on each version is the whole run's (what produced it), so this stage reads it whole."""
    work = work_dir(cfg, dataset, teacher, targets)
    if work.store.has(work.child(DECISIONS)):  # registered already: registering again would add versions
        return json.loads(work.store.read_text(work.child(DECISIONS)))
    teacher_top1 = teacher.metrics.get("test_top1_video", teacher.metrics.get("test_top1_clip"))
    tags = {"data_version": dataset.data_version, "config_hash": cfg.config_hash(), "code_version": code_version()}
    split = "test" if any(c.get("test") for c in dataset.class_counts.values()) else "val"
    counts = {label: c.get(split, 0) for label, c in dataset.class_counts.items()}
    majority = majority_rate(counts) if sum(counts.values()) else None
    decisions = [register_target(result, teacher_top1, cfg, tags, majority) for result in targets]
    work.store.write_text(work.child(DECISIONS), json.dumps(decisions, indent=2))
    return decisions


def register_target(result: TargetResult, teacher_top1: float | None, cfg: PipelineConfig,
                    tags: dict[str, str], majority: tuple[str, float] | None = None) -> dict:
    import mlflow
    from mlflow import MlflowClient

    name = model_name(result.target)
    decision = {"target": result.target, "model": name, "version": None, "champion": False, "gates": []}
    source = result.extra.get("mlflow_artifact_uri")
    if result.status != "ok" or not source:
        decision["reason"] = f"not registered: {result.status} {result.reason}".strip()
        log.info("register: %s %s", name, decision["reason"])
        return decision
    client = MlflowClient()
    _ensure_registered_model(client, name, result.target)
    champion = _champion(client, name)
    gates = promotion_gates(result, teacher_top1, cfg.budgets, champion, majority)
    numbers = {k: str(v) for k, v in {"top1": video_top1(result), "latency_ms": result.latency_ms,
                                      "artifact_bytes": result.artifact_bytes}.items() if v is not None}
    if result.correct:   # the next challenger is tested against this version on the same clips
        correct = unpack_correct(result.correct)
        numbers.update(top1_ci="{:.4f}-{:.4f}".format(*wilson_interval(int(correct.sum()), len(correct))),
                       test_videos=str(len(correct)), eval_clips=result.eval_clips)
        if len(result.correct) <= TAG_LIMIT:
            numbers["correct"] = result.correct
    gate_tags = {f"gate.{g.name}": f"{'pass' if g.passed else 'fail'}: {g.detail}"[:5000] for g in gates}
    promoted = all(g.passed for g in gates)
    model_id = result.extra.get("mlflow_model_id")
    if model_id:   # an MLflow model (vidopt/pyfunc.py): the version loads with mlflow.pyfunc and serves
        source = mlflow.get_logged_model(model_id).artifact_location
    version = client.create_model_version(
        name, source, run_id=result.extra.get("mlflow_run_id"), model_id=model_id,
        tags={**tags, **numbers, **gate_tags, "runtime": result.runtime, "target": result.target,
              "promoted": str(promoted).lower()},
        description=f"{result.target} artifact verified on {result.runtime}").version
    client.set_registered_model_alias(name, CHALLENGER, version)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    failed = [f"{g.name} ({g.detail})" for g in gates if not g.passed]
    decision.update(version=version, champion=promoted, gates=[g.__dict__ for g in gates],
                    reason="all gates passed" if promoted else "kept the champion: failed " + "; ".join(failed))
    log.info("register: %s version %s is %s: %s", name, version,
             "the champion" if promoted else "a challenger", decision["reason"])
    return decision


def _ensure_registered_model(client, name: str, target: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description=f"vidopt student for the {target} target. The artifact is "
                                       "the target's own format (see the version's runtime tag), not an MLflow "
                                       "flavour; alias `champion` passed every promotion gate.")
    except MlflowException as err:
        if "already exists" not in str(err).lower():
            raise


def _champion(client, name: str) -> Champion | None:
    """The current champion as its version's tags recorded it, or None."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    top1 = version.tags.get("top1")
    return Champion(version.version, float(top1) if top1 is not None else None, version.tags.get("correct", ""),
                    version.tags.get("eval_clips", ""))


# [Prefect] cached on its inputs: an unchanged re-run registers nothing new.
@task(name="register", retries=len(IO_RETRY_DELAYS), retry_delay_seconds=IO_RETRY_DELAYS,
      retry_condition_fn=only_io_errors, **stage_cache(work_dir))
def register_task(cfg: PipelineConfig, dataset: DatasetArtifact, teacher: ModelArtifact, targets: list[TargetResult],
                  parent_run_id: str) -> list[dict]:
    from vidopt.tracking import stage_run

    with stage_run("register", parent_run_id) as stage:  # [MLflow] nested run with the decisions
        decisions = run(cfg, dataset, teacher, targets)
        for d in decisions:
            if d["version"] is not None:
                stage.log(f"{d['target']}.champion", float(d["champion"]))
        stage.log_dict({"decisions": decisions}, "decisions.json")
    return sealed(work_dir(cfg, dataset, teacher, targets), decisions)

