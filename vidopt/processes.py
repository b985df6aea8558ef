"""Worker processes for CPU-bound work per file (probing videos at ingest, writing the sample videos)."""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def spawn_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A process pool whose workers are spawned, not forked: the caller may hold Prefect / MLflow threads, which fork
    copies in a broken state. However the block is left (done, an error, SIGTERM's SystemExit, Ctrl-C) work still
    queued is cancelled, not run first: ProcessPoolExecutor's own exit waits for all of it, and a terminated
    `vidopt run` once outlived its 60 s probing every queued file."""
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)
