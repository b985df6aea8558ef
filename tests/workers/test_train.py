"""Training on a real local Ray: Ray Train with two gloo workers ends where one in-process worker does, a worker killed
mid-training is replaced and resumes from the last checkpoint in the store, and a node that declares a GPU it does
not have trains on its CPU and says so."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
from safetensors.torch import load_file

from tests.vidopt.test_train_jobs import small_job
from vidopt.config import RayConfig, TrainConfig
from workers.train import run_training

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


@pytest.fixture
def local_ray():
    """A 2-CPU node declaring one GPU that is not there (this machine has no CUDA)."""
    ray.shutdown()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield
    ray.shutdown()


def test_two_ray_train_workers_end_where_one_in_process_worker_does(local_ray, tmp_path):
    job = small_job(tmp_path)
    one = run_training(job.model_copy(update={"output": str(tmp_path / "one.safetensors")}),
                       TrainConfig(launcher="local"), RayConfig())
    two = run_training(job.model_copy(update={"output": str(tmp_path / "two.safetensors"), "checkpoint_name": "two"}),
                       TrainConfig(workers=2, device="cpu", cpus_per_worker=1), RayConfig(address="auto"))
    assert (one.world_size, two.world_size) == (1, 2) and two.device == "cpu"
    a, b = load_file(one.weights.uri), load_file(two.weights.uri)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    # Ray Train kept its checkpoints in the store, in the job's run folder
    assert list((tmp_path / "run" / "two").glob("checkpoint_*/state.pt"))


def _kill_a_worker_after_the_first_checkpoint(folder: Path, killed: list) -> None:
    """Once Ray Train has registered a checkpoint (its snapshot names one; a checkpoint folder alone may not be
    registered yet), SIGKILL one training worker."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        snapshot = folder / "checkpoint_manager_snapshot.json"
        if snapshot.exists() and "checkpoint_" in snapshot.read_text():
            break
        time.sleep(0.05)
    for proc in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"RayTrainWorker" in proc.read_bytes():
                os.kill(int(proc.parent.name), signal.SIGKILL)   # as an OOM kill or a lost node would
                killed.append(int(proc.parent.name))
                return
        except (OSError, ValueError):
            continue


def test_a_killed_worker_is_replaced_and_resumes_from_the_last_checkpoint(local_ray, tmp_path):
    epochs = 40
    job = small_job(tmp_path, epochs=epochs).model_copy(update={"checkpoint_name": "killed", "patience": epochs})
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_worker_after_the_first_checkpoint,
                              args=(tmp_path / "run" / "killed", killed))
    killer.start()
    result = run_training(job, TrainConfig(workers=2, device="cpu", cpus_per_worker=1, max_failures=1),
                          RayConfig(address="auto"))
    killer.join()
    assert killed, "no training worker was found to kill"
    assert result.epochs_run == epochs and 1 <= result.resumed_from < epochs
    assert [h["epoch"] for h in result.history] == list(range(epochs))   # the resumed run kept the earlier epochs


def test_a_node_declaring_a_gpu_without_cuda_trains_on_its_cpu_and_says_so(local_ray, tmp_path):
    job = small_job(tmp_path, epochs=1)
    result = run_training(job, TrainConfig(device="gpu"), RayConfig(address="auto"))
    assert result.device == "cpu" and "CUDA is not available" in result.note
    assert result.world_size == 1 and result.epochs_run == 1
