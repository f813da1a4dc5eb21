"""Re-run a pipeline from its MLflow record alone: `distill run --from-run RUN_ID`.

The record is the parent run's `config/resolved.yaml` artifact (the whole resolved
config, seed included) and its tags `distill.dataset_digest` and `distill.git_commit`.
The data must be the data the run saw (same digest), or the re-run is refused; other
code (a different git commit) is only a warning, since that is often the point.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.tasks.platform import safe_yaml
from distill.tasks.platform.errors import UserError

CONFIG_ARTIFACT = "config/resolved.yaml"


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    config: dict[str, Any]  # the resolved config, as logged
    dataset_digest: str | None
    git_commit: str | None


def read_record(run_id: str) -> RunRecord:
    """The logged config and lineage of a pipeline run in the current tracking store."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from distill.tasks.platform.store import redact

    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        raise UserError(
            f"--from-run {run_id}: no such run in {redact(mlflow.get_tracking_uri())}"
        ) from None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=CONFIG_ARTIFACT, dst_path=tmp
            )
            text = Path(local).read_text()
    except (MlflowException, OSError):
        raise UserError(
            f"--from-run {run_id}: the run has no {CONFIG_ARTIFACT} artifact (not a distill run?)"
        ) from None
    config = safe_yaml.load(text, f"--from-run {run_id}: {CONFIG_ARTIFACT}")
    if not isinstance(config, dict):
        raise UserError(f"--from-run {run_id}: {CONFIG_ARTIFACT} does not hold a config mapping")
    tags = run.data.tags
    return RunRecord(
        run_id, config, tags.get("distill.dataset_digest"), tags.get("distill.git_commit")
    )


def check_record(record: RunRecord, source: str, dataset_digest: str, git_commit: str) -> list[str]:
    """Refuse other data (`source` read now has `dataset_digest`); return warnings (other code,
    or a record that cannot be checked)."""
    if record.dataset_digest is None:
        line = (
            f"--from-run {record.run_id}: the run logged no dataset digest; the data cannot be "
            "checked"
        )
        return [line]
    if dataset_digest != record.dataset_digest:
        raise UserError(
            f"--from-run {record.run_id}: data {source} has digest {dataset_digest}, the run saw "
            f"{record.dataset_digest}: the data changed, the run cannot be reproduced"
        )
    if record.git_commit and record.git_commit != git_commit:
        line = (
            f"--from-run {record.run_id}: the run used git commit {record.git_commit[:12]}, "
            f"this code is {git_commit[:12]}; metrics may differ"
        )
        return [line]
    return []
