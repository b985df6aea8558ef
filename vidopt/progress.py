"""Progress of long loops: a bar (rich) in an interactive terminal, about ten plain log lines otherwise."""
from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

log = logging.getLogger("vidopt.progress")


@contextmanager
def progress_bar(what: str, unit: str, lines: bool = True) -> Iterator[Callable[[int, int], None]]:
    """Yields report(done, total). lines=False: nothing when not a terminal (the caller logs its own lines)."""
    if not sys.stderr.isatty():
        def report(done: int, total: int) -> None:
            if lines and (done == total or done % max(1, total // 10) == 0):
                log.info("%s: %d/%d %s", what, done, total, unit)
        yield report
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(f"{what}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeRemainingColumn(),
                  transient=True) as bar:
        task = bar.add_task(what, total=None)

        def report(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)
        yield report
