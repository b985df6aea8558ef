"""Runs left open by a dead process: `vidopt runs clean`, the same check at the start of every pipeline run, and the
flow hook that records a run stopped by SIGTERM or Ctrl-C as Cancelled instead of Crashed.

    vidopt runs clean [--profile demo] [key.sub=value ...] [--older-than 2h] [--all-experiments] [--dry-run]

A run on this host is ended when its owner process (pid and process start, so a reused pid is not taken for it) is
gone: MLflow runs become FAILED with the reason in the tag vidopt.ended_by, Prefect flow runs and their open task runs
Crashed with it as the message. Another host's processes cannot be checked from here: its runs are ended only with
--older-than, when the pipeline's heartbeat (an MLflow tag written every minute) is older than that.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Any

from vidopt.config import ConfigError, PipelineConfig, load_config
from vidopt.tracking import EndedRun, Owner, dead_reason, default_tracking_uri, end_dead_runs, interruption, \
    last_heartbeat

log = logging.getLogger("vidopt.runs")
FLOW_NAME = "vidopt-pipeline"
OWNER_TAG = "vidopt.owner:"          # Prefect flow-run tag: vidopt.owner:<host>:<pid>:<process start>
MLFLOW_TAG = "vidopt.mlflow_run:"    # Prefect flow-run tag: vidopt.mlflow_run:<the pipeline's MLflow run id>


def owner_tag(owner: Owner) -> str:
    return f"{OWNER_TAG}{owner.host}:{owner.pid}:{owner.started}"


def owner_from_flow_run_tags(tags: list[str]) -> Owner | None:
    for tag in tags:
        if tag.startswith(OWNER_TAG):
            host, pid, started = tag.removeprefix(OWNER_TAG).rsplit(":", 2)
            return Owner(host, int(pid), started) if pid.isdigit() else None
    return None


def tag_flow_run(mlflow_run_id: str | None = None) -> str:
    """[Prefect] marks the current flow run with this process as its owner (and its MLflow run, once there is one).
    -> the flow run's id, "" outside a flow."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return ""
    flow_run = context.flow_run
    tags = [t for t in flow_run.tags if not t.startswith(OWNER_TAG)] + [owner_tag(Owner.this_process())]
    if mlflow_run_id:
        tags = [t for t in tags if not t.startswith(MLFLOW_TAG)] + [f"{MLFLOW_TAG}{mlflow_run_id}"]
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=tags)
    flow_run.tags = tags
    return str(flow_run.id)


def cancel_if_interrupted(flow: Any, flow_run: Any, state: Any) -> None:
    """[Prefect] on_crashed hook: a run stopped on purpose (SIGTERM, Ctrl-C) becomes Cancelled, it and its unfinished
    task runs; Prefect's engine calls any BaseException a crash. A real crash stays Crashed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.states import Cancelled

    why = interruption(state.data if isinstance(state.data, BaseException) else None)
    if why is None:
        return
    with get_client(sync_client=True) as client:
        for task_run in _open_task_runs(client, FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])),
                                        with_crashed=True):
            client.set_task_run_state(task_run.id, Cancelled(message=why), force=True)
        result = client.set_flow_run_state(flow_run.id, Cancelled(message=why), force=True)
    if result.state is not None:   # the engine reports, and returns, the state of this object
        flow_run.state = result.state


def _open_task_runs(client, flow_run_filter, with_crashed: bool = False) -> list:
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterState, TaskRunFilterStateType
    from prefect.client.schemas.objects import StateType

    types = [StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED] + ([StateType.CRASHED] if with_crashed else [])
    return client.read_task_runs(flow_run_filter=flow_run_filter, task_run_filter=TaskRunFilter(
        state=TaskRunFilterState(type=TaskRunFilterStateType(any_=types))))


def end_dead_flow_runs(by: str, older_than_s: float | None = None, dry_run: bool = False) -> list[tuple[Any, str]]:
    """[Prefect] Crashed, with "<by>: <reason>" as the message, for every open vidopt flow run that dead_reason
    condemns, and for its open task runs. -> [(flow run, reason)]."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    ended, open_runs, page = [], [], None
    with get_client(sync_client=True) as client:
        while page is None or len(page) == 200:   # the API answers in pages
            page = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                    any_=[StateType.RUNNING, StateType.PENDING, StateType.CANCELLING]))), limit=200,
                offset=len(open_runs))
            open_runs += page
        for flow_run in open_runs:
            reason = dead_reason(owner_from_flow_run_tags(flow_run.tags), _last_seen(flow_run), older_than_s)
            if reason is None:
                continue
            ended.append((flow_run, reason))
            if dry_run:
                continue
            message = f"{by}: {reason}"
            for task_run in _open_task_runs(client, FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))):
                client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
            client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
    return ended


