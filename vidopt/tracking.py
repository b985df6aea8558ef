"""Metric logging behind one small interface; MLflow is its implementation.

A pipeline run is a parent MLflow run; each stage logs into a nested run. The default store is a sqlite file and a local
artifact folder inside the project dir, so nothing needs a server.

Every run records its owner (host, pid, the process's start) and the pipeline run a heartbeat, so a run whose process
died without ending it (`kill -9`, a lost machine) can be found and ended as FAILED; a run stopped by SIGTERM or Ctrl-C
ends itself as KILLED. A stage Prefect's cache answers gets a child run linking the run that produced its result.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

from vidopt import __version__
from vidopt.config import PipelineConfig, flatten, redact


class MetricLogger(Protocol):
    def log(self, name: str, value: float, step: int | None = None) -> None: ...
    def log_config(self, cfg: PipelineConfig) -> None: ...
    def log_dict(self, payload: dict[str, Any], artifact_file: str) -> None: ...
    def close(self) -> None: ...


EXPERIMENT_KIND = "mlflow.experimentKind"
ENDED_BY = "vidopt.ended_by"              # why vidopt, not the run's own code, ended a run
HEARTBEAT = "vidopt.heartbeat"            # unix seconds of the pipeline process's last sign of life
HEARTBEAT_S = 60.0                        # how often it is written: one tag write a minute
STAGE_KEY = "vidopt.stage_key"            # the stage's key (vidopt/stages.py): same inputs and config, same key
CACHED_FROM = "vidopt.cached_from_run_id"  # on a cached stage's child run: the run that produced the result
BOOKKEEPING = ("vidopt.host", "vidopt.pid", "vidopt.pid_started", HEARTBEAT, STAGE_KEY, ENDED_BY)
log = logging.getLogger("vidopt.tracking")


def default_tracking_uri(project_dir: str | Path) -> str:
    return f"sqlite:///{(Path(project_dir) / 'mlflow.db').resolve()}"


def code_version() -> str:
    """Git commit of the checkout when there is one (marked -dirty with local edits), else the package version."""
    repo = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        return __version__


class MLflowLogger:
    """MetricLogger over an active MLflow run (mlflow's fluent API keeps the run stack)."""

    def __init__(self, run):
        self.run = run

    def log(self, name: str, value: float, step: int | None = None) -> None:
        import mlflow

        mlflow.log_metric(name, value, step=step)

    def log_config(self, cfg: PipelineConfig) -> None:
        import mlflow

        params = flatten(redact(cfg.model_dump(mode="json")))
        # MLflow params are strings of at most 6000 chars; long lists (class names) are stored as JSON text.
        mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in params.items()})
        mlflow.set_tags({"config_hash": cfg.config_hash(), "code_version": code_version()})
        self.log_dict(redact(cfg.model_dump(mode="json")), "config.json")

    def log_dict(self, payload: dict[str, Any], artifact_file: str) -> None:
        import mlflow

        mlflow.log_dict(payload, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        import mlflow

        mlflow.set_tags(tags)

    def close(self) -> None:
        import mlflow

        mlflow.end_run()


def configure_mlflow(cfg: PipelineConfig) -> str:
    """Point MLflow at the configured store (default: project-local sqlite) and pick the experiment."""
    import mlflow

    uri = cfg.tracking.uri or default_tracking_uri(cfg.run.project_dir)
    Path(cfg.run.project_dir).mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None and uri.startswith("sqlite:"):
        # Local store: keep artifacts beside mlflow.db instead of ./mlruns in whatever the cwd is.
        artifacts = (Path(cfg.run.project_dir) / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifacts)
    experiment = mlflow.set_experiment(cfg.tracking.experiment)
    if experiment.tags.get(EXPERIMENT_KIND) is None:   # opens on the runs table, not MLflow's GenAI views
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, "custom_model_development")
    return uri


@contextmanager
def pipeline_run(cfg: PipelineConfig) -> Iterator[MLflowLogger]:
    """The parent MLflow run of one pipeline run, beating its heartbeat while it is open."""
    import mlflow

    configure_mlflow(cfg)
    run = mlflow.start_run(run_name=cfg.run.name, tags=Owner.this_process().tags())
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(mlflow.get_tracking_uri(), run.info.run_id, stop),
                            name="vidopt-heartbeat", daemon=True)
    beat.start()
    try:
        with _ended_by_outcome(run.info.run_id, children=True):
            logger = MLflowLogger(run)
            logger.log_config(cfg)
            yield logger
    finally:
        stop.set()
        beat.join(timeout=5)


