"""The `vidopt` command: config errors exit 2 naming the key; benchmarks receive their own --options; SIGTERM stops a
run cleanly."""
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from flows.cli import main


def test_bad_override_exits_2_and_names_the_key(capsys):
    assert main(["config", "--profile", "tiny", "clips.framez=4"]) == 2
    assert "config: clips.framez: unknown key" in capsys.readouterr().err


def test_config_prints_the_resolved_profile(capsys):
    assert main(["config", "--profile", "tiny", "clips.frames=6"]) == 0
    assert '"frames": 6' in capsys.readouterr().out


def test_bench_passes_leading_options_through(sample_dir, tmp_path, capsys):
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", str(sample_dir), "--clips", "4", "--repeats", "1", "--frames", "4",
                 "--size", "32", "32", "--json", str(out)]) == 0
    assert "pyav" in capsys.readouterr().out and out.exists()


def test_sigterm_stops_the_run_and_its_temporary_prefect_server(sample_dir, tmp_path):
    """`kill` of a running `vidopt run` must not leave Prefect's temporary server (a child process) behind."""
    command = [sys.executable, "-m", "flows.cli", "run", "--profile", "tiny", f"run.project_dir={tmp_path / 'p'}",
               f"data.source={sample_dir}"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           cwd=Path(__file__).resolve().parents[2])
    lines: list[str] = []  # read all along, so the run never blocks on a full pipe
    reader = threading.Thread(target=lambda: lines.extend(run.stdout), daemon=True)
    reader.start()
    try:
        # Prefect says where its server is, then the flow starts on it.
        assert _wait_until(lambda: any("Beginning flow run" in line for line in lines), 120), "".join(lines)
        address = next(m.group(1) for line in lines
                       if (m := re.search(r"Starting temporary server on (http://[\d.]+:\d+)", line)))
        host, port = address.removeprefix("http://").split(":")
        assert _listens(host, int(port)), f"nothing listens on {address} while the flow runs"
        time.sleep(1)
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == 128 + signal.SIGTERM, "".join(lines[-20:])
    finally:
        run.kill()
        reader.join(timeout=10)  # an orphaned server holding the pipe open would keep the reader (and close) waiting
        if not reader.is_alive():
            run.stdout.close()
    assert _wait_until(lambda: not _listens(host, int(port)), 15), \
        f"Prefect's temporary server still listens on {address} after the run was terminated"


def _listens(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def _wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def test_log_lines_name_the_task_run_they_are_about():
    import logging

    from flows.cli import RunNameFormatter

    record = logging.makeLogRecord({"name": "prefect.task_runs", "msg": "Finished in state Completed()",
                                    "task_run_name": "distill-1c2", "created": 0})
    assert RunNameFormatter().format(record).endswith(" prefect.task_runs [distill-1c2]: Finished in state Completed()")
    plain = logging.makeLogRecord({"name": "vidopt.distill", "msg": "distill: done", "created": 0})
    assert RunNameFormatter().format(plain).endswith(" vidopt.distill: distill: done")
