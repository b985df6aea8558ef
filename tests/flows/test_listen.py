"""`vidopt listen` against a real Prefect server (Prefect's test harness): one event per batch, named serve.event,
carrying the keys, with the batch id as event id; a batch re-sent after a crash is stored once and fires an automation
once."""
import logging
import shutil
import time
from datetime import timedelta

import pytest

from flows.cli import main


def test_cli_listen_refuses_a_queue_for_a_folder(tmp_path, cli_env, capsys):
    assert main(["listen", "--profile", "tiny", f"run.project_dir={tmp_path}", f"data.source={tmp_path}",
                 "listen.sqs_queue_url=http://127.0.0.1:1/q", "--once"]) == 1
    assert "is not an s3:// URI" in capsys.readouterr().err


@pytest.mark.integration
def test_cli_listen_emits_once_per_batch_even_when_resent_after_a_crash(tmp_path, tiny_cfg, cli_env, caplog):
    from prefect.client.orchestration import get_client
    from prefect.events.actions import DoNothing
    from prefect.events.filters import EventFilter, EventNameFilter
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.testing.utilities import prefect_test_harness

    from vidopt.listen import listener_from_config, state_path_for

    caplog.set_level(logging.INFO, logger="vidopt.listen")
    src = tmp_path / "bucket"
    (src / "cats").mkdir(parents=True)
    (src / "cats" / "old.mp4").write_bytes(b"0")
    cfg = tiny_cfg(f"data.source={src}")
    args = ["listen", "--profile", "tiny", f"run.project_dir={cfg.run.project_dir}", f"data.source={src}", "--once"]

    def named(name):
        with get_client(sync_client=True) as client:
            return client.read_events(filter=EventFilter(event=EventNameFilter(name=[name])), limit=50).events

    with prefect_test_harness(server_startup_timeout=120):
        with get_client(sync_client=True) as client:
            client.create_automation(AutomationCore(
                name="on-data", actions=[DoNothing()],
                trigger=EventTrigger(expect={cfg.serve.event}, posture=Posture.Reactive, threshold=1,
                                     within=timedelta(0))))
        assert main(args) == 0  # first start: what is there counts as seen

        (src / "cats" / "a.mp4").write_bytes(b"1")
        (src / "cats" / "b.txt").write_bytes(b"2")
        (src / "dogs").mkdir()
        (src / "dogs" / "c.mkv").write_bytes(b"3")
        state = state_path_for(cfg)
        with listener_from_config(cfg) as listener:
            [batch] = listener.step(flush=True)  # in the outbox, not yet sent
        shutil.copy(state, tmp_path / "before-emit.json")
        assert main(args) == 0
        assert f"emitted vidopt.data.arrived id={batch.id}: 2 new clips" in caplog.text
        shutil.copy(tmp_path / "before-emit.json", state)  # as if it crashed after sending, before the ack
        assert main(args) == 0  # sends the same event id again
        assert caplog.text.count(f"emitted vidopt.data.arrived id={batch.id}") == 2
        assert main(args) == 0  # nothing new

        deadline = time.time() + 30
        while not (named(cfg.serve.event) and named("prefect.automation.triggered")) and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(4)  # room for a duplicate to show up
        [event] = named(cfg.serve.event)
        assert str(event.id) == batch.id
        assert event.payload == {"keys": ["cats/a.mp4", "dogs/c.mkv"], "source": str(src.resolve())}
        assert event.resource.id == f"vidopt.source.{src.resolve()}"
        assert len(named("prefect.automation.triggered")) == 1
