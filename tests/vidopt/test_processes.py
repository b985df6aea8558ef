"""spawn_pool: leaving the block early cancels the queued work instead of running it first."""
import time

import pytest

from vidopt.processes import spawn_pool


def test_leaving_the_pool_early_cancels_what_is_queued():
    started = time.monotonic()
    with pytest.raises(RuntimeError):
        with spawn_pool(1) as pool:
            futures = [pool.submit(time.sleep, 0.5) for _ in range(40)]   # 20 s of queued work on one worker
            futures[0].result()
            raise RuntimeError("stopped mid-way")
    # the running call may finish; the rest never run (ProcessPoolExecutor's own exit would take ~20 s here)
    assert time.monotonic() - started < 10
    assert sum(f.cancelled() for f in futures) >= 35
