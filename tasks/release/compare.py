"""`distill compare`: pipeline runs side by side, from MLflow.

Only parent runs (one per pipeline run; stage runs carry `mlflow.parentRunId`). For each:
its id, name, start time and status, the config keys whose values differ across the shown
runs (the parent's params are the flattened config), blank where a key means nothing for a run
(`meaningful`: a budget where a target planned it, `target.max_r2_drop` on a classifier, a
method's key under another method), and the headline metrics: the final
model's `final/*` and what it cost against the teacher (`compression_ratio`,
`accuracy_drop`, `speedup_*`).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from distill.tasks.platform import store
from distill.tasks.platform.errors import UserError

RUN_COLUMNS = ("run_id", "run_name", "start_time", "status")
# shown first, in this order; any other final/* metric follows alphabetically
HEADLINE = (
    "compression_ratio",
    "accuracy_drop",
    "r2_drop",  # regression runs
    "speedup_b1",
    "final/accuracy",
    "final/validation_accuracy",  # the rows to choose between runs by
    "final/f1_macro",
    "final/top3_accuracy",
    "final/agreement",
    "final/r2",
    "final/validation_r2",
    "final/mae",
    "final/rmse",
    "final/teacher_rel_error",
    "final/ece",
    "final/nll",
    "final/train_test_gap",
    "final/size_kb",
    "final/compressed_kb",
    "final/params",
    "final/nonzeros",
    "final/flops",
    "final/latency_ms_b1",
    "final/latency_p95_ms_b1",
)


def _is_headline(metric: str) -> bool:
    return metric.startswith(("final/", "speedup_")) or metric in HEADLINE


def _metric_order(metric: str) -> tuple[int, str]:
    if metric in HEADLINE:
        return HEADLINE.index(metric), ""
    if metric.startswith("speedup_"):  # speedup at the large batch: beside speedup_b1
        return HEADLINE.index("speedup_b1"), metric
    return len(HEADLINE), metric


def parent_runs(experiment: str, last: int | None) -> pd.DataFrame:
    """MLflow's runs frame (`params.*`, `metrics.*`, `tags.*`) of the newest parent runs."""
    import mlflow

    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        raise UserError(
            f"no MLflow experiment named {experiment!r} at "
            f"{store.redact(mlflow.get_tracking_uri())}"
        )
    runs = mlflow.search_runs(
        experiment_ids=[found.experiment_id],
        order_by=["attributes.start_time DESC"],
        output_format="pandas",
    )
    if "tags.mlflow.parentRunId" in runs.columns:  # nested: stage runs; a sweep's variants stay
        variant = runs.get("tags.distill.sweep_variant", pd.Series(index=runs.index)).notna()
        runs = runs[runs["tags.mlflow.parentRunId"].isna() | variant]
    if "tags.distill.sweep_summary" in runs.columns:  # a sweep's own run has no model
        runs = runs[runs["tags.distill.sweep_summary"].isna()]
    return (runs.head(last) if last else runs).reset_index(drop=True)


def _has_target(runs: pd.DataFrame) -> pd.Series:
    """Per run: a `target:` planned it (one of its kinds is set; a drop-only target sets none, but
    every target logs its confidence)."""
    from distill.tasks.platform.config import TARGET_KINDS

    keys = (*TARGET_KINDS, "confidence")
    kinds = [f"params.target.{k}" for k in keys if f"params.target.{k}" in runs.columns]
    if not kinds:
        return pd.Series(False, index=runs.index)
    return runs[kinds].apply(lambda row: row.notna() & (row != "None")).any(axis=1)


def _regression(runs: pd.DataFrame) -> pd.Series:
    task = runs.get("params.data.task", pd.Series(None, index=runs.index))
    r2 = runs.get("metrics.final/r2", pd.Series(None, index=runs.index))
    return (task == "regression") | r2.notna()


