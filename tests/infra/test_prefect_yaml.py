"""infra/prefect.yaml declares what `vidopt serve` registers (compared field by field), and `prefect deploy --all` with
it succeeds against a real server, which then shows the schedule, the triggers and the limit; a second run of a
deployment waits for the first instead of being dropped."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.flows.test_serve import automations_of, read_deployment
from vidopt.config import load_config

REPO = Path(__file__).resolve().parents[2]
PREFECT_YAML = REPO / "infra" / "prefect.yaml"


def declared_deployments() -> dict[str, dict]:
    return {spec["name"]: spec for spec in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}


def test_prefect_yaml_declares_what_vidopt_serve_registers():
    from prefect.events import DeploymentEventTrigger

    from flows.serve import build_deployments

    demo = load_config("demo")  # `vidopt serve`'s default profile
    declared = declared_deployments()
    built = build_deployments(demo)
    assert sorted(declared) == sorted(d.name for d in built)
    for deployment in built:
        spec = declared[deployment.name]
        # the same flow, named by the profile serve resolved instead of the resolved config
        assert (spec["entrypoint"], deployment.entrypoint) == ("flows/pipeline.py:pipeline_from_profile",
                                                               "flows/pipeline.py:pipeline")
        assert load_config(spec["parameters"]["profile"], spec["parameters"]["overrides"]) == demo
        assert spec["tags"] == deployment.tags
        assert spec["description"].split("Parameters:")[0] == deployment.description.split("Parameters:")[0]
        assert spec["work_pool"]["name"] == "vidopt-process"
        assert spec["concurrency_limit"] == {"limit": deployment.concurrency_limit,
                                             "collision_strategy": deployment.concurrency_options.collision_strategy}
        schedules = [{"cron": s.schedule.cron, "timezone": s.schedule.timezone} for s in deployment.schedules]
        assert spec.get("schedules", []) == schedules
        triggers = [DeploymentEventTrigger.model_validate(t).model_dump() for t in spec.get("triggers", [])]
        assert triggers == [t.model_dump() for t in deployment.triggers]


@pytest.mark.integration
def test_prefect_deploy_all_against_a_server(prefect_server, tmp_path):
    # what the header of infra/prefect.yaml says to type, in a shell in the repo root
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "home"), "PWD": str(REPO)}

    def prefect(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, f"prefect {' '.join(args)}: exit {done.returncode}\n{done.stdout[-3000:]}" \
                                     f"\n{done.stderr[-3000:]}"

    api = httpx.Client(base_url=prefect_server, timeout=30)
    prefect("work-pool", "create", "vidopt-process", "--type", "process")
    try:
        prefect("--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect.yaml")
        scheduled, on_new_data = read_deployment(api, "vidopt-scheduled"), read_deployment(api, "vidopt-on-new-data")
        for deployment in (scheduled, on_new_data):
            assert deployment["work_pool_name"] == "vidopt-process"
            assert deployment["entrypoint"] == "flows/pipeline.py:pipeline_from_profile"
            assert deployment["parameters"] == {"profile": "demo", "overrides": []}
            assert set(deployment["parameter_openapi_schema"]["properties"]) == {"profile", "overrides"}
            assert deployment["pull_steps"] == [
                {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
            assert deployment["global_concurrency_limit"]["limit"] == 1
            assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
        [schedule] = scheduled["schedules"]
        assert schedule["schedule"]["cron"] == "0 3 * * *" and schedule["schedule"]["timezone"] == "UTC"
        assert on_new_data["schedules"] == [] and automations_of(api, scheduled["id"]) == []
        triggers = sorted((t["posture"], t["after"], t["expect"], t["within"])
                          for t in (a["trigger"] for a in automations_of(api, on_new_data["id"])))
        assert triggers == [("Proactive", ["vidopt.data.arrived"], ["vidopt.data.arrived"], 30.0),
                            ("Reactive", [], ["vidopt.data.arrived"], 30.0)]

        # ENQUEUE: while one run holds the deployment's slot, a second one proposed Pending is sent back to wait
        # (AwaitingConcurrencySlot), not cancelled; once the first ends, it goes ahead. States set as a worker would.
        def propose(run: dict, state_type: str) -> dict:
            return api.post(f"/flow_runs/{run['id']}/set_state", json={"state": {"type": state_type}}).json()

        def create_run() -> dict:
            for _ in range(3):  # the sqlite-backed server answers 503 "database is locked" under load
                response = api.post(f"/deployments/{on_new_data['id']}/create_flow_run", json={})
                if response.status_code < 500:
                    break
                time.sleep(1)
            assert response.status_code == 201, f"create_flow_run: {response.status_code} {response.text[:2000]}"
            return response.json()

        first, second = create_run(), create_run()
        assert propose(first, "PENDING")["status"] == "ACCEPT" and propose(first, "RUNNING")["status"] == "ACCEPT"
        waiting = propose(second, "PENDING")
        assert waiting["status"] == "REJECT" and waiting["state"]["name"] == "AwaitingConcurrencySlot"
        assert waiting["state"]["type"] == "SCHEDULED"
        assert propose(first, "COMPLETED")["status"] == "ACCEPT"
        assert propose(second, "PENDING")["status"] == "ACCEPT"
    finally:  # leave the shared server without these deployments and their triggers
        for name in ("vidopt-scheduled", "vidopt-on-new-data"):
            if deployment := read_deployment(api, name):
                api.delete(f"/automations/owned-by/prefect.deployment.{deployment['id']}")
                api.delete(f"/deployments/{deployment['id']}")
        api.delete("/work_pools/vidopt-process")