@contextmanager
def stage_run(stage: str, parent_run_id: str) -> Iterator[MLflowLogger]:
    """A nested MLflow run for one stage. The parent is passed explicitly: tasks may run on other threads, and MLflow's
    active-run stack is per thread."""
    import mlflow

    run = mlflow.start_run(run_name=stage, parent_run_id=parent_run_id, nested=True,
                           tags={"stage": stage, **Owner.this_process().tags()})
    with _ended_by_outcome(run.info.run_id, children=False):
        yield MLflowLogger(run)


def interruption(exc: BaseException | None) -> str | None:
    """What stopped the process when `exc` is a stop (Ctrl-C; SIGTERM as Prefect's TerminationSignal inside a flow or
    as flows/cli.py's SystemExit(143) outside one), not an error; else None."""
    if exc is None or isinstance(exc, Exception):
        return None
    if isinstance(exc, KeyboardInterrupt):
        return "stopped by SIGINT (Ctrl-C)"
    signum = getattr(exc, "signal", None)
    if isinstance(exc, SystemExit):
        if not (isinstance(exc.code, int) and 128 < exc.code < 128 + signal.NSIG):
            return f"stopped by exit({exc.code})"
        signum = exc.code - 128
    if isinstance(signum, int) and 0 < signum < signal.NSIG:
        return f"stopped by {signal.Signals(signum).name}"
    return None


@contextmanager
def _ended_by_outcome(run_id: str, children: bool) -> Iterator[None]:
    """Ends the active run FINISHED, FAILED on an error, or KILLED when the process is being stopped; a stopped
    pipeline run also ends its children still running (export tasks in other threads), saying why."""
    import mlflow

    try:
        yield
    except BaseException as exc:
        why = interruption(exc)
        try:
            if why is not None:
                if children:
                    _end_children(run_id, "KILLED", why)
                mlflow.set_tag(ENDED_BY, why)
        except Exception as err:   # the stop, not this bookkeeping, is what the caller must see
            log.warning("run %s: could not record why it ended (%s): %s", run_id, why, err)
        finally:
            mlflow.end_run("FAILED" if why is None else "KILLED")
        raise
    mlflow.end_run("FINISHED")


def _end_children(parent_run_id: str, status: str, why: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    for child in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' "
                                                     "and attributes.status = 'RUNNING'"):
        client.set_tag(child.info.run_id, ENDED_BY, why)
        client.set_terminated(child.info.run_id, status)


def _heartbeat(tracking_uri: str, run_id: str, stop: threading.Event) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    while True:
        try:
            client.set_tag(run_id, HEARTBEAT, str(int(time.time())))
        except Exception as err:   # a missed beat only makes the run look older to `vidopt runs clean --older-than`
            log.debug("heartbeat of run %s not written: %s", run_id, err)
        if stop.wait(HEARTBEAT_S):
            return


