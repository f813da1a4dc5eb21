"""`distill`: the command line. Heavy imports (torch, prefect, mlflow) happen inside commands,
so `distill --help` stays fast.

User errors (bad config, files, columns, URIs) print one line `error: ...` and exit 2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Compress a PyTorch teacher into a small student, tracked in MLflow, orchestrated by Prefect.")

EXIT_USER_ERROR = 2


@app.callback()
def _group() -> None:
    """distill: teacher -> reduce -> reconstruct -> fine-tune -> prune -> quantize -> register."""

# Quiet, offline defaults; a user's own settings win.
QUIET_ENV = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "MLFLOW_LOGGING_LEVEL": "ERROR",
    "DASK_LOGGING__DISTRIBUTED": "warning",
}

NOISY_WARNINGS = (
    ".*Saving pytorch model by Pickle.*",
    ".*Inferred schema contains integer column.*",
    ".*consider to run pre-processing before quantization.*",
)


def _quiet() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("mlflow").setLevel(logging.ERROR)


class _HideUserErrors(logging.Filter):
    """Prefect logs a flow's exception with its traceback; a user error gets our one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        from tasks.errors import UserError

        exc = record.exc_info[1] if record.exc_info else None
        # "Finished in state Failed('... UserError: ...')" carries no exc_info, only the name
        return not isinstance(exc, UserError) and "UserError" not in record.getMessage()


def _hide_user_errors_in_prefect_logs() -> None:
    # on the loggers Prefect reports run failures with (their handlers may be replaced later)
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_HideUserErrors())


def _exit_on_sigterm() -> None:
    """SIGTERM (a `kill`, a supervisor stopping the job) unwinds like an error, so the MLflow
    parent run is closed FAILED rather than left RUNNING (SIGKILL: see tracking.close_dead_runs)."""
    import signal

    def terminate(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_USER_ERROR)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Pipeline config (YAML).")] = Path("configs/digits.yaml"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key: key=value (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    fresh: Annotated[bool, typer.Option(
        "--fresh", help="Recompute every stage instead of reusing cached results.")] = False,
) -> None:
    """Run the pipeline: teacher -> reduce -> reconstruct -> fine-tune -> prune -> quantize -> register."""
    _quiet()
    if fresh:
        os.environ["PREFECT_TASKS_REFRESH_CACHE"] = "true"
    from tasks.config import load_config
    from tasks.errors import UserError

    overrides = list(set_ or [])
    try:
        load_config(config, overrides)  # fail fast, before Prefect or MLflow start
    except UserError as err:
        fail(str(err))

    from flows.distill import distill_flow

    _hide_user_errors_in_prefect_logs()
    _exit_on_sigterm()
    try:
        # stdout is the result (table or JSON); libraries' chatter goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            summary = distill_flow(str(config), overrides)
    except UserError as err:
        fail(str(err))
    if as_json:
        typer.echo(json.dumps(summary.as_json(), indent=2, default=float))
    else:
        _print_summary(summary)


def _print_summary(summary: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="distill: stages", title_justify="left")
    for col in ("stage", "params", "nonzeros", "size KB", "accuracy", "agreement", "b1 ms", "b256 ms"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage, m in summary.stages.items():
        b256 = next((v for k, v in m.items() if k.startswith("latency_ms_b") and k != "latency_ms_b1"), float("nan"))
        table.add_row(stage, f"{m['params']:,.0f}", f"{m['nonzeros']:,.0f}", f"{m['size_kb']:.1f}",
                      f"{m['accuracy']:.4f}", f"{m.get('agreement', float('nan')):.4f}",
                      f"{m['latency_ms_b1']:.4f}", f"{b256:.4f}")
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    m = summary.metrics
    console.print(f"compression {m['compression_ratio']:.1f}x, accuracy drop {100 * m['accuracy_drop']:+.2f} points, "
                  f"speedup b1 {m.get('speedup_b1', float('nan')):.1f}x")
    console.print(f"MLflow run {summary.run_id}  {summary.run_url}")
    if summary.model_name:
        console.print(f"registered {summary.model_name} version {summary.model_version} (alias challenger)")


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="Pipeline config (YAML) every variant starts from.")],
    grid: Annotated[list[str], typer.Option(
        "--grid", help="key=v1,v2,... (repeatable): the cartesian product is swept.")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a key in every variant: key=value.")] = None,
    workers: Annotated[int, typer.Option(
        "--workers", min=1, help="Variants at a time (threads, or local Dask processes).")] = 2,
    dask: Annotated[bool, typer.Option(
        "--dask", help="Run variants on a local Dask cluster of --workers processes.")] = False,
    dask_address: Annotated[str | None, typer.Option(
        "--dask-address", help="Run variants on this Dask scheduler (tcp://HOST:PORT).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Run many pipeline variants (one MLflow parent run each); summarize the Pareto front of accuracy vs size."""
    _quiet()
    from tasks.errors import UserError

    overrides = list(set_ or [])
    try:
        from flows.sweep import check_variants, parse_grid, task_runner

        grid_values = parse_grid(grid)
        check_variants(str(config), overrides, grid_values)  # fail fast, before Prefect or MLflow start
        runner = task_runner(dask, dask_address, workers)
    except UserError as err:
        fail(str(err))

    from flows.sweep import SweepFailed, sweep_flow

    _hide_user_errors_in_prefect_logs()
    _exit_on_sigterm()
    failed = False
    try:
        with contextlib.redirect_stdout(sys.stderr):
            summary = sweep_flow.with_options(task_runner=runner)(str(config), grid_values, overrides)
    except UserError as err:
        fail(str(err))
    except SweepFailed as err:
        summary, failed = err.summary, True
    if as_json:
        typer.echo(json.dumps(summary.as_json(), indent=2, default=float))
    else:
        from flows.sweep import markdown_table

        typer.echo(markdown_table(summary.table))
        typer.echo(f"\nsweep {summary.sweep_id}: summary MLflow run {summary.summary_run_id}")
    if failed:
        typer.echo(f"error: {len(summary.failed)} variant(s) failed: " + "; ".join(summary.failed), err=True)
        raise typer.Exit(1)


@app.command()
def deploy(
    prefect_file: Annotated[Path, typer.Option(
        "--prefect-file", help="Deployments to apply.")] = Path("deployments/prefect.yaml"),
) -> None:
    """Apply the scheduled deployments to the Prefect server in PREFECT_API_URL (creates the work pool)."""
    _quiet()
    from flows.deployments import deploy as apply_deployments
    from tasks.errors import UserError

    try:
        names = apply_deployments(prefect_file)
    except UserError as err:
        fail(str(err))
    for name in names:
        typer.echo(f"deployed {name}")


@app.command()
def serve(
    prefect_file: Annotated[Path, typer.Option(
        "--prefect-file", help="Deployments to serve.")] = Path("deployments/prefect.yaml"),
) -> None:
    """Serve the scheduled deployments from this process (no work pool or worker needed); Ctrl-C stops."""
    _quiet()
    from flows.deployments import serve as serve_deployments
    from tasks.errors import UserError

    try:
        serve_deployments(prefect_file)
    except UserError as err:
        fail(str(err))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
