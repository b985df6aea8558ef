"""The one base of every error a user can cause and fix: bad config, bad data, an unreachable or refusing service.

The CLI prints such an error's message as one line (`vidopt: error: ...`) and exits non-zero; any other exception is
a bug, and `vidopt --debug` shows its traceback.
"""
from __future__ import annotations


class VidoptError(Exception):
    """A mistake in what the user gave or in the environment; the message names the thing and what to change."""


class ServiceError(VidoptError):
    """An external service (MLflow, Prefect, S3) unreachable or refusing us; the message names the endpoint."""
