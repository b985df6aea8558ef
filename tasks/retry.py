"""[Prefect] retry policy shared by stage tasks: retry transient I/O failures only.

Bad input (an unusable dataset, a config error, a missing bucket, refused credentials) fails the same way every time;
retrying it only delays the message.
"""
from __future__ import annotations

IO_RETRY_DELAYS = [2, 5, 15]  # seconds before each retry

# OSErrors that say what is there, not how the I/O went: the same on every try
PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def only_io_errors(task, task_run, state) -> bool:
    from vidopt.errors import VidoptError
    from vidopt.storage import TransientStorageError

    err = state.data
    if isinstance(err, TransientStorageError):
        return True
    if isinstance(err, VidoptError) or isinstance(err, PERMANENT_OS_ERRORS):
        return False
    if isinstance(err, (OSError, TimeoutError)):
        return True
    try:
        from botocore.exceptions import BotoCoreError, NoCredentialsError, PartialCredentialsError
    except ImportError:
        return False
    return isinstance(err, BotoCoreError) and not isinstance(err, (NoCredentialsError, PartialCredentialsError))
