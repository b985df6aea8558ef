"""Fault: a pipeline run that is stopped (SIGTERM, Ctrl-C) or killed outright (SIGKILL) leaves no MLflow or Prefect run
RUNNING for ever. Real processes run the real pipeline flow with its stages swapped for one that waits, against a
real Prefect server and a real sqlite MLflow store."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
# The pipeline flow of `vidopt run`, SIGTERM handled as flows/cli.py does, one stage that waits inside its MLflow run.
WAITING_RUN = """
import signal, sys, time
from prefect import task
import flows.pipeline as pipeline
from flows.cli import _exit_on_sigterm
from vidopt.config import load_config
from vidopt.dag import Stage
from vidopt.tracking import stage_run

@task(name="ingest")
def waiting_stage(cfg, parent_run_id):
    with stage_run("ingest", parent_run_id):
        time.sleep(600)

signal.signal(signal.SIGTERM, _exit_on_sigterm)
pipeline.STAGES = (Stage("ingest", (), "dataset"),)
pipeline.stage_task = lambda name: waiting_stage
pipeline.pipeline(load_config("tiny", sys.argv[1:]))
"""


@pytest.fixture
def prefect_api(prefect_server, monkeypatch, tmp_path):
    """This process's Prefect client on the session's server; the variables `vidopt runs clean` sets with setdefault
    set here, so they are restored after the test."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    for key, value in {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": prefect_server,
                       "PREFECT_LOGGING_EXTRA_LOGGERS": "vidopt",
                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}.items():
        monkeypatch.setenv(key, value)
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        yield prefect_server


def start_run(script: Path, api: str, overrides: list[str], log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(log_path.parent / "prefect-home"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}   # this checkout's vidopt
    with open(log_path, "ab") as out:
        return subprocess.Popen([sys.executable, str(script), *overrides], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def wait_for(what: str, condition, timeout_s: float = 180, log_paths: tuple[Path, ...] = ()):
    deadline = time.monotonic() + timeout_s
    while not (found := condition()):
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}:\n{p.read_text(errors='replace')[-3000:]}" for p in log_paths)
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.5)
    return found


def runs_named(client: MlflowClient, experiment_id: str, name: str) -> tuple:
    """(the pipeline run called `name`, its stage runs), read afresh."""
    [parent] = client.search_runs([experiment_id], f"attributes.run_name = '{name}'")
    return parent, client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


