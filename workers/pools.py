"""Ray worker pools, one per hardware family, that run export jobs concurrently and never hang.

    python -m workers.pools          # start the local emulated pools and print what each offers

Each family asks Ray for its own resource (CPU: CPUs; GPU: `num_gpus`; TPU: the `TPU` resource; FPGA: a custom `FPGA`
resource). With `ray.address` set the run joins that cluster; otherwise it starts a local Ray whose single node
*declares* the accelerator resources (emulated pools), so the same code path runs on a laptop — the back-ends then
report honestly which runtime really ran. Jobs are records of URIs, never live modules. A target whose resource no node
offers is skipped at once; every job has a deadline; a crashed actor is replaced and its job retried. On a local node
the pools share the cores, so all but the longest, single-threaded job (the FPGA emulation) run at a lower priority.
A local Ray listens on 127.0.0.1 only, and its auth token file is readable by its owner alone.
"""
from __future__ import annotations

import importlib
import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import ray  # [Ray] the only module that imports Ray
from ray._private import ray_constants  # [Ray] holds the switch that lets a local node keep a loopback address
from ray.exceptions import RayActorError

from vidopt.artifacts import ExportJob, TargetResult
from vidopt.config import RayConfig
from workers.common import run_export_job

log = logging.getLogger("vidopt.pools")

# [Ray] what an actor of each family holds. Accelerator actors take num_cpus=0: Ray would otherwise make each hold a
# CPU too, and on a 2-core node the third actor would pend forever.
POOL_RESOURCES: dict[str, dict] = {
    "cpu": {"num_cpus": 1},
    "gpu": {"num_gpus": 1, "num_cpus": 0},
    "tpu": {"resources": {"TPU": 1}, "num_cpus": 0},
    "fpga": {"resources": {"FPGA": 1}, "num_cpus": 0},
}
RESOURCE_NAMES = {"cpu": "CPU", "gpu": "GPU", "tpu": "TPU", "fpga": "FPGA"}


STILL_RUNNING_EVERY_S = 15.0


# ray.init runs in this one thread, which lives as long as the process: a local Ray's GCS and raylet die with the
# *thread* that started them (Linux PR_SET_PDEATHSIG), and the flow's export tasks run in threads that end with the
# flow run. One thread also means one ray.init however many tasks connect at once.
_RAY_OWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vidopt-ray")


def connect(cfg: RayConfig) -> dict[str, float]:
    """[Ray] join `cfg.address`, or start a local Ray declaring the emulated pools; returns the cluster's resources."""
    return _RAY_OWNER.submit(_connect, cfg).result()


def _connect(cfg: RayConfig) -> dict[str, float]:
    if not ray.is_initialized():
        if cfg.address:
            ray.init(address=cfg.address, log_to_driver=False)
        else:
            emulated = set(cfg.emulate)
            private_auth_token()
            with _loopback_node():
                ray.init(
                    address="local",   # a Ray of this run's own, even where another one runs on the machine
                    num_cpus=cfg.num_cpus,
                    num_gpus=local_gpus("gpu" in emulated),
                    resources={RESOURCE_NAMES[t]: 1 for t in ("tpu", "fpga") if t in emulated},
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",  # a local run listens on loopback only (see _loopback_node)
                    log_to_driver=False,
                )
    return ray.cluster_resources()


@contextmanager
def _loopback_node():
    """[Ray] let ray.init keep the local node's address 127.0.0.1.

    On Linux ray.init swaps a loopback `_node_ip_address` for the machine's network address, and then the GCS, the
    raylet, the driver, every worker, the runtime-env agent and the autoscaler monitor listen on all interfaces. Ray
    keeps loopback in its single-machine mode (its default on macOS and Windows, set by
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, which Ray reads once at import), so that mode is on while this node starts.
    """
    cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode


AUTH_TOKEN_FILE = Path.home() / ".ray" / "auth_token"  # [Ray] where a local Ray reads (or writes) its token


def private_auth_token(path: Path = AUTH_TOKEN_FILE) -> None:
    """[Ray] the token a local Ray authenticates with, in a file only its owner can read (0600).

    Ray turns token authentication on for a local ray.init (RAY_AUTH_MODE unset or "token") and, with no token
    given, writes one to ~/.ray/auth_token with the process umask, readable by every local user. Written here first
    (O_EXCL, 0600), Ray reads it instead; a token file already there is narrowed to 0600. A token passed in
    RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH is the user's, and left alone.
    """
    mode = os.environ.get("RAY_AUTH_MODE", "token").lower()
    if mode != "token" or os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)  # an earlier run's token; an empty file Ray fills in and keeps at this mode
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # what Ray itself generates: 256 random bits as hex


def local_gpus(emulate: bool) -> int | None:
    """GPUs a local node declares: None lets Ray count the real ones; with none, 1 emulated where asked, else 0."""
    import torch

    if torch.cuda.is_available():
        return None
    return 1 if emulate else 0


