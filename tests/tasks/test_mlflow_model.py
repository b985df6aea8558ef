"""A registered CPU target is an MLflow model: `mlflow.pyfunc.load_model("models:/vidopt-cpu/<version>")` reproduces
the logits the target verified, and `mlflow models serve` answers a real HTTP request on 127.0.0.1 with them."""
import json
import os
import signal
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tasks import predict, register
from tasks.common import eval_clip_set, load_clip_set
from tasks.export import Reads, log_target, target_options
from tests.conftest import free_port, start_in_own_group, stop_group, wait_healthy
from vidopt.artifacts import ExportJob
from vidopt.stages import open_store, split_rows
from workers import cpu
from workers.common import VERIFIED_LOGITS, run_export_job


@pytest.fixture
def tracking(tmp_path):
    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("pyfunc-test", artifact_location=(tmp_path / "mlartifacts").as_uri())
    mlflow.set_experiment("pyfunc-test")
    yield uri
    mlflow.set_tracking_uri(previous)


@pytest.mark.integration
def test_the_registered_cpu_target_loads_and_serves_as_an_mlflow_model(tiny_ladder, tracking, tmp_path):
    cfg, stages = tiny_ladder
    store = open_store(cfg.run)
    clips_ref = eval_clip_set(Reads.of(cfg), stages["dataset"], "test")
    out = store.uri("pyfunc-test", "cpu")
    job = ExportJob(target="cpu", store=store.spec, model=stages["int8"].uri, eval_clips=clips_ref, out=out,
                    options=target_options(Reads.of(cfg), "cpu"))
    result = run_export_job(job, cpu.run_target)
    assert result.status == "ok", result.reason
    verified = np.load(store.local_path(out) / VERIFIED_LOGITS)
    with mlflow.start_run() as parent:
        logged = log_target(result, parent.info.run_id, stages["dataset"].data_version, store)
    assert logged.extra["mlflow_model_id"]
    (decision,) = register.run(cfg, stages["dataset"], stages["teacher"], [logged])
    uri = f"models:/vidopt-cpu/{decision['version']}"

    clips = load_clip_set(store, clips_ref).clips.numpy()          # uint8 [N, T, H, W, 3], as decoded
    model = mlflow.pyfunc.load_model(uri)
    assert np.abs(model.predict(clips) - verified).max() <= 1e-4
    assert model.metadata.metadata["classes"] == stages["dataset"].classes
    with pytest.raises(Exception, match="uint8"):
        model.predict(clips.astype(np.float32))

    port, log_path = free_port(), tmp_path / "serve.log"
    # the server runs `uvicorn` from PATH: the environment's bin folder, as an activated virtualenv has it
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = start_in_own_group([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager",
                                 "local", "-h", "127.0.0.1", "-p", str(port)], log_path, env)
    try:
        wait_healthy(server, f"http://127.0.0.1:{port}/ping", "mlflow models serve", log_path, timeout_s=180)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": clips[:3].tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = np.array(json.loads(response.read())["predictions"], np.float32)
        assert served.shape == verified[:3].shape and np.abs(served - verified[:3]).max() <= 1e-4
    finally:
        stop_group(server, signal.SIGTERM)
    assert not Path("mlruns").exists()

    # `vidopt predict` with the registered model, on the test videos: every window's label is the one the target's
    # own verification computed for that clip; a corrupt file gets its reason and the rest go on.
    folder = tmp_path / "videos"
    folder.mkdir()
    rows = split_rows(stages["dataset"], "test", store)
    for i, row in enumerate(rows):
        (folder / f"{i:03d}.mp4").symlink_to(row["path"])
    (folder / "zzz.mp4").write_bytes(b"not a video")
    here = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": tracking,
                                                                               "experiment": "pyfunc-test"})})
    report = predict.run(here, str(folder), model=uri, eval_windows=True, workers=2)
    videos = load_clip_set(store, clips_ref).videos.numpy()
    classes = stages["dataset"].classes
    for i, video in enumerate(report["videos"][:-1]):
        expected = [classes[k] for k in verified[videos == i].argmax(1)]
        assert video["video"] == f"{i:03d}.mp4" and video["windows"] == expected and video["error"] is None
        assert video["label"] == classes[int(verified[videos == i].mean(0).argmax())]
    assert report["videos"][-1]["error"] and report["videos"][-1]["label"] is None
    assert report["clips"] == len(verified) and report["clips_per_s"] > 0
    assert "clips/s" in predict.format_table(report) and "zzz.mp4  failed: " in predict.format_table(report)
