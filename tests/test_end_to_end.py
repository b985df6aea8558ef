"""End to end on 127.0.0.1 (issue 5, item 7): clips put into a moto S3 bucket reach `vidopt listen` through the bucket's
S3 -> SQS notifications; its event starts a run of `vidopt serve`'s on-new-data deployment on a real Prefect server; the
run completes and registers a new `vidopt-cpu` version in a real MLflow server whose artifact store is that bucket.

Every server and CLI is its own process, as in a deployment. Only the CPU target is exported: it is the one whose export
and verification take seconds (onnxruntime int8); the other targets have their own tests (tests/tasks/test_export.py),
and here they would only add minutes of hls4ml / torch-xla work to a test about the wiring.

The MLflow server proxies artifacts (clients need no S3 credentials), so a registered version's source is
`mlflow-artifacts:/<path>`, which the server stores at s3://<bucket>/mlartifacts/<path>; the test reads it there from
moto directly.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

import boto3
import httpx
import pytest

from tests.conftest import MARKER_SECRET, files_holding, log_tail, start_in_own_group, stop_group
from tests.flows.test_serve import automations_of, cancel_runs, read_deployment, runs_of, wait_for
from vidopt.config import PipelineConfig, load_config
from vidopt.listen import state_path_for

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENT = "vidopt-e2e"
PREFIX = "clips"
TARGET = "cpu"
START_BAR_S = 10.0  # issue 5: a put starts a run within 10 s (printed; the waits below allow slack on a busy box)
RUN_TIMEOUT_S = 420  # the tiny pipeline: ~20 s on 2 idle cores, ~90 s beside another job; past this it hangs
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def s3_location(mlflow_artifact_uri: str, artifacts_destination: str) -> tuple[str, str]:
    """(bucket, key) where the MLflow server keeps `mlflow-artifacts:/<path>`: <artifacts_destination>/<path>."""
    scheme, _, path = mlflow_artifact_uri.partition(":")
    assert scheme == "mlflow-artifacts", mlflow_artifact_uri
    bucket, _, root = artifacts_destination[len("s3://"):].partition("/")
    return bucket, f"{root}/{path.lstrip('/')}"


@pytest.fixture
def notified_bucket(mlflow_server):
    """The MLflow server's bucket, sending ObjectCreated notifications of every key to a fresh SQS queue (so the
    listener also hears of the artifacts MLflow writes there, outside its prefix)."""
    s3, sqs = boto3.client("s3"), boto3.client("sqs")
    queue_url = sqs.create_queue(QueueName=f"{DEPLOYMENT}-{time.time_ns()}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(Bucket=mlflow_server.bucket, NotificationConfiguration={
        "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]})
    yield mlflow_server.bucket, queue_url
    s3.put_bucket_notification_configuration(Bucket=mlflow_server.bucket, NotificationConfiguration={})


@pytest.fixture
def services(prefect_server, moto_server, mlflow_server, notified_bucket, tmp_path):
    """`vidopt serve` and `vidopt listen` (SQS mode) as separate processes, both ready: the deployments and their
    triggers are on the Prefect server, and the listener has made its first pass. Yields (config, serve log, Prefect API
    client, on-new-data deployment)."""
    bucket, queue_url = notified_bucket
    overrides = [f"run.project_dir={tmp_path / 'project'}", f"data.source=s3://{bucket}/{PREFIX}",
                 f"data.s3_endpoint_url={moto_server}", f"tracking.uri={mlflow_server.url}",
                 "tracking.experiment=vidopt-e2e", f"export.targets=[{TARGET}]", f"serve.deployment={DEPLOYMENT}",
                 "serve.cron=null",  # no scheduled run to race the event's
                 "serve.debounce_s=10",  # Prefect's smallest quiet window: the burst's 2nd run comes soon
                 f"listen.sqs_queue_url={queue_url}"]
    cfg = load_config("tiny", overrides)
    # os.environ holds the moto server's AWS_* settings, which the S3 and SQS clients of both processes use.
    logs = {name: tmp_path / f"{name}.log" for name in ("serve", "listen")}
    procs = {name: start_in_own_group(
        [sys.executable, "-m", "flows.cli", name, "--profile", "tiny", *overrides], logs[name], cwd=REPO,
        env={**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / f"prefect-{name}")})
        for name in ("serve", "listen")}
    api = httpx.Client(base_url=prefect_server, timeout=30)
    names = [f"{DEPLOYMENT}-scheduled", f"{DEPLOYMENT}-on-new-data"]

    def ready():
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"vidopt {name} exited ({proc.returncode}); its log ends:\n{log_tail(logs[name])}")
        deployments = [read_deployment(api, name) for name in names]
        served = all(deployments) and automations_of(api, deployments[1]["id"])
        return deployments if served and state_path_for(cfg).exists() else None

    try:
        try:
            deployments = wait_for("vidopt serve to register and vidopt listen to start", ready, 120, every_s=1)
        except AssertionError as err:
            raise AssertionError(f"{err}\nserve log:\n{log_tail(logs['serve'])}\nlisten log:\n"
                                 f"{log_tail(logs['listen'])}") from None
        yield cfg, logs["serve"], api, deployments[1]
    finally:
        try:
            for deployment in filter(None, (read_deployment(api, name) for name in names)):
                cancel_runs(api, deployment["id"])  # so the runner starts nothing more while it stops
        finally:
            stop_group(procs["listen"], signal.SIGINT)  # Ctrl-C: the way to stop both
            stop_group(procs["serve"], signal.SIGINT)  # the runner kills its flow-run processes
            api.close()


def flow_run_state(api: httpx.Client, run_id: str) -> dict:
    return api.get(f"/flow_runs/{run_id}").json()


def first_state_after_scheduled(api: httpx.Client, run_id: str) -> dict | None:
    """The state the serving runner gave the run when it picked it up (Pending), or None while it waits."""
    states = sorted(api.get("/flow_run_states/", params={"flow_run_id": run_id}).json(), key=lambda s: s["timestamp"])
    return next((s for s in states if s["type"] != "SCHEDULED"), None)


def arrival_events(api: httpx.Client, cfg: PipelineConfig) -> list[dict]:
    """The stored `vidopt.data.arrived` events about cfg.data.source."""
    return api.post("/events/filter", json={"filter": {
        "event": {"name": [cfg.serve.event]}, "resource": {"id": [f"vidopt.source.{cfg.data.source}"]}},
        "limit": 50}).json()["events"]


def event_keys(events: list[dict]) -> list[str]:
    return sorted(k for e in events for k in e["payload"]["keys"])


def seconds_since(start: datetime, iso: str) -> float:
    return (datetime.fromisoformat(iso) - start).total_seconds()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.integration
def test_new_clips_in_the_bucket_start_a_run_that_registers_a_model_version(
        services, mlflow_server, notified_bucket, sample_dir):
    from mlflow import MlflowClient

    from vidopt.data import data_version

    cfg, serve_log, api, on_new_data = services
    bucket, _ = notified_bucket
    registry = MlflowClient(tracking_uri=mlflow_server.url)
    model = f"vidopt-{TARGET}"
    versions_before = {v.version for v in registry.search_model_versions(f"name='{model}'")}
    s3 = boto3.client("s3")

    clips = {path.relative_to(sample_dir).as_posix(): path.read_bytes() for path in sorted(sample_dir.rglob("*.mp4"))}
    assert len(clips) >= 16
    first_put = datetime.now(timezone.utc)
    for key, body in clips.items():
        s3.put_object(Bucket=bucket, Key=f"{PREFIX}/{key}", Body=body)
    put_seconds = (datetime.now(timezone.utc) - first_put).total_seconds()

    # 1. The first put starts a run of the on-new-data deployment within 10 s: created by the trigger on the
    #    listener's event, picked up by the serving runner. The listener's events carried exactly the clips put.
    run = wait_for("a run of the on-new-data deployment", lambda: runs_of(api, on_new_data["id"]) or None,
                   START_BAR_S + 10)[0]
    picked_up = wait_for("the runner to pick the run up", lambda: first_state_after_scheduled(api, run["id"]), 30)
    events = wait_for("the listener's events to be stored",  # the server stores events after its triggers saw them
                      lambda: (e := arrival_events(api, cfg)) and len(event_keys(e)) >= len(clips) and e, 30)
    assert event_keys(events) == sorted(clips)
    first_event = min(events, key=lambda e: e["occurred"])
    timings = (f"{len(clips)} puts took {put_seconds:.1f} s; from the first put: listener's event "
               f"{seconds_since(first_put, first_event['occurred']):.1f} s, received by the server "
               f"{seconds_since(first_put, first_event['received']):.1f} s, run created "
               f"{seconds_since(first_put, run['created']):.1f} s, {picked_up['name']} "
               f"{seconds_since(first_put, picked_up['timestamp']):.1f} s")
    print(timings)  # the 10 s bar is a speed target: measured and printed here, not asserted (see the README)
    assert run["created_by"]["type"] == "AUTOMATION" and "first" in run["created_by"]["display_value"], run
    assert run["parameters"]["config"]["data"]["source"] == cfg.data.source

    # 2. It completes.
    started = time.monotonic()
    final = wait_for("the run to finish", lambda: (s := flow_run_state(api, run["id"]))["state_type"] in FINAL_STATES
                     and s, RUN_TIMEOUT_S, every_s=2)
    print(f"run finished in {time.monotonic() - started:.0f} s after it was picked up: {final['state_name']}")
    assert final["state_type"] == "COMPLETED", f"{final['state_name']}; serve log ends:\n{log_tail(serve_log)}"
    # The burst gave 2 runs, not 64: one at its first event and one once it was over (10 s quiet), which waited for
    # the first to end (one run at a time). The second finds nothing new: cancelled here to spare the cores.
    runs = wait_for("the run of the burst's end", lambda: (r := runs_of(api, on_new_data["id"]))[1:] and r, 30)
    assert len(runs) == 2 and runs[0]["id"] == run["id"], [(r["created"], r["state_name"]) for r in runs]
    second = runs[1]
    cancel_runs(api, on_new_data["id"])
    second_running = [s["timestamp"] for s in api.get("/flow_run_states/", params={"flow_run_id": second["id"]}).json()
                      if s["type"] == "RUNNING"]
    assert all(seconds_since(datetime.fromisoformat(final["end_time"]), t) >= 0 for t in second_running), \
        (second_running, final["end_time"])

    # 3. MLflow, asked through the server: a new version, alias challenger, tagged with the data version of the clips.
    [version] = [v for v in registry.search_model_versions(f"name='{model}'") if v.version not in versions_before]
    assert registry.get_model_version_by_alias(model, "challenger").version == version.version
    assert version.tags["target"] == TARGET and version.tags["runtime"].startswith("onnxruntime")
    export_run = registry.get_run(version.run_id)                          # export-<target>, a child of the run
    pipeline_run = registry.get_run(export_run.data.tags["mlflow.parentRunId"])
    data_version_tag = version.tags["data_version"]
    assert data_version_tag == export_run.data.tags["data_version"] == pipeline_run.data.tags["data_version"]
    assert (datetime.fromisoformat(final["start_time"]).timestamp() * 1000 <= pipeline_run.info.start_time
            <= datetime.fromisoformat(final["end_time"]).timestamp() * 1000), "the MLflow run is not this flow run's"
    [ingest_run] = registry.search_runs([pipeline_run.info.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{pipeline_run.info.run_id}' and attributes.run_name = 'ingest'"))

    # 4. The artifacts are in the moto bucket, where the server's artifact store maps the registry's source.
    #    The manifest ingest logged lists every clip put, with its content; its data version is the version's tag.
    manifest_bucket, manifest_key = s3_location(f"{ingest_run.info.artifact_uri}/dataset/manifest.jsonl",
                                                mlflow_server.artifacts_destination)
    manifest = s3.get_object(Bucket=manifest_bucket, Key=manifest_key)["Body"].read().decode()
    rows = [json.loads(line) for line in manifest.splitlines() if line.strip()]
    assert {r["key"]: r["sha256"] for r in rows} == {key: sha256_bytes(body) for key, body in clips.items()}
    assert data_version(rows) == data_version_tag
    #    The run's artifact: the CPU package, as many bytes as registered, and it runs.
    artifact_bucket, artifact_key = s3_location(f"{export_run.info.artifact_uri}/artifact/cpu_int8.tar.gz",
                                                mlflow_server.artifacts_destination)
    package = s3.get_object(Bucket=artifact_bucket, Key=artifact_key)["Body"].read()
    assert len(package) == int(version.tags["artifact_bytes"])
    classes = len({r["label"] for r in rows})
    assert_cpu_package_runs(package, classes=classes)
    #    The version itself is an MLflow model, fetched through the server from the bucket, and it runs.
    import mlflow
    import numpy as np

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server.url)
    try:
        loaded = mlflow.pyfunc.load_model(f"models:/{model}/{version.version}")
    finally:
        mlflow.set_tracking_uri(previous)
    shape = loaded.metadata.get_input_schema().inputs[0].shape                # (-1, T, H, W, 3)
    assert loaded.predict(np.zeros((2, *shape[1:]), np.uint8)).shape == (2, classes)

    # 5. The S3 secret every process had in its environment is in no file any of them wrote: this test's folders
    #    (project, Prefect homes, logs), the servers' (pytest's temp root for this run), Ray's, the bucket.
    roots = [Path(cfg.run.project_dir).parents[1], Path("/tmp/ray"), REPO / ".vidopt-tiny"]
    assert files_holding(MARKER_SECRET, [r for r in roots if r.exists()]) == []
    objects = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert objects and not [o["Key"] for o in objects
                            if MARKER_SECRET.encode() in s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()]


def assert_cpu_package_runs(package: bytes, classes: int) -> None:
    """The CPU target's .tar.gz: runtime.json names the ONNX file, the runtime it ships on and the input's shape and
    dtype (uint8 pixels for the int8 file); on that runtime the file gives one logit per class."""
    import tempfile

    import numpy as np

    from vidopt.runtimes import Session

    with tempfile.TemporaryDirectory() as scratch, tarfile.open(fileobj=io.BytesIO(package)) as tar:
        tar.extractall(scratch, filter="data")
        [described] = Path(scratch).rglob("runtime.json")
        runtime = json.loads(described.read_text())
        session = Session(runtime["runtime"], described.parent / runtime["file"])
        x = np.zeros([1, *runtime["input"]["shape"]], dtype=runtime["input"]["dtype"])  # [1, 3, T, H, W]
        assert session.run(x).shape == (1, classes)
