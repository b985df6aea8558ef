"""`vidopt serve`: the pipeline as two Prefect deployments run from this process, one on a cron schedule and one
started by `vidopt.data.arrived` events (debounced on the server). infra/prefect.yaml declares the same two for workers.

    prefect server start --host 127.0.0.1                                          # once, in another terminal
    PREFECT_API_URL=http://127.0.0.1:4200/api vidopt serve --profile demo serve.cron="0 */6 * * *"
"""
from __future__ import annotations

import logging
import time
from datetime import timedelta

import httpx
from prefect import serve as prefect_serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.events.schemas.automations import Posture
from prefect.schedules import Cron
from prefect.settings import get_current_settings

from flows.pipeline import pipeline
from vidopt.config import PipelineConfig, ServeConfig
from vidopt.errors import VidoptError

# Prefect refuses a Proactive trigger whose `within` is under 10 s (prefect/events/schemas/automations.py).
PROACTIVE_MIN_WITHIN_S = 10.0
# Optional resource label of `vidopt.data.arrived` events: events with different values are debounced separately.
DEBOUNCE_GROUP_LABEL = "vidopt.debounce-group"
# How often the runner asks the server for runs to start. Prefect's default (10 s) alone would break the "object put ->
# run started within 10 s" bar; one small query a second costs nothing.
RUNNER_POLL_S = 1.0
START_SERVER_HINT = ("start one with `prefect server start --host 127.0.0.1` and set "
                     "PREFECT_API_URL=http://127.0.0.1:4200/api")


class ServeError(VidoptError, RuntimeError):
    """`vidopt serve` cannot run as asked; the message says what to do."""


class OncePerInterval(logging.Filter):
    """Lets a record whose message contains `text` through at most once every `every_s` seconds: the runner says
    "1 scheduled runs skipped (at capacity)" at every poll (each second) while a debounced run waits its turn."""

    def __init__(self, text: str, every_s: float = 60.0):
        super().__init__()
        self.text, self.every_s, self.last = text, every_s, float("-inf")

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text not in record.getMessage():
            return True
        now = time.monotonic()
        if now - self.last < self.every_s:
            return False
        self.last = now
        return True


def deployment_names(serve_cfg: ServeConfig) -> tuple[str, str]:
    """(scheduled, on-new-data) deployment names."""
    return f"{serve_cfg.deployment}-scheduled", f"{serve_cfg.deployment}-on-new-data"


def pipeline_parameters(cfg: PipelineConfig) -> dict:
    """The flow's parameters: the whole resolved config, so the UI's run form is PipelineConfig filled with it."""
    return {"config": cfg.model_dump(mode="json")}


def one_at_a_time() -> ConcurrencyLimitConfig:
    # [Prefect] At most one run per deployment; ENQUEUE makes a run that starts while another is running wait
    # (AwaitingConcurrencySlot, retried every 30 s by default) instead of being dropped (CANCEL_NEW): the run a burst's
    # last event starts must still happen after the one its first event started, so the last data version has it all.
    return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def quiet_window_s(serve_cfg: ServeConfig) -> float:
    """Seconds without an event after which a burst counts as over: serve.debounce_s, but at least Prefect's minimum."""
    return max(serve_cfg.debounce_s, PROACTIVE_MIN_WITHIN_S)


