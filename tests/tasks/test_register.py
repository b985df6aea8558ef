"""Registration against a real sqlite MLflow store: the same verified results are registered once, however often the
export stage logged them."""
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from tasks import register
from tasks.export import log_target
from vidopt.artifacts import DatasetArtifact, ModelArtifact, TargetResult
from vidopt.stages import open_store


@pytest.fixture
def tracking(tmp_path):
    """A sqlite MLflow store of this test's own, its artifacts beside it (a sqlite store's default artifact root is
    ./mlruns in the working directory: the clone); the process-wide tracking URI is put back afterwards."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.create_experiment("register-test", artifact_location=(tmp_path / "mlartifacts").as_uri())
    mlflow.set_experiment("register-test")  # explicit: the active experiment is process-wide, set by earlier tests
    yield
    mlflow.set_tracking_uri(previous)


def test_results_logged_again_under_new_mlflow_runs_register_no_new_version(tmp_path, tiny_cfg, tracking):
    artifact = tmp_path / "model_int8.onnx"
    artifact.write_bytes(b"onnx bytes")
    verified = TargetResult(target="cpu", status="ok", runtime="onnxruntime CPUExecutionProvider",
                            artifact_uri=str(artifact), artifact_bytes=10,
                            parity={"argmax_agreement": 1.0, "max_abs_diff": 0.1}, top1=0.95, latency_ms=0.3)
    dataset = DatasetArtifact(uri=str(tmp_path), manifest_uri="m", quarantine_uri="q", manifest_sha256="d" * 64,
                              data_version="v1", classes=["a", "b"], class_counts={}, num_videos=2, num_quarantined=0,
                              downloaded=0)
    teacher = ModelArtifact(uri=str(tmp_path), kind="teacher", arch={}, weights_sha256="t" * 64,
                            metrics={"test_top1_clip": 0.94}, data_version="v1")
    cfg = tiny_cfg()

    logged = []
    for _ in range(2):  # the second: the export task run again (its Prefect result lost), same verified results
        with mlflow.start_run() as parent:
            logged.append(log_target(verified, parent.info.run_id, "v1", open_store(cfg.run)))
    assert logged[0].extra["mlflow_run_id"] != logged[1].extra["mlflow_run_id"]

    first = register.run(cfg, dataset, teacher, [logged[0]])
    again = register.run(cfg, dataset, teacher, [logged[1]])
    assert again == first and first[0]["version"] == 1 and first[0]["champion"]
    assert len(MlflowClient().search_model_versions("name='vidopt-cpu'")) == 1
    assert (tmp_path / "mlartifacts").is_dir() and not Path("mlruns").exists()   # nothing written into the clone

    better = logged[1].model_copy(update={"top1": 0.96})  # a different verified result is a new version
    assert register.run(cfg, dataset, teacher, [better])[0]["version"] == 2
