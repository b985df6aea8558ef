"""[Prefect] retry policy shared by stage tasks: retry transient I/O failures only.

Bad input (an unusable dataset, a config error) fails the same way every time; retrying it only delays the message.
"""
from __future__ import annotations

IO_RETRY_DELAYS = [2, 5, 15]  # seconds before each retry


def only_io_errors(task, task_run, state) -> bool:
    err = state.data
    if isinstance(err, (OSError, TimeoutError)):
        return True
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:
        return False
    return isinstance(err, BotoCoreError)