def data_arrived_triggers(serve_cfg: ServeConfig) -> list[DeploymentEventTrigger]:
    """Two triggers: a burst's first event starts a run at once, and the burst's end starts one more.

    What Prefect's server does (prefect/server/events/triggers.py, `evaluate`):
    - Reactive, threshold 1, within W: fires on the first matching event, then opens its next bucket W after it; events
      before that bucket starts are ignored ("late event"), not deferred. A throttle: fast, but the objects of a burst
      that land after its first event would wait for the next burst or the cron run.
    - Proactive, after = expect = {event}, threshold 1, within W (>= 10 s): every event restarts the bucket (the
      "same event in after and expect" case), and the periodic proactive evaluation (every 5 s by default) fires once a
      bucket ends with no further event: a trailing debounce, W quiet seconds after the burst's last event.
    Together: a burst (any length up to W) gives at most 2 runs (first event, and quiet), the second of which sees all
    of the burst; with `one_at_a_time` it waits for the first. The price: a single event also gives 2 runs; the second
    finds the same data version and reuses the finished stages (stage dirs are keyed by content hashes).

    `for_each` names DEBOUNCE_GROUP_LABEL, a resource label our events need not carry: events without it share one
    bucket (key ""). It must not be empty: for a Proactive trigger without `for_each`, the periodic evaluation opens a
    fresh empty bucket after every firing (`proactive_evaluation`), so the trigger fired every 2W with no event at all
    (measured: a run every ~20 s with W = 10 s).
    """
    event, window = serve_cfg.event, serve_cfg.debounce_s
    first = DeploymentEventTrigger(
        name=f"{serve_cfg.deployment}: first {event} of a burst",
        description=f"Starts a run on a burst's first {event} event, then ignores further ones for {window:g} s.",
        expect={event}, for_each={DEBOUNCE_GROUP_LABEL},
        posture=Posture.Reactive, threshold=1, within=timedelta(seconds=window))
    quiet = quiet_window_s(serve_cfg)
    last = DeploymentEventTrigger(
        name=f"{serve_cfg.deployment}: {event} burst over",
        description=f"Starts a run once no {event} event came for {quiet:g} s after one did, so the last run of a "
                    "burst sees all of it.",
        after={event}, expect={event}, for_each={DEBOUNCE_GROUP_LABEL},
        posture=Posture.Proactive, threshold=1, within=timedelta(seconds=quiet))
    return [first, last]


def build_deployments(cfg: PipelineConfig) -> list[RunnerDeployment]:
    """[scheduled (cron; without `serve.cron` only runnable by hand), on-new-data (event triggers)]."""
    scheduled_name, on_data_name = deployment_names(cfg.serve)
    common = dict(parameters=pipeline_parameters(cfg), concurrency_limit=one_at_a_time(), version=cfg.config_hash())
    schedules = [Cron(cfg.serve.cron, timezone=cfg.serve.timezone)] if cfg.serve.cron else None
    scheduled = pipeline.to_deployment(
        scheduled_name, schedules=schedules, tags=["vidopt", "scheduled"], **common,
        description=f"The vidopt pipeline on a schedule ({cfg.serve.cron or 'none: run it from the UI'}, "
                    f"{cfg.serve.timezone}). Parameters: the resolved PipelineConfig.")
    on_new_data = pipeline.to_deployment(
        on_data_name, triggers=data_arrived_triggers(cfg.serve), tags=["vidopt", "event"], **common,
        description=f"The vidopt pipeline when `{cfg.serve.event}` events arrive (from `vidopt listen`): one run at a "
                    f"burst's first event and one {quiet_window_s(cfg.serve):g} s after its last. "
                    "Parameters: the resolved PipelineConfig.")
    return [scheduled, on_new_data]


def check_api_server() -> str:
    """The API URL of a reachable Prefect server; ServeError (saying how to start one) otherwise. An ephemeral server
    would vanish with this process, and with it the deployments, schedules and triggers."""
    url = get_current_settings().api.url
    if not url:
        raise ServeError(f"vidopt serve: PREFECT_API_URL is not set; it needs a running Prefect server: "
                         f"{START_SERVER_HINT}")
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=5).raise_for_status()
    except httpx.HTTPError as err:
        raise ServeError(f"vidopt serve: no Prefect server answers at PREFECT_API_URL={url} ({err}); "
                         f"{START_SERVER_HINT}") from None
    return url


def serve(cfg: PipelineConfig) -> None:
    """Register both deployments and run their flow runs here until interrupted (Ctrl-C pauses the schedule)."""
    url = check_api_server()
    logging.getLogger("prefect.runner").addFilter(OncePerInterval("scheduled runs skipped (at capacity)"))
    deployments = build_deployments(cfg)
    print(f"vidopt serve: {', '.join(d.name for d in deployments)} on {url}")
    # [Prefect] limit=1: this process runs one pipeline at a time, so a cron run and an event run never share the
    # project dir and the cores; the other waits in Scheduled until the first ends.
    prefect_serve(*deployments, limit=1, query_seconds=RUNNER_POLL_S)
