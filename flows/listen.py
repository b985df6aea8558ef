"""`vidopt listen`: emit `serve.event` (vidopt.data.arrived) for each batch of new clips under data.source.

Prefect glue only; finding, batching and remembering objects is vidopt/listen.py. Point it at the Prefect server that
`vidopt serve` uses, so the deployment's trigger sees the events:

    PREFECT_API_URL=http://127.0.0.1:4200/api vidopt listen --profile demo data.source=s3://bucket/clips
"""
from __future__ import annotations

import logging
import threading
from uuid import UUID

from prefect.client.orchestration import get_client  # [prefect]
from prefect.events import emit_event  # [prefect]
from prefect.events.worker import EventsWorker  # [prefect]
from prefect.settings import PREFECT_API_URL  # [prefect]

from vidopt.config import PipelineConfig, redact
from vidopt.listen import Batch, EmitFailed, listener_from_config

log = logging.getLogger("vidopt.listen")  # vidopt.* loggers reach Prefect's handlers (PREFECT_LOGGING_EXTRA_LOGGERS)
FLUSH_TIMEOUT_S = 30.0  # Prefect's client retries a lost connection 10 times, about a second apart
KEYS_IN_LOG = 3  # a burst of 500 keys would flood the log; the event itself carries them all


def event_resource(source: str) -> dict[str, str]:
    shown = redact(source)
    return {"prefect.resource.id": f"vidopt.source.{shown}", "prefect.resource.name": shown}


def emit_batch(cfg: PipelineConfig, batch: Batch) -> None:
    """Send one batch as a Prefect event whose id is the batch id, and wait until it has left this process.

    emit_event only queues the event for a background worker that logs (not raises) delivery errors, so: check the
    API first (a server that is down keeps the batch in the outbox), then wait for the worker before the batch is
    acked. Re-sending after a crash is safe within minutes: Prefect's server drops an event id it has seen (a 5-min
    cache before its triggers, a 30-min one inside them; stored events are unique by id). tests/flows/test_listen.py
    shows one stored event and one automation firing for two sends.
    """
    api_url = PREFECT_API_URL.value()
    if api_url:
        with get_client(sync_client=True) as client:  # [prefect]
            problem = client.api_healthcheck()
        if problem is not None:
            raise EmitFailed(f"Prefect API {redact(api_url)} unreachable ({type(problem).__name__}: {problem})")
    worker = EventsWorker.instance()  # [prefect] the one emit_event queues on; taken first: a dead one is replaced
    event = emit_event(event=cfg.serve.event, resource=event_resource(batch.source),  # [prefect]
                       payload={"keys": batch.keys, "source": batch.source}, id=UUID(batch.id))
    if event is None:
        raise EmitFailed("Prefect sent nothing (events are off with PREFECT_API_KEY set but no PREFECT_API_URL)")
    # Flush: wait until the worker has sent it. Not drain(): that closes the websocket (one per batch) and logs a
    # warning each time. A worker that died connecting never finishes its queue, hence the thread and the timeout.
    flushed = threading.Thread(target=worker.wait_until_empty, daemon=True)
    flushed.start()
    flushed.join(FLUSH_TIMEOUT_S)
    if flushed.is_alive():
        raise EmitFailed(f"event {batch.id} not sent within {FLUSH_TIMEOUT_S:g} s")
    more = f" (+{len(batch.keys) - KEYS_IN_LOG} more)" if len(batch.keys) > KEYS_IN_LOG else ""
    log.info("listen: emitted %s id=%s: %d new clips in %s: %s%s", cfg.serve.event, batch.id, len(batch.keys),
             redact(batch.source), ", ".join(batch.keys[:KEYS_IN_LOG]), more)


def listen(cfg: PipelineConfig, once: bool = False, stop: threading.Event | None = None) -> int:
    """Watch data.source and emit until `stop` is set or Ctrl-C (`once`: one pass, emit everything found, return).
    Returns the number of events emitted."""
    if not PREFECT_API_URL.value():
        log.warning("listen: PREFECT_API_URL is not set, so events go to a Prefect server private to this process and "
                    "no deployment sees them; set it to the server `vidopt serve` uses")
    with listener_from_config(cfg) as listener:
        mode = f"SQS {cfg.listen.sqs_queue_url}" if cfg.listen.sqs_queue_url else \
            f"polling every {cfg.listen.poll_interval_s:g} s"
        log.info("listen: watching %s (%s; quiet %g s, max wait %g s); state %s", redact(listener.source), mode,
                 cfg.listen.quiet_s, cfg.listen.max_wait_s, listener.state_path)
        return listener.run(lambda batch: emit_batch(cfg, batch), stop=stop, once=once)


if __name__ == "__main__":
    import sys

    from flows.cli import main

    sys.exit(main(["listen", *sys.argv[1:]]))
