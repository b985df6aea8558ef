"""Pool behaviour on a real local Ray: resources honoured, missing pools skipped fast, crashes retried, hangs timed out."""
import json
import time
from pathlib import Path

import pytest
import ray

from vidopt.artifacts import ExportJob, default_options
from vidopt.store import store_for
from vidopt.config import RayConfig
from workers.pools import run_jobs

FAKE = "tests.workers.fake_backends"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local_ray():
    # A node with a GPU and a TPU but no FPGA; 1 CPU, so a CPU job and three accelerator jobs fit only because
    # accelerator actors hold no CPU (num_cpus=0). An earlier test's export may have left this process's local Ray
    # (the pipeline starts one and keeps it for the process): this test needs its own node's resources.
    ray.shutdown()
    ray.init(num_cpus=1, num_gpus=1, resources={"TPU": 1}, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield
    ray.shutdown()


def _job(target, tmp_path, **script):
    """A job of store URIs whose model folder holds the fake back-end's script (its attempts counted in
    <tmp_path>/<target>.attempts)."""
    store = store_for(str(tmp_path / "store"))
    folder = tmp_path / "scripts" / f"{target}-{len(list(tmp_path.glob('scripts/*')))}"
    folder.mkdir(parents=True)
    (folder / "behaviour.json").write_text(json.dumps({**script, "attempts_file": str(tmp_path / f"{target}.attempts")}))
    model = store.uri("models", folder.name)
    store.put_dir(folder, model)
    (tmp_path / "clips.pt").write_bytes(b"unused by the fake back-ends")
    clips = store.put_file(tmp_path / "clips.pt", store.uri("clips.pt"))
    return ExportJob(target=target, store=store.spec, model=model, eval_clips=clips, out=store.uri("out", target),
                     options=default_options(target))


def test_targets_run_concurrently_on_their_pools_and_missing_pool_is_skipped(local_ray, tmp_path, monkeypatch,
                                                                              caplog):
    import logging

    from workers import pools

    monkeypatch.setattr(pools, "STILL_RUNNING_EVERY_S", 1.0)   # 15 s in use: said here within the 3 s jobs
    cfg = RayConfig(job_timeout_s=60)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="vidopt.pools"):
        results = run_jobs([_job(t, tmp_path, seconds=3) for t in ("cpu", "gpu", "tpu", "fpga")], cfg, FAKE)
    assert any(r.getMessage().startswith("export: still running: cpu (") for r in caplog.records)
    wall = time.monotonic() - started
    by_target = {r.target: r for r in results}
    assert [r.target for r in results] == ["cpu", "gpu", "tpu", "fpga"]
    assert {t: by_target[t].status for t in by_target} == {"cpu": "ok", "gpu": "ok", "tpu": "ok", "fpga": "skipped"}
    assert "FPGA" in by_target["fpga"].reason
    assert by_target["gpu"].extra["gpu_ids"] != ""  # Ray assigned the (declared) GPU to the GPU actor
    assert len({r.runtime for r in results if r.status == "ok"}) == 3  # three separate worker processes
    assert wall < 3 * 3  # concurrent, not one after another


def test_local_pools_yield_to_the_fpga_emulation_and_a_joined_cluster_does_not(local_ray, tmp_path):
    """A local node's pools share its cores: every target but the single-threaded FPGA emulation runs at a lower
    priority (ray.local_nice), so the longest job is not the one slowed down."""
    [joined] = run_jobs([_job("gpu", tmp_path / "a")], RayConfig(job_timeout_s=60, address="auto"), FAKE)
    [local] = run_jobs([_job("gpu", tmp_path / "b")], RayConfig(job_timeout_s=60), FAKE)
    base = joined.extra["nice"]  # Ray's own niceness for worker processes (15 by default)
    assert base < 19 and local.extra["nice"] == min(19, base + RayConfig().local_nice["gpu"])


def test_missing_pool_is_skipped_within_seconds(local_ray, tmp_path):
    started = time.monotonic()
    [result] = run_jobs([_job("fpga", tmp_path)], RayConfig(job_timeout_s=600), FAKE)
    assert result.status == "skipped" and time.monotonic() - started < 5


def test_crashed_worker_is_replaced_and_job_retried(local_ray, tmp_path):
    [result] = run_jobs([_job("tpu", tmp_path, behaviour="crash_once")], RayConfig(job_timeout_s=60, retries=1), FAKE)
    assert result.status == "ok" and result.extra["attempts"] == 2


def test_crash_beyond_retries_fails_with_reason(local_ray, tmp_path):
    [result] = run_jobs([_job("tpu", tmp_path, behaviour="crash_once")], RayConfig(job_timeout_s=60, retries=0), FAKE)
    assert result.status == "failed" and "worker died" in result.reason


def test_hung_job_times_out_and_frees_its_pool(local_ray, tmp_path):
    started = time.monotonic()
    [result] = run_jobs([_job("gpu", tmp_path, behaviour="hang")], RayConfig(job_timeout_s=3), FAKE)
    assert result.status == "failed" and "timed out after 3 s" in result.reason
    assert time.monotonic() - started < 15
    [after] = run_jobs([_job("gpu", tmp_path / "b")], RayConfig(job_timeout_s=30), FAKE)  # the GPU was released
    assert after.status == "ok"


def test_backend_error_fails_without_retry_and_names_the_problem(local_ray, tmp_path):
    [result] = run_jobs([_job("cpu", tmp_path, behaviour="raise")], RayConfig(job_timeout_s=30, retries=2), FAKE)
    assert result.status == "failed" and "has no arch.json" in result.reason
    assert (tmp_path / "cpu.attempts").read_text() == "1"
