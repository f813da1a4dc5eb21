"""The sweep flow: many pipeline variants, one MLflow parent run each, a Pareto summary.

The grid `{"reduce.budget.size_kb": ["8", "16"], "finetune.temperature": ["2", "4"]}` gives
the cartesian product of its values (4 variants), each a `--set` override on top of the
config. Every variant is the distill flow as a subflow inside a mapped task: threads of
this process by default (`ThreadPoolTaskRunner`), worker processes of a Dask cluster with
`DaskTaskRunner` (prefect-dask) for sweeps that outgrow one machine. Variant runs carry
the tag `distill.sweep_id` and nest under the sweep's own run, which holds the Pareto front of
accuracy vs final size as a table and a plot. Every variant registers a version; only the best
one (`best_variant`: the smallest within the promotion gate's accuracy drop) takes alias
`challenger`, so `distill promote` gates the sweep's choice, not whichever finished last.

Stages are cached on their inputs (tasks/platform/caching.py), so variants that share a teacher
reuse it once one of them has trained it (variants running at the same moment may both
train it: the results are identical).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from distill.flows.distill import distill_flow
from distill.tasks.compress.context import RunContext
from distill.tasks.platform import store
from distill.tasks.platform.config import DEFAULT_CONFIG, resolve_config
from distill.tasks.platform.errors import UserError
from distill.tasks.release.pareto import (
    best_variant,
    markdown_table,
    open_sweep_run,
    record_sweep,
    summary_frame,
    sweep_run_name,
)

DEFAULT_THREADS = 2


@dataclass
class SweepSummary:
    sweep_id: str
    summary_run_id: str
    table: pd.DataFrame  # one row per variant, smallest final model first (tasks/release/pareto.py)
    failed: list[str] = field(default_factory=list)
    challenger: str | None = None  # "challenger: NAME version V (variant I: overrides)"

    def as_json(self) -> dict[str, Any]:
        return {
            "sweep_id": self.sweep_id,
            "summary_run_id": self.summary_run_id,
            "challenger": self.challenger,
            "failed": self.failed,
            "variants": self.table.to_dict(orient="records"),
        }


class SweepFailed(RuntimeError):
    """Some variants failed; the summary of the others was recorded."""

    def __init__(self, summary: SweepSummary) -> None:
        super().__init__(
            f"{len(summary.failed)} of {len(summary.table)} sweep variants failed: "
            + "; ".join(summary.failed)
        )
        self.summary = summary


def split_values(raw: str) -> list[str]:
    """`8,16` -> ['8', '16']; commas inside brackets stay (`[64, 64],[32]` -> two values)."""
    values, depth, current = [], 0, ""
    for ch in raw:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    values.append(current.strip())
    return values


def parse_grid(pairs: list[str]) -> dict[str, list[str]]:
    """`['reduce.budget.size_kb=8,16', 'finetune.temperature=2,4']` -> {key: [values]}."""
    grid: dict[str, list[str]] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        values = split_values(raw) if sep else []
        if not key or not values or any(v == "" for v in values):
            raise UserError(f"--grid expects key=v1,v2,..., got {pair!r}")
        if key in grid:
            raise UserError(f"--grid {key}: given twice")
        grid[key] = values
    budgets = [k for k in grid if k.startswith("reduce.budget.")]
    if len(budgets) > 1:  # each variant would keep only the last: duplicates, not a grid
        raise UserError(f"--grid: {' and '.join(budgets)} are both budgets; a variant has one")
    return grid


def variants(grid: dict[str, list[str]]) -> list[list[str]]:
    """The cartesian product of the grid, as lists of `key=value` overrides."""
    keys = list(grid)
    return [
        [f"{k}={v}" for k, v in zip(keys, combo, strict=True)]
        for combo in itertools.product(*(grid[k] for k in keys))
    ]


def check_variants(
    config_path: str,
    overrides: list[str],
    grid: dict[str, list[str]],
    context: RunContext | None = None,
) -> list[list[str]]:
    """Every variant's config must load before anything runs; the error names the variant.
    `context`: the sweep's, which keeps each config parsed for its variant's flow."""
    combos = variants(grid)
    context = context or RunContext()
    for combo in combos:
        try:
            context.config(config_path, overrides + combo)
        except UserError as err:
            raise UserError(f"sweep variant {', '.join(combo)}: {err}") from None
    return combos


@task(name="sweep-summary", task_run_name="sweep-summary", cache_policy=NO_CACHE)
def summarize_task(
    results: list[dict[str, Any]], run_id: str, sweep_id: str, best_line: str | None = None
) -> pd.DataFrame:
    frame = summary_frame(results)
    record_sweep(run_id, sweep_id, frame, best_line)
    return frame


@task(name="variant", task_run_name="variant-{index}", cache_policy=NO_CACHE)
def variant_task(
    index: int,
    config_path: str,
    overrides: list[str],
    combo: list[str],
    tags: dict[str, str],
    context: RunContext,
) -> dict[str, Any]:
    """One pipeline variant, as a subflow; its parent run is tagged with the sweep id. `context`:
    the sweep's (its variants' data and pre-flights, as the CLI checked them)."""
    variant_tags = tags | {"distill.sweep_variant": ", ".join(combo) or "(base config)"}
    try:  # no alias yet: the sweep gives `challenger` to its best variant only
        summary = distill_flow(
            config_path,
            overrides + combo,
            tags=variant_tags,
            challenger=False,
            context=context,
        )
    except Exception as err:  # noqa: BLE001 -- a failed variant must not sink the sweep
        return {
            "index": index,
            "overrides": combo,
            "run_id": None,
            "metrics": None,
            "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
        }
    return {
        "index": index,
        "overrides": combo,
        "run_id": summary.run_id,
        "metrics": summary.metrics,
        "model_name": summary.model_name,
        "model_version": summary.model_version,
    }


def _flow_run_name() -> str:
    from prefect.runtime import flow_run as current

    return sweep_run_name(dict(current.parameters.get("grid") or {}))


@flow(
    name="distill-sweep",
    flow_run_name=_flow_run_name,
    task_runner=ThreadPoolTaskRunner(max_workers=DEFAULT_THREADS),
    log_prints=False,
)
def sweep_flow(
    config_path: str | None = None,
    grid: dict[str, list[str]] | None = None,
    overrides: list[str] | None = None,
    context: RunContext | None = None,
) -> SweepSummary:
    # workers may run elsewhere in the tree
    config = str(resolve_config(Path(config_path or DEFAULT_CONFIG)).resolve())
    overrides = list(overrides or [])
    grid = dict(grid or {})
    # the sweep's configs, data and pre-flights (tasks/compress/context.py): from `distill sweep`,
    # which checked every variant in it; a deployment's run makes its own
    context = context or RunContext()
    combos = check_variants(config, overrides, grid, context)
    sweep_id = str(flow_run.id)
    tags = {"distill.sweep_id": sweep_id, "prefect.sweep_flow_run_id": sweep_id}
    # create the store and experiment here, once, not racing from every worker
    experiment_id = store.configure(store.load_settings())
    sweep_run_id = open_sweep_run(
        experiment_id, sweep_id, grid, tags | {"distill.sweep_summary": "true"}
    )
    variant_tags = tags | {"mlflow.parentRunId": sweep_run_id}  # nested under the sweep's run

    futures = variant_task.map(
        range(len(combos)),
        unmapped(config),
        unmapped(overrides),
        combos,
        unmapped(variant_tags),
        unmapped(context),
    )
    results = [f.result() for f in futures]

    frame = summary_frame(results)
    gate = context.config(config, overrides).promote.max_accuracy_drop
    best_line = choose_challenger(results, best_variant(frame, gate))
    frame = summarize_task(results, sweep_run_id, sweep_id, best_line)
    summary_run_id = sweep_run_id
    failed = [
        f"variant {r['index']} ({', '.join(r['overrides'])}): {r['error']}"
        for r in results
        if r["metrics"] is None
    ]
    summary = SweepSummary(
        sweep_id=sweep_id,
        summary_run_id=summary_run_id,
        table=frame,
        failed=failed,
        challenger=best_line,
    )
    create_markdown_artifact(
        markdown=f"# distill sweep\n\nSummary MLflow run: {summary_run_id}\n\n"
        f"{best_line or 'no challenger'}\n\n" + markdown_table(frame),
        key="distill-sweep",
        description="sweep: Pareto front",
    )
    if failed:
        raise SweepFailed(summary)
    return summary


def choose_challenger(results: list[dict[str, Any]], best: int | None) -> str | None:
    """Alias `challenger` on the best variant's registered version (tasks/release/pareto.py
    `best_variant`), tagged `distill.sweep_best`; returns the line that says which."""
    chosen = next((r for r in results if r["index"] == best and r.get("model_version")), None)
    if chosen is None:
        return None
    from mlflow import MlflowClient

    from distill.tasks.release.aliases import CHALLENGER

    client = MlflowClient()
    name, version = chosen["model_name"], chosen["model_version"]
    client.set_model_version_tag(name, version, "distill.sweep_best", "true")
    client.set_registered_model_alias(name, CHALLENGER, version)
    return (
        f"challenger: {name} version {version} "
        f"(variant {best}: {', '.join(chosen['overrides']) or 'base config'})"
    )


def task_runner(
    dask: bool = False, address: str | None = None, workers: int = DEFAULT_THREADS
) -> Any:
    """Threads by default; a local Dask cluster of `workers` processes (`dask`), or the
    Dask scheduler at `address`. Dask workers report to the Prefect server in PREFECT_API_URL."""
    if not dask and not address:
        return ThreadPoolTaskRunner(max_workers=workers)
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise UserError(
            "a Dask sweep needs a Prefect server its workers can reach: set PREFECT_API_URL "
            "(e.g. `prefect server start`, then PREFECT_API_URL=http://127.0.0.1:4200/api)"
        )
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": workers,
            "processes": True,
            "threads_per_worker": 1,
            "host": "127.0.0.1",
            "dashboard_address": "127.0.0.1:0",
        },
    )
