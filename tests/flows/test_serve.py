"""`vidopt serve`: a cron deployment and a `vidopt.data.arrived` deployment carrying the resolved config; on a real
Prefect server, an event starts a run within 10 s, and a burst of 50 events starts 2 runs, not 50 (nor more later)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from flows.cli import main
from tests.conftest import free_port
from vidopt.config import PipelineConfig, load_config

REPO = Path(__file__).resolve().parents[2]
EVENT = "vidopt.data.arrived"


def test_deployments_carry_the_config_schedule_triggers_and_limit(tiny_cfg):
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    from flows.serve import build_deployments

    cfg = tiny_cfg("serve.cron=15 4 * * 1", "serve.timezone=Europe/Berlin", "serve.debounce_s=45")
    scheduled, on_new_data = build_deployments(cfg)
    assert (scheduled.name, on_new_data.name) == ("vidopt-scheduled", "vidopt-on-new-data")
    for deployment in (scheduled, on_new_data):
        assert PipelineConfig.model_validate(deployment.parameters["config"]) == cfg
        assert deployment.concurrency_limit == 1
        assert deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    [schedule] = scheduled.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("15 4 * * 1", "Europe/Berlin")
    assert scheduled.triggers == [] and on_new_data.schedules == []

    first, last = on_new_data.triggers
    assert (first.posture, first.threshold, first.within) == ("Reactive", 1, timedelta(seconds=45))
    assert (first.expect, first.after) == ({EVENT}, set())
    assert (last.posture, last.threshold, last.within) == ("Proactive", 1, timedelta(seconds=45))
    assert last.expect == last.after == {EVENT}
    assert first.for_each == last.for_each != set()  # see data_arrived_triggers: empty makes Proactive fire unprompted


def test_quiet_window_is_at_least_prefects_minimum_and_cron_is_optional(tiny_cfg):
    from flows.serve import build_deployments

    scheduled, on_new_data = build_deployments(tiny_cfg("serve.debounce_s=3", "serve.cron=null"))
    first, last = on_new_data.triggers
    assert first.within == timedelta(seconds=3) and last.within == timedelta(seconds=10)
    assert not scheduled.schedules


def test_serve_without_a_server_says_how_to_start_one(tmp_path, cli_env, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    args = ["serve", "--profile", "tiny", f"run.project_dir={tmp_path}"]
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(args) == 1   # an environment to fix (2 is for the config)
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err
    nobody = f"http://127.0.0.1:{free_port()}/api"
    with temporary_settings(updates={PREFECT_API_URL: nobody}):
        assert main(args) == 1
    err = capsys.readouterr().err
    assert f"no Prefect server answers at PREFECT_API_URL={nobody}" in err
    assert "prefect server start --host 127.0.0.1" in err


# ---- against a real server -------------------------------------------------------------------------------------------

def read_deployment(api: httpx.Client, name: str) -> dict | None:
    response = api.get(f"/deployments/name/vidopt-pipeline/{name}")
    return response.json() if response.status_code == 200 else None


def automations_of(api: httpx.Client, deployment_id: str) -> list[dict]:
    return [a for a in api.post("/automations/filter", json={}).json()
            if any(action.get("deployment_id") == deployment_id for action in a["actions"])]


def runs_of(api: httpx.Client, deployment_id: str) -> list[dict]:
    return api.post("/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment_id]}},
                                               "sort": "EXPECTED_START_TIME_ASC"}).json()


def cancel_runs(api: httpx.Client, deployment_id: str) -> None:
    """Scheduled runs are cancelled outright; started ones are set Cancelling, so the serving runner kills them."""
    for state_type, new_type in (("SCHEDULED", "CANCELLED"), ("PENDING", "CANCELLING"), ("RUNNING", "CANCELLING")):
        api.post("/flow_runs/bulk_set_state", json={
            "flow_runs": {"deployment_id": {"any_": [deployment_id]}, "state": {"type": {"any_": [state_type]}}},
            "state": {"type": new_type}, "force": True})


def emit(api: httpx.Client, source: Path, count: int) -> tuple[datetime, datetime]:
    """`count` events shaped like `vidopt listen`'s, each with its own time; returns when the first and last one
    occurred."""
    events = [{"id": str(uuid.uuid4()), "occurred": datetime.now(timezone.utc).isoformat(), "event": EVENT,
               "resource": {"prefect.resource.id": f"vidopt.source.{source}", "prefect.resource.name": str(source)},
               "payload": {"keys": [f"class_a/clip_{i}.mp4"], "source": str(source)}}
              for i in range(count)]
    api.post("/events", json=events).raise_for_status()
    return datetime.fromisoformat(events[0]["occurred"]), datetime.fromisoformat(events[-1]["occurred"])


def seconds_between(earlier: datetime, later_iso: str) -> float:
    return (datetime.fromisoformat(later_iso) - earlier).total_seconds()


def wait_for(what: str, check, timeout_s: float, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(every_s)
    return value


def start_serving(prefect_server: str, tmp_path: Path, overrides: list[str]):
    """`vidopt serve --profile tiny <overrides>` in its own process against the session's server -> (process, log)."""
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--profile", "tiny", *overrides],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log_path


