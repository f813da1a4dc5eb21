"""Re-run a pipeline from its MLflow record alone: `distill run --from-run RUN_ID`.

The record is the parent run's `config/resolved.yaml` artifact (the whole resolved
config, seed included) and its tags `distill.dataset_digest` and `distill.git_commit`.
The data must be the data the run saw (same digest), or the re-run is refused; other
code (a different git commit) is only a warning, since that is often the point. The format
the run served (its quantize stage's `method`) is pinned for the re-run
(`compress.quantize.format`), unless the user sets it: the choice is measured by latency, and
a near-tie would otherwise flip it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.tasks.platform import safe_yaml
from distill.tasks.platform.config import PipelineConfig, parse_overrides
from distill.tasks.platform.errors import UserError
from distill.tasks.platform.tracking import nested_runs

CONFIG_ARTIFACT = "config/resolved.yaml"


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    config: dict[str, Any]  # the resolved config, as logged
    dataset_digest: str | None
    git_commit: str | None
    served_format: str | None = None  # fp32 | int8 as its quantize stage shipped; None: unknown


def served_format(method: str | None) -> str | None:
    """fp32 or int8 from the quantize stage's `method` param (static, torch-dynamic, "static, 2
    fp32": int8; fp32: int8 made, not shipped); None where quantization was off or unrecorded."""
    if method in (None, "", "none"):
        return None
    return "fp32" if method == "fp32" else "int8"


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
    quantized = nested_runs(run_id, "tags.`distill.stage` = 'quantized'")
    method = quantized[0].data.params.get("method") if quantized else None
    return RunRecord(
        run_id,
        config,
        tags.get("distill.dataset_digest"),
        tags.get("distill.git_commit"),
        served_format(method),
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


def pin_format(
    cfg: PipelineConfig, record: RunRecord, overrides: list[str] | None
) -> tuple[PipelineConfig, str | None]:
    """The config the re-run's stages get: the record's served format pinned where the user did
    not set `compress.quantize.format` (`--set`), and the line saying so (None: nothing pinned).
    The run's recorded config stays the record's: same params, same config hash."""
    key = "compress.quantize.format"
    quantize_set = (parse_overrides(overrides or []).get("compress") or {}).get("quantize") or {}
    if record.served_format is None or "format" in quantize_set:
        return cfg, None
    quantize = cfg.compress.quantize.model_copy(update={"format": record.served_format})
    compress = cfg.compress.model_copy(update={"quantize": quantize})
    line = f"--from-run {record.run_id}: {record.served_format} ships as it did there ({key})"
    return cfg.model_copy(update={"compress": compress}), line
