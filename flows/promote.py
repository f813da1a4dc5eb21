"""The promotion flow: gate a registered version and move alias `champion`, or roll it back.

The logic is in tasks/release/promotion.py (its gates in tasks/release/gates.py); the flow
points MLflow at the configured registry, runs one decision and publishes it as a Prefect
markdown artifact (the gate table). A refused promotion ends the flow run Failed with the
decision's line as its message (the Prefect UI shows it red, with the reason; the after-nightly
automation sees a failure); `run_promotion` returns the decision either way.
"""

from __future__ import annotations

import re
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from distill.tasks.platform import store
from distill.tasks.platform.config import PromoteConfig
from distill.tasks.release.promotion import Decision, decision_markdown, promote_version, rollback


def connect_registry() -> None:
    """Point MLflow at mlflow.yaml's store without creating anything in it."""
    store.point_at(store.load_settings())


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    what = "rollback" if p.get("rollback") else f"v{p['version']}" if p.get("version") else ""
    return f"{p.get('model_name')} {what or '@challenger'}"


@task(name="promote", task_run_name="promote-gates", cache_policy=NO_CACHE)
def promote_task(name: str, version: str | None, gates: PromoteConfig) -> Decision:
    return promote_version(name, version, gates)


@task(name="rollback", task_run_name="rollback", cache_policy=NO_CACHE)
def rollback_task(name: str) -> Decision:
    return rollback(name)


@flow(name="promote", flow_run_name=_flow_run_name, log_prints=False)
def promote_flow(
    model_name: str,
    version: str | None = None,
    gates: PromoteConfig | None = None,
    rollback: bool = False,
) -> Any:  # Decision, or a Failed state holding it
    connect_registry()
    if rollback:
        decision = rollback_task(model_name)
    else:
        decision = promote_task(model_name, version, gates or PromoteConfig())
    key = "promotion-" + re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-")
    create_markdown_artifact(
        markdown=decision_markdown(decision),
        key=key,
        description=f"distill promote: {decision.line()}",
    )
    if not decision.ok:
        # INFO: the run's log and its Failed state carry it; the terminal gets distill's own line
        get_run_logger().info(decision.line())
        return Failed(message=decision.line(), data=decision)
    get_run_logger().info(decision.line())
    return decision


def run_promotion(
    model_name: str,
    version: str | None = None,
    gates: PromoteConfig | None = None,
    rollback: bool = False,
) -> Decision:
    """The promotion flow's decision, granted or refused (a refused one ends the run Failed)."""
    state = promote_flow(model_name, version, gates, rollback, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    return result
