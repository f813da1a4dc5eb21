"""Tracking errors: transient ones are retried (in Prefect too), bugs are not."""

from distill.tasks.platform import retry


def test_transient_tracking_errors_are_retried_and_bugs_are_not():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    assert retry.is_transient(
        MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE)
    )
    assert retry.is_transient(ConnectionError("refused"))
    assert not retry.is_transient(
        MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST)
    )
    assert not retry.is_transient(MlflowException("a bug"))
    assert not retry.is_transient(ValueError("a bug"))


def test_prefect_retries_a_task_on_tracking_errors_only(prefect_server):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
    from prefect import flow, task

    calls = {"locked": 0, "bug": 0}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry.retry_on_tracking_error)
    def record(kind: str) -> str:
        calls[kind] += 1
        if calls[kind] == 1:
            raise (
                MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE)
                if kind == "locked"
                else ValueError("a bug")
            )
        return "recorded"

    @flow
    def both() -> tuple:
        return record("locked", return_state=True), record("bug", return_state=True)

    locked, bug = both()
    assert locked.is_completed() and calls["locked"] == 2
    assert bug.is_failed() and calls["bug"] == 1
