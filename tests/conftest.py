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


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on 127.0.0.1 for the whole session, with its own PREFECT_HOME (sqlite DB, log in
    server.log there) and analytics off. Yields its API URL, http://127.0.0.1:<port>/api."""
    import signal
    import urllib.request

    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}  # nothing here looks at the UI; skipping it saves start time
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "wb")
    # own session: stopping it signals the whole group, whatever the server started itself
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    # A fresh home means sqlite migrations first: ~10 s on an idle 2-core machine, much more on a busy one.
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            log.close()
            tail = (home / "server.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"prefect server on port {port} did not answer /api/health within 120 s "
                               f"(exit code {proc.poll()}); its log ends:\n{tail}")
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    log.close()
