"""Progress of long loops: a rich bar in a terminal; about ten log lines (or none, when the caller logs) otherwise."""
import io
import logging

from vidopt import progress


def test_without_a_terminal_about_ten_lines_or_none(caplog, monkeypatch):
    monkeypatch.setattr(progress.sys, "stderr", io.StringIO())     # not a TTY
    with caplog.at_level(logging.INFO, logger="vidopt.progress"):
        with progress.progress_bar("predict", "videos") as report:
            for done in range(1, 101):
                report(done, 100)
        with progress.progress_bar("train", "epochs", lines=False) as report:
            report(1, 3)
    assert [r.getMessage() for r in caplog.records][-1] == "predict: 100/100 videos"
    assert len(caplog.records) == 10 and not any("train" in r.getMessage() for r in caplog.records)


def test_in_a_terminal_a_bar_draws_and_closes(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(progress.sys, "stderr", Terminal())
    with progress.progress_bar("train", "epochs", lines=False) as report:
        for done in range(1, 4):
            report(done, 3)
