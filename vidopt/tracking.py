"""Metric logging behind one small interface; MLflow is its implementation.

A pipeline run is a parent MLflow run; each stage logs into a nested run. The default store is a sqlite file and a local
artifact folder inside the project dir, so nothing needs a server.
"""
from __future__ import annotations

import json
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Protocol

from vidopt import __version__
from vidopt.config import PipelineConfig, flatten, redact


class MetricLogger(Protocol):
    def log(self, name: str, value: float, step: int | None = None) -> None: ...
    def log_config(self, cfg: PipelineConfig) -> None: ...
    def log_dict(self, payload: dict[str, Any], artifact_file: str) -> None: ...
    def close(self) -> None: ...


EXPERIMENT_KIND = "mlflow.experimentKind"


def default_tracking_uri(project_dir: str | Path) -> str:
    return f"sqlite:///{(Path(project_dir) / 'mlflow.db').resolve()}"


def code_version() -> str:
    """Git commit of the checkout when there is one (marked -dirty with local edits), else the package version."""
    repo = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        return __version__


class MLflowLogger:
    """MetricLogger over an active MLflow run (mlflow's fluent API keeps the run stack)."""

    def __init__(self, run):
        self.run = run

    def log(self, name: str, value: float, step: int | None = None) -> None:
        import mlflow

        mlflow.log_metric(name, value, step=step)

    def log_config(self, cfg: PipelineConfig) -> None:
        import mlflow

        params = flatten(redact(cfg.model_dump(mode="json")))
        # MLflow params are strings of at most 6000 chars; long lists (class names) are stored as JSON text.
        mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in params.items()})
        mlflow.set_tags({"config_hash": cfg.config_hash(), "code_version": code_version()})
        self.log_dict(redact(cfg.model_dump(mode="json")), "config.json")

    def log_dict(self, payload: dict[str, Any], artifact_file: str) -> None:
        import mlflow

        mlflow.log_dict(payload, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        import mlflow

        mlflow.set_tags(tags)

    def close(self) -> None:
        import mlflow

        mlflow.end_run()


def configure_mlflow(cfg: PipelineConfig) -> str:
    """Point MLflow at the configured store (default: project-local sqlite) and pick the experiment."""
    import mlflow

    uri = cfg.tracking.uri or default_tracking_uri(cfg.run.project_dir)
    Path(cfg.run.project_dir).mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None and uri.startswith("sqlite:"):
        # Local store: keep artifacts beside mlflow.db instead of ./mlruns in whatever the cwd is.
        artifacts = (Path(cfg.run.project_dir) / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifacts)
    experiment = mlflow.set_experiment(cfg.tracking.experiment)
    if experiment.tags.get(EXPERIMENT_KIND) is None:   # opens on the runs table, not MLflow's GenAI views
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, "custom_model_development")
    return uri


@contextmanager
def pipeline_run(cfg: PipelineConfig) -> Iterator[MLflowLogger]:
    """The parent MLflow run of one pipeline run."""
    import mlflow

    configure_mlflow(cfg)
    with mlflow.start_run(run_name=cfg.run.name) as run:
        logger = MLflowLogger(run)
        logger.log_config(cfg)
        yield logger


@contextmanager
def stage_run(stage: str, parent_run_id: str) -> Iterator[MLflowLogger]:
    """A nested MLflow run for one stage. The parent is passed explicitly: tasks may run on other threads, and MLflow's
    active-run stack is per thread."""
    import mlflow

    with mlflow.start_run(run_name=stage, parent_run_id=parent_run_id, nested=True) as run:
        mlflow.set_tag("stage", stage)
        yield MLflowLogger(run)


def set_run_tags(run_id: str, tags: dict[str, str]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