def flow_run_and_tasks(flow_run_id: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    return flow_run, tasks


@pytest.mark.integration
def test_killed_runs_are_ended_failed_and_stopped_runs_end_themselves(prefect_api, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    uri = f"sqlite:///{project.resolve() / 'mlflow.db'}"
    client = MlflowClient(uri)
    # The store and experiment exist before the runs start together (a fresh sqlite store migrates on first use).
    experiment_id = client.create_experiment("zombies", artifact_location=(project / "mlartifacts").as_uri())
    script = tmp_path / "waiting_run.py"
    script.write_text(WAITING_RUN)

    procs: list[subprocess.Popen] = []

    def start(name: str) -> subprocess.Popen:
        procs.append(start_run(script, prefect_api, [f"run.project_dir={project}", "tracking.experiment=zombies",
                                                     f"run.name={name}"], tmp_path / f"{name}.log"))
        return procs[-1]

    def stage_running(name: str):
        try:
            parent, stages = runs_named(client, experiment_id, name)
        except ValueError:   # not started yet
            return None
        running = [s.info.status for s in stages] == ["RUNNING"]
        return client.get_run(parent.info.run_id) if running else None   # read after the stage began: all its tags

    def task_running(flow_run_id: str) -> bool:   # task-run states reach Prefect's API as events, a moment later
        return [t.state.type.value for t in flow_run_and_tasks(flow_run_id)[1]] == ["RUNNING"]

    logs = tuple(tmp_path / f"{n}.log" for n in ("killed", "terminated", "interrupted"))
    killed = start("killed")
    try:
        parent = wait_for("the first run's stage", lambda: stage_running("killed"), log_paths=logs)
        killed_flow_run = parent.data.tags["vidopt.prefect_flow_run_id"]
        wait_for("the first run's task run in Prefect", lambda: task_running(killed_flow_run), 30)
        assert parent.data.tags["vidopt.pid"] == str(killed.pid) and parent.data.tags["vidopt.heartbeat"]
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        # Nothing ended them: the process had no chance to.
        assert {r.info.status for r in [parent, *runs_named(client, experiment_id, "killed")[1]]} == {"RUNNING"}
        assert flow_run_and_tasks(killed_flow_run)[0].state.type.value == "RUNNING"

        # The next runs end the dead one's runs as they start; each then waits in its stage, alive.
        terminated, interrupted = start("terminated"), start("interrupted")
        for name in ("terminated", "interrupted"):
            flow_run_id = wait_for(f"the {name} run's stage", lambda n=name: stage_running(n),
                                   log_paths=logs).data.tags["vidopt.prefect_flow_run_id"]
            wait_for(f"the {name} run's task run in Prefect", lambda f=flow_run_id: task_running(f), 30)
        parent, stages = runs_named(client, experiment_id, "killed")
        for run in (parent, *stages):
            assert run.info.status == "FAILED", run.info
            assert run.data.tags["vidopt.ended_by"].startswith("vidopt run ")
            assert f"its process {killed.pid} on {socket.gethostname()} is gone" in run.data.tags["vidopt.ended_by"]
        flow_run, tasks = wait_for("the killed flow run Crashed", lambda: (
            got := flow_run_and_tasks(killed_flow_run))[0].state.type.value == "CRASHED" and got)
        assert f"its process {killed.pid}" in flow_run.state.message
        assert [t.state.type.value for t in tasks] == ["CRASHED"]

        # SIGTERM and Ctrl-C: each run ends itself, MLflow KILLED and Prefect Cancelled, saying what stopped it.
        terminated.send_signal(signal.SIGTERM)
        interrupted.send_signal(signal.SIGINT)
        assert terminated.wait(timeout=120) == 128 + signal.SIGTERM, logs[1].read_text()[-3000:]
        interrupted.wait(timeout=120)
        for name, why in (("terminated", "stopped by SIGTERM"), ("interrupted", "stopped by SIGINT")):
            parent, stages = runs_named(client, experiment_id, name)
            assert [s.info.status for s in stages] == ["KILLED"] and parent.info.status == "KILLED", name
            assert all(r.data.tags["vidopt.ended_by"].startswith(why) for r in (parent, *stages)), name
            flow_run, tasks = wait_for(f"the {name} flow run's task run final", lambda p=parent: (
                got := flow_run_and_tasks(p.data.tags["vidopt.prefect_flow_run_id"]))[1][0].state.is_final() and got)
            assert flow_run.state.type.value == "CANCELLED" and flow_run.state.message.startswith(why), name
            assert [t.state.type.value for t in tasks] == ["CANCELLED"], name
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.integration
def test_runs_clean_ends_dead_owners_runs_and_other_hosts_only_when_asked(prefect_api, tmp_path, capsys):
    """`vidopt runs clean`: on this host by the owner's pid and process start; elsewhere (or with no owner recorded)
    only under --older-than, judged by the heartbeat."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from flows.runs import main, owner_tag
    from vidopt.tracking import Owner

    project = tmp_path / "project"
    project.mkdir()
    client = MlflowClient(f"sqlite:///{project.resolve() / 'mlflow.db'}")
    experiment_id = client.create_experiment("clean-test", artifact_location=(project / "mlartifacts").as_uri())
    here, me = socket.gethostname(), Owner.this_process()
    hours_ago = int((time.time() - 5 * 3600) * 1000)
    owners = {"live": me, "dead": Owner(here, dead_pid(), me.started),
              "reused pid": Owner(here, me.pid, "another-boot/1"),   # this pid, but not the process that opened it
              "elsewhere, silent": Owner("elsewhere", me.pid, ""), "elsewhere, beating": Owner("elsewhere", 1, "")}
    runs = {name: client.create_run(experiment_id, run_name=name, start_time=hours_ago, tags=owner.tags()).info.run_id
            for name, owner in owners.items()}
    client.set_tag(runs["elsewhere, silent"], "vidopt.heartbeat", str(int(time.time() - 3 * 3600)))
    client.set_tag(runs["elsewhere, beating"], "vidopt.heartbeat", str(int(time.time())))
    runs["untagged"] = client.create_run(experiment_id, run_name="untagged", start_time=hours_ago).info.run_id
    # A child with no owner of its own (an export target's run) is judged by its parent's.
    runs["child of dead"] = client.create_run(experiment_id, run_name="child of dead", tags={
        "mlflow.parentRunId": runs["dead"]}).info.run_id

    @flow(name="vidopt-pipeline")
    def never_run():
        pass

    with get_client(sync_client=True) as prefect:
        flow_runs = {name: prefect.create_flow_run(never_run, tags=[owner_tag(owner)], state=Running()).id
                     for name, owner in (("live", me), ("dead", owners["dead"]))}

    def states() -> dict[str, str]:
        with get_client(sync_client=True) as prefect:
            found = {f"flow run {n}": prefect.read_flow_run(i).state.type.value for n, i in flow_runs.items()}
        return {**{n: client.get_run(i).info.status for n, i in runs.items()}, **found}

    overrides = ["--profile", "tiny", f"run.project_dir={project}", "tracking.experiment=clean-test"]
    assert main(["clean", *overrides, "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert "MLflow run dead (" in said and "would end FAILED" in said and "Prefect flow run" in said
    assert set(states().values()) == {"RUNNING"}, "a dry run changed something"

    assert main(["clean", *overrides]) == 0
    ended = {n for n, s in states().items() if s != "RUNNING"}
    assert ended == {"dead", "reused pid", "child of dead", "flow run dead"}
    assert {states()[n] for n in ended} == {"FAILED", "CRASHED"}
    reasons = {n: client.get_run(runs[n]).data.tags["vidopt.ended_by"] for n in ("dead", "reused pid")}
    assert reasons["dead"] == f"vidopt runs clean: its process {owners['dead'].pid} on {here} is gone"
    assert "the pid now belongs to another process" in reasons["reused pid"]
    with get_client(sync_client=True) as prefect:
        assert prefect.read_flow_run(flow_runs["dead"]).state.message == reasons["dead"]

    # Other hosts: only with --older-than, and only what has been silent that long (the heartbeat, else the start).
    assert main(["clean", *overrides, "--older-than", "1h"]) == 0
    ended = {n for n, s in states().items() if s != "RUNNING"}
    assert ended == {"dead", "reused pid", "child of dead", "flow run dead", "elsewhere, silent", "untagged"}
    assert "no sign of life from its process" in client.get_run(runs["elsewhere, silent"]).data.tags["vidopt.ended_by"]


def test_stopped_runs_end_killed_and_failed_ones_failed(tiny_cfg):
    """In-process: Ctrl-C in a stage ends the stage and pipeline runs KILLED, saying so; an error ends them FAILED;
    both carry their owner and the pipeline run a heartbeat."""
    from vidopt.tracking import Owner, interruption, pipeline_run, stage_run

    cfg = tiny_cfg("tracking.experiment=stops")
    ids = {}
    for name, error in (("interrupted", KeyboardInterrupt()), ("failed", RuntimeError("bad input"))):
        with pytest.raises(type(error)):
            with pipeline_run(cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": name})})) as parent:
                with stage_run("train_teacher", parent.run.info.run_id) as stage:
                    ids[name] = (parent.run.info.run_id, stage.run.info.run_id)
                    raise error
    client = MlflowClient(f"sqlite:///{Path(cfg.run.project_dir).resolve() / 'mlflow.db'}")
    for name, status in (("interrupted", "KILLED"), ("failed", "FAILED")):
        for run in map(client.get_run, ids[name]):
            assert run.info.status == status, name
            assert Owner.from_tags(run.data.tags) == Owner.this_process()
            assert run.data.tags.get("vidopt.ended_by") == ("stopped by SIGINT (Ctrl-C)" if status == "KILLED"
                                                            else None)
    assert client.get_run(ids["failed"][0]).data.tags["vidopt.heartbeat"].isdigit()
    assert interruption(SystemExit(128 + signal.SIGTERM)) == "stopped by SIGTERM"
    assert interruption(ValueError("x")) is None


def test_a_cached_stage_links_the_newest_finished_run_of_its_key(tiny_cfg):
    from vidopt.tracking import find_stage_run, link_cached_stage, pipeline_run, stage_run, tag_stage_runs

    cfg = tiny_cfg("tracking.experiment=links")
    produced = []
    for accuracy in (0.5, 0.75):   # two runs produced a result with this key: the newer is the one the cache holds
        with pipeline_run(cfg) as parent:
            with stage_run("distill", parent.run.info.run_id) as stage:
                stage.log("test_top1_clip", accuracy)
                stage.set_tags({"weights_sha256": "abc"})
            tag_stage_runs(parent.run.info.run_id, "distill", "key1")
            produced.append(stage.run.info.run_id)
        time.sleep(0.01)   # distinct start times
    assert find_stage_run("distill", "other-key") is None
    original = find_stage_run("distill", "key1")
    assert original.info.run_id == produced[-1]
    with pipeline_run(cfg) as parent:
        link = link_cached_stage(parent.run.info.run_id, original, "key1")
    client = MlflowClient(f"sqlite:///{Path(cfg.run.project_dir).resolve() / 'mlflow.db'}")
    run = client.get_run(link)
    assert run.info.status == "FINISHED" and run.info.run_name == "distill"
    assert run.data.tags["mlflow.parentRunId"] == parent.run.info.run_id
    assert run.data.tags["vidopt.cached_from_run_id"] == produced[-1] and run.data.tags["weights_sha256"] == "abc"
    assert run.data.metrics == {"test_top1_clip": 0.75}
    assert "vidopt.stage_key" not in run.data.tags   # a link is never taken for an original
    assert find_stage_run("distill", "key1").info.run_id == produced[-1]
