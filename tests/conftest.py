"""Shared fixtures: a real moto S3 server process on 127.0.0.1, a small sample dataset, a tiny config."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PJRT_DEVICE", "CPU")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server():
    """A moto server in its own process (not the in-process mock), with fake credentials in the environment."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.2)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """The tiny profile's sample dataset (real H.264 mp4), written once per session."""
    from vidopt.config import load_config
    from vidopt.sample_data import generate_dataset

    out = tmp_path_factory.mktemp("samples")
    generate_dataset(out, load_config("tiny").data.sample)
    return out


@pytest.fixture
def tiny_cfg(tmp_path):
    """Factory: the tiny profile with its project dir in tmp_path, plus overrides."""
    from vidopt.config import load_config

    def make(*overrides: str):
        return load_config("tiny", [f"run.project_dir={tmp_path / 'project'}", *overrides])

    return make


@pytest.fixture(scope="session")
def tiny_ladder(sample_dir, tmp_path_factory):
    """Every model stage of the tiny profile run once per session (plain functions, no Prefect): later tests and the
    flow test reuse the finished stage dirs. -> (cfg, {"dataset", "teacher", "student", "pruned", "int8"})."""
    from tasks import distill, ingest, prune, quantize, train_teacher
    from vidopt.config import load_config

    project = tmp_path_factory.mktemp("ladder") / "project"
    cfg = load_config("tiny", [f"run.project_dir={project}", f"data.source={sample_dir}"])
    dataset = ingest.run(cfg)
    teacher = train_teacher.run(cfg, dataset)
    student = distill.run(cfg, dataset, teacher)
    pruned = prune.run(cfg, dataset, student, teacher)
    int8 = quantize.run(cfg, dataset, pruned, teacher)
    return cfg, {"dataset": dataset, "teacher": teacher, "student": student, "pruned": pruned, "int8": int8}
