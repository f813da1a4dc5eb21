"""Which tracking failures a Prefect task retries: transient I/O (a locked SQLite file, an
unreachable or busy server, a network hiccup), not a bug and not a full disk."""

from __future__ import annotations

from typing import Any

from distill.tasks.platform.errors import WRITE_FAULTS

# Transient tracking failures worth a retry: a locked SQLite file, an unreachable or busy server
# (INTERNAL_ERROR is MlflowException's default code, bugs included: not retried; MLflow's HTTP
# client already retries a server's 5xx answers itself).
TRANSIENT_ERROR_CODES = frozenset(
    {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED"}
)


def is_transient(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in TRANSIENT_ERROR_CODES
    # a network hiccup may pass; a full disk or a forbidden path does not (tasks/platform/errors.py)
    return isinstance(exc, (ConnectionError, TimeoutError)) or (
        isinstance(exc, OSError) and exc.errno not in WRITE_FAULTS
    )


def retry_on_tracking_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry a task that failed on tracking I/O, not on a bug."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 -- the task's own exception, re-raised by result()
        return is_transient(exc)
    return False
