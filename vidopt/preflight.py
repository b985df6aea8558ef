"""Checks of every external service a run needs, made before any work starts: each fails within seconds with one
line naming the endpoint and what to check, instead of minutes of retries and tracebacks halfway through a run.
"""
from __future__ import annotations

import os
from pathlib import Path

from vidopt.config import PipelineConfig, redact
from vidopt.errors import ServiceError
from vidopt.storage import StorageError, is_s3, s3_client, s3_errors, split_s3

TIMEOUT_S = 5.0   # per request: a healthy local or cloud service answers in well under a second


def check_run(cfg: PipelineConfig) -> None:
    """Everything `vidopt run` reaches: the data source, the artifact store, MLflow and Prefect."""
    check_source(cfg)
    check_store(cfg)
    check_tracking(cfg.tracking.uri)
    check_prefect_api()


def check_source(cfg: PipelineConfig) -> None:
    data = cfg.data
    if is_s3(data.source):
        bucket, prefix = split_s3(data.source)
        with s3_errors(data.source, data.s3_endpoint_url):
            s3_client(data.s3_endpoint_url, data.s3_region).list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        return
    path = Path(data.source)
    if path.is_dir() or (not path.exists() and data.sample_if_missing and cfg.is_project_bucket()):
        return
    what = "is not a folder" if path.exists() else "does not exist"
    raise StorageError(f"data.source {data.source} {what} (a folder or s3://bucket/prefix of <label>/<video> files; "
                       "`vidopt data sample --out DIR` writes the sample dataset)")


def check_store(cfg: PipelineConfig) -> None:
    root = cfg.run.artifact_root
    if not root or not is_s3(root):
        return
    bucket = split_s3(root)[0]
    with s3_errors(f"run.artifact_root {root}", cfg.run.store_endpoint_url):
        s3_client(cfg.run.store_endpoint_url, cfg.run.store_region).head_bucket(Bucket=bucket)


def check_tracking(uri: str | None) -> None:
    """An MLflow tracking server answers /health, and its API takes the credentials MLflow's variables give."""
    if not uri or not uri.startswith(("http://", "https://")):
        return   # a local store (sqlite, a folder): MLflow opens it in-process
    import httpx

    shown = redact(uri)
    base = uri.rstrip("/")
    try:
        health = httpx.get(f"{base}/health", timeout=TIMEOUT_S)
        api = httpx.get(f"{base}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                        timeout=TIMEOUT_S, **_mlflow_auth())
    except httpx.HTTPError as err:
        raise ServiceError(f"tracking.uri {shown}: the MLflow tracking server cannot be reached "
                           f"({type(err).__name__}: {err}); start it (`mlflow server`), or fix tracking.uri") from None
    if api.status_code in (401, 403):
        raise ServiceError(f"tracking.uri {shown}: the MLflow server refused the credentials (HTTP {api.status_code}); "
                           "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN")
    if health.status_code >= 400 and api.status_code >= 400:
        raise ServiceError(f"tracking.uri {shown}: not an MLflow tracking server (HTTP {health.status_code} on "
                           f"/health, {api.status_code} on its API); check the URL")


def _mlflow_auth() -> dict:
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"headers": {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    return {"auth": (user, password or "")} if user else {}


def check_prefect_api() -> None:
    """A Prefect server named by PREFECT_API_URL answers /health (none named: Prefect starts its own)."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return
    import httpx

    try:
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=TIMEOUT_S)
    except httpx.HTTPError as err:
        raise ServiceError(f"PREFECT_API_URL {redact(url)}: the Prefect server cannot be reached "
                           f"({type(err).__name__}: {err}); start it (`prefect server start`), or unset "
                           "PREFECT_API_URL to run on a temporary local one") from None
    if response.status_code >= 400:
        raise ServiceError(f"PREFECT_API_URL {redact(url)}: /health answered HTTP {response.status_code}; check the "
                           "URL (it ends in /api) and the server's credentials (PREFECT_API_KEY)")
