"""The promotion flow: gate a registered version and move alias `champion`, or roll it back.

The logic is in tasks/release/promotion.py; the flow points MLflow at the configured registry,
runs one decision and publishes it as a Prefect markdown artifact (the gate table).
"""

from __future__ import annotations

import re

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from tasks.platform import tracking
from tasks.platform.config import PromoteConfig
from tasks.release.promotion import Decision, decision_markdown, promote_task, rollback_task


def connect_registry() -> None:
    """Point MLflow at mlflow.yaml's store without creating anything in it."""
    tracking.point_at(tracking.load_settings())


@flow(name="promote", log_prints=False)
def promote_flow(
    model_name: str,
    version: str | None = None,
    gates: PromoteConfig | None = None,
    rollback: bool = False,
) -> Decision:
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
    return decision
