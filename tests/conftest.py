"""Shared fixtures: a real moto S3 server process on 127.0.0.1, a small sample dataset, a tiny config."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PJRT_DEVICE", "CPU")


# The moto server's secret key: tests check that no file a run writes holds it (files_holding)
MARKER_SECRET = "vidopt-marker-secret-5be1c"


def files_holding(marker: str, roots: list[Path]) -> list[Path]:
    """Every file under `roots` whose bytes contain `marker` (databases, logs and archives included)."""
    needle, found = marker.encode(), []
    for root in roots:
        for path in (p for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink()):
            try:
                if needle in path.read_bytes():
                    found.append(path)
            except OSError:   # a socket, or a file removed while walking
                continue
    return found


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
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": MARKER_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
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
    generate_dataset(out, load_config("tiny").data.sample, workers=2)
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
    from tasks.dag import run_until
    from vidopt.config import load_config

    project = tmp_path_factory.mktemp("ladder") / "project"
    cfg = load_config("tiny", [f"run.project_dir={project}", f"data.source={sample_dir}"])
    return cfg, run_until(cfg, "quantize")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on 127.0.0.1 for the whole session, with its own PREFECT_HOME (sqlite DB, log in
    server.log there) and analytics off. Yields its API URL, http://127.0.0.1:<port>/api."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}  # nothing here looks at the UI; skipping it saves start time
    env.pop("PREFECT_API_URL", None)
    proc = start_in_own_group([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], home / "server.log", env)
    url = f"http://127.0.0.1:{port}/api"
    # A fresh home means sqlite migrations first: ~10 s on an idle 2-core machine, much more on a busy one.
    wait_healthy(proc, f"{url}/health", "prefect server", home / "server.log")
    yield url
    stop_group(proc, signal.SIGTERM)


@pytest.fixture
def cli_env(monkeypatch, tmp_path):
    """The variables `vidopt listen` / `serve` set with setdefault, set here so they are restored after the test."""
    for key, value in {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_LOGGING_EXTRA_LOGGERS": "vidopt",
                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}.items():
        monkeypatch.setenv(key, value)


def wait_healthy(proc: subprocess.Popen, health_url: str, what: str, log_path: Path, timeout_s: float = 120) -> None:
    """Poll health_url until it answers 200; if the process exits or timeout_s passes, kill it and raise with the end
    of its log."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(health_url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            exit_code = proc.poll()
            stop_group(proc, signal.SIGKILL)
            raise RuntimeError(f"{what} did not answer {health_url} within {timeout_s:.0f} s (exit code {exit_code}); "
                               f"its log ends:\n{log_tail(log_path)}")
        time.sleep(0.5)


# ---- processes of the end-to-end tests -------------------------------------------------------------------------

def start_in_own_group(args: list[str], log_path: Path, env: dict[str, str],
                       cwd: Path | None = None) -> subprocess.Popen:
    """`args` with stdout and stderr appended to log_path, in a session of its own, so stop_group also reaches what it
    starts (flow-run processes, uvicorn workers)."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def session_members(sid: int) -> list[int]:
    """Pids of the live processes of session `sid` (Linux /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, _pgrp, session = stat.read_text().rpartition(")")[2].split()[:4]
        except (OSError, ValueError):
            continue  # gone meanwhile
        if int(session) == sid and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def stop_group(proc: subprocess.Popen, first_signal: int, grace_s: float = 20.0) -> None:
    """Send `first_signal` to the process group of a start_in_own_group process, then SIGKILL whatever is left of its
    session after grace_s, or as soon as the leader has exited: the session also holds what left the group, such as
    Ray's workers (each in a group of its own) started by a flow run."""
    try:
        os.killpg(proc.pid, first_signal)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    for pid in session_members(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)


def log_tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} was not written)"


class MlflowServer(NamedTuple):
    url: str                    # tracking URI, http://127.0.0.1:<port>
    bucket: str                 # moto bucket of the artifact store
    artifacts_destination: str  # s3://<bucket>/mlartifacts: where the server puts what clients log
    log_path: Path


@pytest.fixture(scope="session")
def mlflow_server(moto_server, tmp_path_factory) -> MlflowServer:
    """A real `mlflow server` on 127.0.0.1: sqlite backend, artifacts proxied to a bucket on the moto server (clients
    log over HTTP; the server writes to S3 with the moto credentials of the environment). One uvicorn worker and no job
    runner (7 huey processes for GenAI jobs nothing here uses): on 2 cores they cost start time and memory."""
    import boto3

    home = tmp_path_factory.mktemp("mlflow-server")
    bucket = "vidopt-mlflow"
    boto3.client("s3").create_bucket(Bucket=bucket)
    port = free_port()
    server = MlflowServer(f"http://127.0.0.1:{port}", bucket, f"s3://{bucket}/mlartifacts", home / "server.log")
    proc = start_in_own_group(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination",
         server.artifacts_destination], server.log_path,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, cwd=home)
    # ~15 s on an idle 2-core machine (migrations of a fresh sqlite DB)
    wait_healthy(proc, f"{server.url}/health", "mlflow server", server.log_path)
    yield server
    stop_group(proc, signal.SIGTERM)