def set_run_tags(run_id: str, tags: dict[str, str]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


# ---- whose process a run is: ending the runs of dead processes -----------------------------------------------------

def process_started(pid: int) -> str | None:
    """An id of process `pid`'s start, "<boot id>/<start in clock ticks>" on Linux, "" where unknown; None when no such
    process lives (a zombie counts as dead). Two processes with the same pid never share it, across reboots too."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if Path("/proc/self/stat").exists():
            return None
        try:                # no /proc (macOS): whether the pid exists, its start unknown
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    fields = stat.rpartition(")")[2].split()   # the command name in parentheses may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{boot}/{fields[19]}"              # field 22 of stat(5): start time after boot


@dataclass(frozen=True)
class Owner:
    """The process that opened a run."""
    host: str
    pid: int
    started: str    # process_started(pid) when the run opened

    @classmethod
    def this_process(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), process_started(os.getpid()) or "")

    def tags(self) -> dict[str, str]:
        return {"vidopt.host": self.host, "vidopt.pid": str(self.pid), "vidopt.pid_started": self.started}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Owner | None:
        try:
            return cls(tags["vidopt.host"], int(tags["vidopt.pid"]), tags.get("vidopt.pid_started", ""))
        except (KeyError, ValueError):
            return None

    def gone(self) -> str | None:
        """Why the owner is certainly dead, when it ran on this host and is; None otherwise."""
        if self.host != socket.gethostname():
            return None
        now = process_started(self.pid)
        if now is None:
            return f"its process {self.pid} on {self.host} is gone"
        if self.started and now and now != self.started:
            return f"its process {self.pid} on {self.host} is gone (the pid now belongs to another process)"
        return None


def dead_reason(owner: Owner | None, last_seen: float, older_than_s: float | None) -> str | None:
    """The one rule for ending a run left open: on this host, its owner process is gone (a live owner keeps it, however
    old); elsewhere, or with no owner recorded, only when asked (`older_than_s`) and its last sign of life (heartbeat,
    else start) is older than that. None: leave it."""
    if owner is not None and owner.host == socket.gethostname():
        return owner.gone()
    age = time.time() - last_seen
    if older_than_s is None or age < older_than_s:
        return None
    who = f"its process {owner.pid} on {owner.host}" if owner else "its process (not recorded)"
    return f"no sign of life from {who} for {age / 60:.0f} min (--older-than {older_than_s / 60:.0f} min)"


@dataclass(frozen=True)
class EndedRun:
    run_id: str
    name: str
    experiment_id: str
    reason: str


def end_dead_runs(experiment_ids: list[str], by: str, older_than_s: float | None = None,
                  dry_run: bool = False) -> list[EndedRun]:
    """Ends as FAILED, tagged ENDED_BY "<by>: <reason>", every RUNNING run of these experiments that dead_reason
    condemns. A run is judged by the nearest of itself and its ancestors that records an owner; its last sign of life is
    the latest heartbeat along that line, or its start."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    running, token = [], None
    while experiment_ids:
        page = client.search_runs(experiment_ids, "attributes.status = 'RUNNING'", max_results=1000, page_token=token)
        running += page
        token = page.token
        if not token:
            break
    known = {run.info.run_id: run for run in running}

    def lineage(run):   # the run, its parent, ... as far as the store has them
        while run is not None:
            yield run
            parent_id = run.data.tags.get("mlflow.parentRunId")
            if not parent_id:
                return
            if parent_id not in known:
                try:
                    known[parent_id] = client.get_run(parent_id)
                except MlflowException:
                    return
            run = known[parent_id]

    ended = []
    for run in running:
        line = list(lineage(run))
        owner = next((o for r in line if (o := Owner.from_tags(r.data.tags)) is not None), None)
        beats = [float(r.data.tags[HEARTBEAT]) for r in line if r.data.tags.get(HEARTBEAT, "").isdigit()]
        reason = dead_reason(owner, max([run.info.start_time / 1000, *beats]), older_than_s)
        if reason is None:
            continue
        if not dry_run:
            client.set_tag(run.info.run_id, ENDED_BY, f"{by}: {reason}")
            client.set_terminated(run.info.run_id, "FAILED")
        ended.append(EndedRun(run.info.run_id, run.info.run_name, run.info.experiment_id, reason))
    return ended


def last_heartbeat(run_id: str) -> float | None:
    """The heartbeat of a RUNNING run, None if the run is gone, ended or never beat."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        return None
    beat = run.data.tags.get(HEARTBEAT, "")
    return float(beat) if run.info.status == "RUNNING" and beat.isdigit() else None


# ---- stages answered by Prefect's cache: a child run linking the run that produced the result -----------------------

def tag_stage_runs(parent_run_id: str, stage: str, key: str, run_ids: list[str] | None = None) -> None:
    """Marks a stage's runs under this pipeline run (those named, else all with tag stage=<stage>) with the stage key,
    by which a later run whose stage comes from the cache finds them."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if run_ids is None:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        run_ids = [r.info.run_id for r in client.search_runs(
            [experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.stage = '{stage}'")]
    for run_id in run_ids:
        client.set_tag(run_id, STAGE_KEY, key)


def find_stage_run(stage: str, key: str, target: str | None = None):
    """The newest FINISHED run of this stage with this key (and export target) in any experiment of the store."""
    import mlflow

    where = f"tags.stage = '{stage}' and tags.`{STAGE_KEY}` = '{key}' and attributes.status = 'FINISHED'"
    if target:
        where += f" and tags.target = '{target}'"
    runs = mlflow.search_runs(filter_string=where, order_by=["attributes.start_time DESC"], max_results=1,
                              output_format="list", search_all_experiments=True)
    return runs[0] if runs else None


def link_cached_stage(parent_run_id: str, original, key: str) -> str:
    """A FINISHED child of the pipeline run for a stage Prefect's cache answered, named as the original stage run and
    pointing at it (CACHED_FROM), with its tags, params and final metric values; artifacts stay with the original.
    -> the new run's id."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    tags = {k: v for k, v in original.data.tags.items() if not k.startswith("mlflow.") and k not in BOOKKEEPING}
    tags.update({"mlflow.parentRunId": parent_run_id, CACHED_FROM: original.info.run_id,
                 "vidopt.cached_stage_key": key,
                 "mlflow.note.content": f"From Prefect's cache: the run that produced this result is "
                                        f"{original.info.run_id} (experiment {original.info.experiment_id})."})
    run = client.create_run(client.get_run(parent_run_id).info.experiment_id, run_name=original.info.run_name,
                            tags=tags)
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    params = [Param(k, v) for k, v in original.data.params.items()]
    metrics = [Metric(k, v, now, 0) for k, v in original.data.metrics.items()]
    for i in range(0, len(params), 100):        # MLflow takes at most 100 params and 1000 metrics per batch
        client.log_batch(run_id, params=params[i:i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    client.set_terminated(run_id, "FINISHED")
    return run_id