def meaningful(key: str, runs: pd.DataFrame) -> pd.Series:
    """Per run: whether config key `key` means something for it (`reduce.budget.*` is ignored
    where a target planned the run, `target.max_r2_drop` on a classifier, a method's key under
    another method: config.METHOD_KEYS)."""
    from distill.tasks.platform.config import METHOD_KEYS

    if key == "target.max_r2_drop":
        return _has_target(runs) & _regression(runs)
    if key == "target.max_accuracy_drop":
        return _has_target(runs) & ~_regression(runs)
    if key.startswith("target."):
        return _has_target(runs)
    for owner, (switch, applies, _) in METHOD_KEYS.items():
        if key == owner or key.startswith(owner + "."):
            if switch == "target":
                return ~_has_target(runs)
            chosen = runs.get(f"params.{switch}", pd.Series(None, index=runs.index))
            return chosen.map(lambda v, applies=applies: bool(pd.isna(v) or applies(v)))
    return pd.Series(True, index=runs.index)


def comparison(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: RUN_COLUMNS, then the config keys that differ, then headline metrics."""
    if runs.empty:
        return pd.DataFrame(columns=list(RUN_COLUMNS))
    out = pd.DataFrame(
        {
            "run_id": runs["run_id"],
            "run_name": runs.get("tags.mlflow.runName", pd.Series([None] * len(runs))),
            "start_time": pd.to_datetime(runs["start_time"], utc=True).dt.strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            ),
            "status": runs["status"],
        }
    )
    params = [c for c in runs.columns if c.startswith("params.")]
    for column in params:
        key = column.removeprefix("params.")
        values = runs[column].where(meaningful(key, runs))
        if values.notna().any() and runs[column].fillna("<unset>").nunique() > 1:
            out[key] = values
    metrics = sorted(
        (
            c.removeprefix("metrics.")
            for c in runs.columns
            if c.startswith("metrics.") and _is_headline(c.removeprefix("metrics."))
        ),
        key=_metric_order,
    )
    for metric in metrics:
        out[metric] = runs[f"metrics.{metric}"].astype(float)
    return out


def load_comparison(experiment: str | None, last: int | None) -> pd.DataFrame:
    """Point MLflow at the configured store (never creating one) and compare its parent runs."""
    settings = store.load_settings()
    store.connect(settings)
    return comparison(parent_runs(experiment or settings.tracking.experiment, last))


def to_csv(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False)


def to_json(frame: pd.DataFrame) -> str:
    """A list of objects, one per run; missing values are null."""
    records = [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
        for row in frame.to_dict(orient="records")
    ]
    return json.dumps(records, indent=2, default=str)


def _cell(value: Any, key: str = "") -> str:
    """A table cell: never scientific notation; `accuracy_drop` in points, as `distill run`
    says it (csv and json keep MLflow's fraction)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        if key == "accuracy_drop":
            return f"{100 * value:+.2f} pt"
        if value.is_integer() and abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 1000:
            return f"{value:,.1f}"
        import numpy as np

        return np.format_float_positional(
            value, precision=4, unique=False, fractional=False, trim="-"
        )
    return str(value)


def rich_table(frame: pd.DataFrame) -> Any:
    """Runs as columns, keys as rows: how MLflow's own compare view lays them out; a run's
    column is headed by its name (what differs), its id's first 8 characters below."""
    from rich.table import Table

    table = Table(title=f"distill: {len(frame)} run(s), newest first", title_justify="left")
    labels = {k: "accuracy_drop (points)" if k == "accuracy_drop" else k for k in frame.columns}
    labels = {k: v for k, v in labels.items() if k not in ("run_id", "run_name")}
    # a narrow terminal ($COLUMNS) folds run cells onto more lines; keys are never cut short
    table.add_column("key", style="bold", no_wrap=True, min_width=max(map(len, labels.values())))
    names = frame["run_name"] if "run_name" in frame else frame["run_id"]
    for run_id, name in zip(frame["run_id"], names, strict=True):
        table.add_column(f"{name}\n{str(run_id)[:8]}", justify="right", overflow="fold")
    for key, label in labels.items():
        cells = (_cell(v, key) for v in frame[key])
        if key == "start_time":  # to the minute, UTC: narrower than the csv/json value
            cells = (c[:16].replace("T", " ") for c in cells)
        table.add_row(label, *cells)
    return table