def stop_serving(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the runner stops and kills its flow-run processes
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture
def served(prefect_server, tmp_path):
    """`vidopt serve --profile tiny` against the session's server; the data source is an empty folder, so a run that
    gets as far as ingest fails at once. Yields (the resolved config, its log file)."""
    empty = tmp_path / "bucket"
    empty.mkdir()
    overrides = [f"run.project_dir={tmp_path / 'project'}", f"data.source={empty}", "data.sample_if_missing=false",
                 "serve.deployment=vidopt-serve-test", "serve.cron=15 4 * * *", "serve.timezone=Europe/Berlin",
                 "serve.debounce_s=10"]  # 10 s: Prefect's smallest quiet window, for a short test
    proc, log_path = start_serving(prefect_server, tmp_path, overrides)
    yield load_config("tiny", overrides), log_path
    stop_serving(proc)


@pytest.mark.integration
def test_serve_registers_deployments_and_debounces_events(prefect_server, served):
    cfg, log_path = served
    api = httpx.Client(base_url=prefect_server, timeout=30)

    def registered():
        both = [read_deployment(api, f"vidopt-serve-test-{kind}") for kind in ("scheduled", "on-new-data")]
        return both if all(both) and automations_of(api, both[1]["id"]) else None

    try:
        scheduled, on_new_data = wait_for("both deployments and the trigger", registered, timeout_s=120, every_s=1)
    except AssertionError:
        raise AssertionError(f"vidopt serve did not register; its log ends:\n{log_path.read_text()[-3000:]}") from None

    # what the UI shows: the config as the run form's values, the schedule, the triggers
    for deployment in (scheduled, on_new_data):
        assert deployment["parameters"] == {"config": cfg.model_dump(mode="json")}
        assert "PipelineConfig" in deployment["parameter_openapi_schema"]["definitions"]
        assert deployment["global_concurrency_limit"]["limit"] == 1
        assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    [schedule] = scheduled["schedules"]
    assert schedule["schedule"]["cron"] == "15 4 * * *" and schedule["schedule"]["timezone"] == "Europe/Berlin"
    triggers = sorted((a["trigger"]["posture"], a["trigger"]["expect"], a["trigger"]["within"])
                      for a in automations_of(api, on_new_data["id"]))
    assert triggers == [("Proactive", [EVENT], 10.0), ("Reactive", [EVENT], 10.0)]

    try:
        # A burst of 50 events within 5 s (10 posts of 5, 0.4 s apart), like 50 objects put at once.
        first_event, last_event = emit(api, Path(cfg.data.source), 5)
        for _ in range(9):
            time.sleep(0.4)
            last_event = emit(api, Path(cfg.data.source), 5)[1]
        assert (last_event - first_event).total_seconds() < 5

        # the burst's first event: a run within 10 s, which the serving runner then starts
        first = wait_for("a run of the first event", lambda: runs_of(api, on_new_data["id"]) or None, 15)[0]
        assert seconds_between(first_event, first["created"]) <= 10, first["created"]
        assert first["parameters"]["config"]["data"]["source"] == cfg.data.source
        started = wait_for("the runner to start it", lambda: [s for s in api.get(
            "/flow_run_states/", params={"flow_run_id": first["id"]}).json() if s["type"] != "SCHEDULED"] or None, 30)
        print(f"event -> run created {seconds_between(first_event, first['created']):.1f} s, "
              f"-> started {seconds_between(first_event, min(s['timestamp'] for s in started)):.1f} s")
        cancel_runs(api, on_new_data["id"])  # the runs need not finish: created and started is what is checked

        # the burst's end: one more run, 10 s of quiet after the last event (+ up to 5 s of Prefect's periodic check)
        runs = wait_for("the run of the burst's end", lambda: (r := runs_of(api, on_new_data["id"]))[1:] and r, 30)
        assert len(runs) == 2, [(r["created"], r["state_name"]) for r in runs]
        assert seconds_between(last_event, runs[1]["created"]) >= 10
        cancel_runs(api, on_new_data["id"])
        # ... and nothing more once quiet (a Proactive trigger without for_each fired again 20-25 s later)
        time.sleep(27)
        assert len(runs_of(api, on_new_data["id"])) == 2

        # runnable by hand, like the UI's Run button: a run with the deployment's parameters, started by the runner
        by_hand = api.post(f"/deployments/{scheduled['id']}/create_flow_run", json={}).json()
        assert by_hand["parameters"] == scheduled["parameters"]
        wait_for("the runner to start the run made by hand",
                 lambda: api.get(f"/flow_runs/{by_hand['id']}").json()["state_type"] != "SCHEDULED", 30)
    finally:
        cancel_runs(api, on_new_data["id"])
        cancel_runs(api, scheduled["id"])


def test_the_runners_at_capacity_line_is_said_once_a_minute_not_every_poll():
    import logging

    from flows.serve import OncePerInterval

    quiet = OncePerInterval("scheduled runs skipped (at capacity)", every_s=60)
    said = [quiet.filter(logging.makeLogRecord({"msg": "%d scheduled runs skipped (at capacity)", "args": (1,)}))
            for _ in range(140)]
    assert said.count(True) == 1
    assert quiet.filter(logging.makeLogRecord({"msg": "Runner 'x' submitting flow run"}))   # other lines pass


@pytest.mark.integration
def test_a_served_deployments_run_shows_vidopts_epoch_and_target_lines_in_its_logs(prefect_server, sample_dir,
                                                                                   tmp_path):
    overrides = [f"run.project_dir={tmp_path / 'project'}", f"data.source={sample_dir}", "serve.deployment=vidopt-logs",
                 "teacher.epochs=1", "distill.epochs=1", "prune.finetune_epochs=1", "export.targets=[cpu]"]
    proc, log_path = start_serving(prefect_server, tmp_path, overrides)
    api = httpx.Client(base_url=prefect_server, timeout=30)
    try:
        deployment = wait_for("the deployment", lambda: read_deployment(api, "vidopt-logs-scheduled"), 120, 1)
        for _ in range(3):   # the sqlite-backed server answers 503 "database is locked" under load
            response = api.post(f"/deployments/{deployment['id']}/create_flow_run", json={})
            if response.status_code < 500:
                break
            time.sleep(1)
        assert response.status_code == 201, response.text[:2000]
        run = response.json()
        state = wait_for("the run to finish", lambda: (s := api.get(f"/flow_runs/{run['id']}").json()["state_type"])
                         in ("COMPLETED", "FAILED", "CRASHED") and s, 600, 2)
        assert state == "COMPLETED", log_path.read_text()[-3000:]

        def lines():   # every page of the run's logs: one page holds 200
            found, page = [], None
            while page is None or len(page) == 200:
                page = api.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [run["id"]]}},
                                                      "limit": 200, "offset": len(found)}).json()
                found += page
            return [log["message"] for log in found if log["name"].startswith("vidopt.")]
        wait_for("vidopt's lines in the run's logs", lambda: any("export: cpu ok" in m for m in lines()), 30)
        assert any(m.startswith("train_teacher: epoch 1/1") for m in lines()), lines()
    finally:
        stop_serving(proc)