def _last_seen(flow_run) -> float:
    """A flow run's last sign of life: its MLflow run's heartbeat, else its start (or creation)."""
    for tag in flow_run.tags:
        if tag.startswith(MLFLOW_TAG) and (beat := last_heartbeat(tag.removeprefix(MLFLOW_TAG))) is not None:
            return beat
    started = flow_run.start_time or flow_run.created
    return started.timestamp() if started else 0.0


def experiment_ids(all_experiments: bool, experiment: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if all_experiments:
        return [e.experiment_id for e in client.search_experiments(max_results=50000)]
    found = client.get_experiment_by_name(experiment)
    return [found.experiment_id] if found else []


def clean(cfg: PipelineConfig, by: str, older_than_s: float | None = None, all_experiments: bool = False,
          dry_run: bool = False) -> tuple[list[EndedRun], list[tuple[Any, str]]]:
    """Ends the MLflow runs (the configured experiment, or all) and Prefect flow runs of dead vidopt processes; see the
    module's docstring for the rule. Assumes MLflow's tracking URI and Prefect's settings are those of `cfg`."""
    runs = end_dead_runs(experiment_ids(all_experiments, cfg.tracking.experiment), by, older_than_s, dry_run)
    return runs, end_dead_flow_runs(by, older_than_s, dry_run)


def clean_at_start(cfg: PipelineConfig) -> None:
    """What a pipeline run does first, inside its flow: end what dead runs on this host left open. Never fails the
    run: a store it cannot reach now is for `vidopt runs clean` later."""
    from vidopt.tracking import configure_mlflow

    try:
        configure_mlflow(cfg)
        runs, flow_runs = clean(cfg, by=f"vidopt run {cfg.run.name}")
    except Exception as err:   # bookkeeping of other runs; this run goes on
        log.warning("runs: could not end the runs of dead processes (%s); `vidopt runs clean` tries again", err)
        return
    for run in runs:
        log.info("runs: MLflow run %s (%s) ended FAILED: %s", run.name, run.run_id, run.reason)
    for flow_run, reason in flow_runs:
        log.info("runs: Prefect flow run %s (%s) ended Crashed: %s", flow_run.name, flow_run.id, reason)


DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(text: str) -> float:
    """'90s', '30m', '2h', '1d' (a bare number is seconds) -> seconds."""
    match = DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration such as 90s, 30m, 2h or 1d")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidopt runs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    do = sub.add_parser("clean", help="end the MLflow and Prefect runs of vidopt processes that died")
    do.add_argument("--profile", default="demo", help="a profile in flows/configs/ or a .yaml path (default demo)")
    do.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. run.project_dir=DIR")
    do.add_argument("--older-than", type=parse_duration, metavar="DURATION",
                    help="also end runs of other hosts (or with no owner recorded) with no heartbeat for this long")
    do.add_argument("--all-experiments", action="store_true",
                    help="every MLflow experiment of the store, not only tracking.experiment")
    do.add_argument("--dry-run", action="store_true", help="list what would be ended, change nothing")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.profile, args.overrides)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    from flows.cli import prefect_env

    prefect_env(cfg)   # before Prefect is imported: the project's own Prefect database, as `vidopt run` uses
    import mlflow

    uri = cfg.tracking.uri or default_tracking_uri(cfg.run.project_dir)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        print(f"runs: no MLflow store at {uri}: nothing was tracked in {cfg.run.project_dir} yet", file=sys.stderr)
        return 0
    mlflow.set_tracking_uri(uri)
    by = "vidopt runs clean" + (" --dry-run" if args.dry_run else "")
    runs, flow_runs = clean(cfg, by, args.older_than, args.all_experiments, args.dry_run)
    verb = "would end" if args.dry_run else "ended"
    for run in runs:
        print(f"MLflow run {run.name} ({run.run_id}, experiment {run.experiment_id}) {verb} FAILED: {run.reason}")
    for flow_run, reason in flow_runs:
        print(f"Prefect flow run {flow_run.name} ({flow_run.id}) {verb} Crashed: {reason}")
    if not runs and not flow_runs:
        print(f"runs: nothing to end in {uri} and Prefect's database")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