def missing_resource(target: str, available: dict[str, float]) -> str | None:
    """The resource `target` needs that no node of the cluster offers, or None."""
    name = RESOURCE_NAMES[target]
    return None if available.get(name, 0) >= 1 else name


BACKEND_MODULE = "workers.{target}"  # each back-end module offers run_target(LocalExportJob) -> TargetResult


@ray.remote(max_restarts=0)
class TargetWorker:
    """[Ray] one actor per job attempt; it imports the target's back-end module by name."""

    def run(self, job: dict, backend_module: str, nice: int = 0) -> dict:
        if nice:
            os.nice(nice)  # this actor process (one per job) and the compilers and children it starts
        backend = importlib.import_module(backend_module.format(target=job["target"]))
        return run_export_job(ExportJob.model_validate(job), backend.run_target).model_dump()


@dataclass
class _Attempt:
    job: ExportJob
    backend_module: str
    tries: int = 0
    actor: object = None
    ref: object = None
    started: float = field(default_factory=time.monotonic)


def run_jobs(jobs: list[ExportJob], cfg: RayConfig, backend_module: str = BACKEND_MODULE) -> list[TargetResult]:
    """Run every job on its family's pool concurrently; results come back in the jobs' order."""
    available = connect(cfg)
    results: dict[str, TargetResult] = {}
    attempts: list[_Attempt] = []
    for job in jobs:
        missing = missing_resource(job.target, available)
        if missing:
            reason = f"no node in the Ray cluster offers the {missing} resource"
            log.warning("export: %s skipped: %s", job.target, reason)
            results[job.target] = TargetResult(target=job.target, status="skipped", reason=reason)
        else:
            attempts.append(_start(_Attempt(job, backend_module), cfg))
    said = time.monotonic()
    while attempts:
        done, _ = ray.wait([a.ref for a in attempts], num_returns=1, timeout=1.0)
        if time.monotonic() - said >= STILL_RUNNING_EVERY_S:   # a minute of silence reads as a hang
            said = time.monotonic()
            log.info("export: still running: %s", ", ".join(f"{a.job.target} ({said - a.started:.0f} s)"
                                                             for a in attempts))
        for attempt in list(attempts):
            outcome = _collect(attempt, done, cfg)
            if outcome is None:
                continue
            attempts.remove(attempt)
            if outcome == "retry":
                attempts.append(_start(attempt, cfg))
            else:
                results[attempt.job.target] = outcome
    return [results[job.target] for job in jobs]


def _start(attempt: _Attempt, cfg: RayConfig) -> _Attempt:
    attempt.tries += 1
    attempt.started = time.monotonic()
    attempt.actor = TargetWorker.options(**POOL_RESOURCES[attempt.job.target]).remote()
    nice = 0 if cfg.address else cfg.local_nice.get(attempt.job.target, 0)
    attempt.ref = attempt.actor.run.remote(attempt.job.model_dump(), attempt.backend_module, nice)
    log.info("export: %s started on its pool (try %d)", attempt.job.target, attempt.tries)
    return attempt


def _collect(attempt: _Attempt, done: list, cfg: RayConfig) -> TargetResult | str | None:
    """The attempt's result, "retry", or None while it is still running within its deadline."""
    target, elapsed = attempt.job.target, time.monotonic() - attempt.started
    if attempt.ref in done:
        try:
            result = TargetResult.model_validate(ray.get(attempt.ref))
        except RayActorError as err:  # the worker process died (OOM, segfault, killed)
            ray.kill(attempt.actor)
            if attempt.tries <= cfg.retries:
                log.warning("export: %s worker died (%s); retrying on a fresh actor", target, type(err).__name__)
                return "retry"
            return _failed(target, f"worker died {attempt.tries} times: {err}", elapsed)
        except Exception as err:  # the back-end raised: a real failure, not retried
            ray.kill(attempt.actor)
            lines = [line for line in str(err).strip().splitlines() if line.strip()]
            return _failed(target, lines[-1] if lines else type(err).__name__, elapsed)
        ray.kill(attempt.actor)
        log.info("export: %s %s in %.1f s", target, result.status, elapsed)
        return result
    if elapsed > cfg.job_timeout_s:
        ray.kill(attempt.actor)  # also frees an actor that never got its resources
        return _failed(target, f"timed out after {cfg.job_timeout_s:.0f} s (pool busy or job hung)", elapsed)
    return None


def _failed(target: str, reason: str, seconds: float) -> TargetResult:
    log.error("export: %s failed: %s", target, reason)
    return TargetResult(target=target, status="failed", reason=reason, seconds=seconds)


if __name__ == "__main__":
    from vidopt.config import load_config

    logging.basicConfig(level=logging.INFO)
    print(connect(load_config("tiny").ray))
