"""`distill`: the command line. Heavy imports (torch, prefect, mlflow) happen inside commands,
so `distill --help` stays fast.

Every failure is one line `error: ...` on stderr, and the exit code says its kind (EXIT_CODES,
printed by `distill run --help`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from distill.flows.process import (
    EXIT_REFUSED,
    fail,
    flow_command,
    hide_user_errors_in_prefect_logs,
    interrupt,
    quiet,
    start_prefect_server_early,
    user_errors,
)
from distill.tasks.platform.secrets import mask_passwords_in_output

if TYPE_CHECKING:  # torch behind it: imported by the commands that run
    from distill.tasks.compress.context import RunContext

# `distill run --help`'s last paragraph: what each exit code means
EXIT_CODES = (
    "Exit codes: 0 done (a missed target too); 1 promotion refused (--promote); 2 bad input: a "
    "config key, file, column, or a model the configured mode cannot handle (the pre-flight, "
    "before any stage); 3 a fault of the environment (disk full, no write permission, tracking "
    "server gone); 4 a stage failed in the model's own code or in distill (the full trace is the "
    "failed stage run's error.txt in MLflow; --debug prints it); 130 Ctrl-C."
)

# A command's docstring is its help, and `distill --help` prints the docstring's line breaks as
# they are: a one-line docstring longer than 100 columns keeps its line (noqa: E501).
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=(
        "Compress a PyTorch teacher into a small student, tracked in MLflow, "
        "orchestrated by Prefect."
    ),
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"distill {version('distill')}")
        raise typer.Exit()


@app.callback()
def _group(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """distill: teacher -> reduce -> reconstruct -> fine-tune -> prune -> quantize -> register."""


@app.command(epilog=EXIT_CODES)
def run(
    config: Annotated[Path, typer.Argument(help="Pipeline config (YAML).")] = Path(
        "configs/digits.yaml"
    ),
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key: key=value (repeatable)."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", metavar="", help="Print one JSON object instead of a table.")
    ] = False,
    promote_: Annotated[
        bool,
        typer.Option(
            "--promote",
            metavar="",
            help="Gate the registered version and make it champion (see `promote`).",
        ),
    ] = False,
    from_run: Annotated[
        str | None,
        typer.Option(
            "--from-run",
            help="Re-run the pipeline recorded in this MLflow run (its logged config and seed).",
        ),
    ] = None,
    fresh: Annotated[
        bool,
        typer.Option(
            "--fresh", metavar="", help="Recompute every stage instead of reusing cached results."
        ),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            metavar="",
            help="On failure, print the full traceback (Prefect's too) before the one line.",
        ),
    ] = False,
) -> None:
    """Run the pipeline: teacher -> reduce -> reconstruct -> fine-tune -> prune -> quantize -> register."""  # noqa: E501
    quiet()

    overrides = list(set_ or [])
    if from_run and config != Path("configs/digits.yaml"):
        fail("give either CONFIG or --from-run, not both")
    from distill.tasks.compress.context import RunContext

    context = RunContext()  # the data and the pre-flight, checked here, are the flow's
    with user_errors(debug):
        if not from_run:  # fail fast, before Prefect or MLflow start
            check_inputs(context.config(config, overrides), config, context)
    with flow_command(
        "run",
        note=f"{config if not from_run else 'run ' + from_run}: inputs checked; starting Prefect",
        stage_lines=True,
        refresh=bool(from_run) or fresh,
        debug=debug,
    ):
        from distill.flows.distill import distill_flow

        summary = distill_flow(
            str(config), overrides, promote=promote_, from_run=from_run, context=context
        )
    if as_json:
        _echo_json(summary)
    else:
        from distill.flows.summary import print_stage_table

        print_stage_table(summary)
    if summary.target is not None and summary.target.get("frontier") and not as_json:
        from distill.tasks.compress.smallest import frontier_table

        typer.echo(
            frontier_table(
                summary.target["frontier"],
                summary.target["metric"],
                summary.target.get("confidence", 0.9),
            )
        )
    if summary.target is not None and (not as_json or not summary.target["met"]):
        # a missed target is not an error: the best model found is registered, tagged, exit 0
        import shutil

        from distill.flows.summary import clauses

        columns = shutil.get_terminal_size((80, 24)).columns  # 80 where no terminal
        typer.echo(clauses(summary.target["line"], columns), err=not summary.target["met"])
    if not as_json and summary.promotion is not None:
        typer.echo(summary.promotion.line(), err=not summary.promotion.ok)
    if summary.promotion is not None and not summary.promotion.ok:
        raise typer.Exit(EXIT_REFUSED)


def check_inputs(cfg: Any, config: Path, context: RunContext) -> None:
    """The data file, its columns and labels, the device, the teacher's fit to the data and the
    pre-flight (the planned student built, trained a step and exported on two rows:
    tasks/compress/preflight.py), checked in this process before any server starts (about 2 s
    on digits, most of it imports, plus the pre-flight's ONNX export). `context`: the run's
    `RunContext` (tasks/compress/context.py), which keeps the dataset and the pre-flight's pass
    for the flow."""
    data = context.dataset(cfg.data, cfg.seed)
    from distill.tasks.platform.config import check_task_keys

    check_task_keys(cfg, data.task)  # classification-only keys on a regression run, and back
    from distill.tasks.platform.device import (
        resolve_device,  # torch: after the data, whose errors need none
    )

    resolve_device(cfg.device)
    context.preflight(cfg, data, str(config.resolve().parent))


def _check_variant(
    config: Path, overrides: list[str], combo: list[str], context: RunContext
) -> None:
    from distill.tasks.platform.errors import UserError

    try:
        check_inputs(context.config(config, overrides + combo), config, context)
    except UserError as err:
        raise UserError(f"sweep variant {', '.join(combo) or '(base config)'}: {err}") from None


def _echo_json(result: Any) -> None:
    """A command's result (`as_json()`) as one JSON object on stdout."""
    typer.echo(json.dumps(result.as_json(), indent=2, default=float))


@app.command()
def sweep(
    config: Annotated[
        Path, typer.Argument(help="Pipeline config (YAML) every variant starts from.")
    ],
    grid: Annotated[
        list[str],
        typer.Option("--grid", help="key=v1,v2,... (repeatable): the cartesian product is swept."),
    ],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key in every variant: key=value.")
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers", min=1, help="Variants at a time (threads, or local Dask processes)."
        ),
    ] = 2,
    dask: Annotated[
        bool,
        typer.Option(
            "--dask",
            metavar="",
            help="Run variants on a local Dask cluster of --workers processes.",
        ),
    ] = False,
    dask_address: Annotated[
        str | None,
        typer.Option(
            "--dask-address", help="Run variants on this Dask scheduler (tcp://HOST:PORT)."
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", metavar="", help="Print one JSON object instead of a table.")
    ] = False,
) -> None:
    """Run many pipeline variants (one MLflow parent run each); summarize the Pareto front of accuracy vs size."""  # noqa: E501
    quiet()

    overrides = list(set_ or [])
    with user_errors():
        from distill.flows.sweep import check_variants, parse_grid, task_runner
        from distill.tasks.compress.context import RunContext

        grid_values = parse_grid(grid)
        context = RunContext()  # every variant's data and pre-flight, for the variants' flows
        # fail fast, before Prefect or MLflow start: configs, then data and teacher of each variant
        for combo in check_variants(str(config), overrides, grid_values, context):
            _check_variant(config, overrides, combo, context)
        runner = task_runner(dask, dask_address, workers)

    from distill.flows.sweep import SweepFailed, sweep_flow

    failed = False
    with flow_command("sweep"):
        try:
            summary = sweep_flow.with_options(task_runner=runner)(
                str(config), grid_values, overrides, context
            )
        except SweepFailed as err:
            summary, failed = err.summary, True
    if as_json:
        _echo_json(summary)
    else:
        from distill.flows.sweep import markdown_table

        typer.echo(markdown_table(summary.table))
        typer.echo(f"\nsweep {summary.sweep_id}: summary MLflow run {summary.summary_run_id}")
        typer.echo(summary.challenger or "no variant registered: no challenger")
    if failed:
        typer.echo(
            f"error: {len(summary.failed)} variant(s) failed: " + "; ".join(summary.failed),
            err=True,
        )
        raise typer.Exit(1)


@app.command()
def deploy(
    prefect_file: Annotated[
        Path, typer.Option("--prefect-file", help="Deployments to apply.")
    ] = Path("deployments/prefect.yaml"),
) -> None:
    """Apply the scheduled deployments to the Prefect server in PREFECT_API_URL (creates the work pool)."""  # noqa: E501
    quiet()
    from distill.flows.deployments import deploy as apply_deployments

    with user_errors():
        names = apply_deployments(prefect_file)
    for name in names:
        typer.echo(f"deployed {name}")


@app.command()
def serve(
    prefect_file: Annotated[
        Path, typer.Option("--prefect-file", help="Deployments to serve.")
    ] = Path("deployments/prefect.yaml"),
) -> None:
    """Serve the scheduled deployments from this process (no work pool or worker needed); Ctrl-C stops."""  # noqa: E501
    quiet()
    from distill.flows.deployments import serve as serve_deployments

    with user_errors():
        serve_deployments(prefect_file)


class CompareFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


@app.command()
def compare(
    experiment: Annotated[
        str | None,
        typer.Option(help="MLflow experiment (default: mlflow.yaml tracking.experiment)."),
    ] = None,
    last: Annotated[int, typer.Option(min=1, help="Show the newest N pipeline runs.")] = 5,
    format_: Annotated[
        CompareFormat,
        typer.Option("--format", help="table (terminal), csv or json (stdout, parseable)."),
    ] = CompareFormat.table,
) -> None:
    """Pipeline runs side by side: config keys that differ, final metrics, compression, speedup."""
    quiet()
    from distill.tasks.release.compare import load_comparison, rich_table, to_csv, to_json

    # stdout carries the result only
    with user_errors(), contextlib.redirect_stdout(sys.stderr):
        frame = load_comparison(experiment, last)
    if format_ is CompareFormat.csv:
        typer.echo(to_csv(frame), nl=False)
    elif format_ is CompareFormat.json:
        typer.echo(to_json(frame))
    elif frame.empty:
        typer.echo("no pipeline runs in this experiment yet", err=True)
    else:
        import shutil

        from rich.console import Console

        # the terminal's width; piped, $COLUMNS where set (rich folds cells to fit), else 160
        Console(width=shutil.get_terminal_size((160, 24)).columns).print(rich_table(frame))


def _check_port_free(host: str, port: int) -> None:
    """Another server on the port would answer our health check: `distill ui` would print its URL
    as ours. SO_REUSEADDR as servers set it: a closed connection's TIME_WAIT is no listener."""
    import socket

    from distill.tasks.platform.errors import UserError

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise UserError(
                f"{host}:{port} is already in use ({err.strerror}): choose another port with --port"
            ) from None


@app.command()
def ui(
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Port (default: mlflow.yaml ui.port).")
    ] = None,
) -> None:
    """Serve the MLflow UI for the configured store on mlflow.yaml's ui host (127.0.0.1) until Ctrl-C."""  # noqa: E501
    quiet()
    import signal

    from distill.tasks.platform import servers, store

    with user_errors():
        settings = store.load_settings()
        command = store.ui_server_command(settings, port)
        _check_port_free(settings.ui.host, port or settings.ui.port)
    url = f"http://{settings.ui.host}:{port or settings.ui.port}"
    # MLflow's GenAI job runner (a dozen worker processes) serves nothing this project logs
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"} | dict(os.environ)
    for sig in (
        signal.SIGINT,
        signal.SIGTERM,
    ):  # Ctrl-C or `kill`, even where SIGINT came in ignored
        signal.signal(sig, interrupt)
    try:
        # its own process group: stopping it stops the workers it spawns too
        with servers.server_process(
            command, f"{url}/health", env=env, output=sys.stderr, stop_timeout=15
        ) as proc:
            typer.echo(f"MLflow UI: {url}  (Ctrl-C to stop)")
            store.record_ui(settings, url)  # `distill run` links here, whatever the port
            proc.wait()
    except servers.ServerNotReady as err:
        if err.returncode is not None:
            fail(f"mlflow server exited with code {err.returncode} (is {url} already in use?)")
        fail(f"mlflow server did not answer at {url} within 120 s")
    except KeyboardInterrupt:
        pass
    finally:
        store.record_ui(settings, None)


@app.command()
def promote(
    model: Annotated[
        str | None,
        typer.Option(
            "--model", help="Registered model name (default: register.model_name of --config)."
        ),
    ] = None,
    version: Annotated[
        str | None,
        typer.Option("--version", help="Version to promote (default: alias challenger)."),
    ] = None,
    config: Annotated[
        Path, typer.Option("--config", help="Config whose `promote:` section holds the gates.")
    ] = Path("configs/digits.yaml"),
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override a config key, e.g. promote.max_size_kb=null (repeatable)."
        ),
    ] = None,
    max_accuracy_drop: Annotated[
        float | None, typer.Option(help="Gate: teacher accuracy - student accuracy at most this.")
    ] = None,
    min_accuracy: Annotated[
        float | None, typer.Option(help="Gate: test accuracy at least this.")
    ] = None,
    max_size_kb: Annotated[
        float | None, typer.Option(help="Gate: model file at most this many KB.")
    ] = None,
    max_latency_ms_b1: Annotated[
        float | None, typer.Option(help="Gate: batch-1 latency at most this many ms.")
    ] = None,
    vs_champion: Annotated[
        bool | None,
        typer.Option(
            "--vs-champion/--ignore-champion",
            metavar="",
            help="Gate: no worse than the current champion on the same held-out rows.",
        ),
    ] = None,
    allow_target_missed: Annotated[
        bool,
        typer.Option(
            "--allow-target-missed",
            metavar="",
            help="Promote a version whose run missed its target (tag distill.target_met=false).",
        ),
    ] = False,
    champion_tolerance: Annotated[
        float | None, typer.Option(help="Accuracy the challenger may lose vs the champion.")
    ] = None,
    rollback: Annotated[
        bool,
        typer.Option("--rollback", metavar="", help="Move champion back to the previous champion."),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", metavar="", help="Print the decision as one JSON object.")
    ] = False,
) -> None:
    """Move alias `champion` to a version only if every gate passes (exit 1 if refused); or --rollback."""  # noqa: E501
    quiet()
    from distill.tasks.platform.config import DEFAULT_CONFIG, build_config, load_config
    from distill.tasks.platform.errors import UserError

    flags = {
        "max_accuracy_drop": max_accuracy_drop,
        "min_accuracy": min_accuracy,
        "max_size_kb": max_size_kb,
        "max_latency_ms_b1": max_latency_ms_b1,
        "vs_champion": vs_champion,
        "champion_tolerance": champion_tolerance,
        "allow_target_missed": allow_target_missed or None,
    }
    overrides = list(set_ or []) + [
        f"promote.{k}={json.dumps(v)}" for k, v in flags.items() if v is not None
    ]
    with user_errors():
        if rollback and version is not None:
            raise UserError(
                "--rollback moves champion to the previous champion; it takes no --version"
            )
        if model is not None and not model.strip():
            raise UserError("option --model: the registered model name is empty")
        # the default config is optional here: without it the gates are the schema's defaults
        cfg = (
            build_config({}, overrides)
            if config == DEFAULT_CONFIG and not config.is_file()
            else load_config(config, overrides)
        )

    server_ready = start_prefect_server_early()  # the gates run as a Prefect flow
    from prefect import tags as prefect_tags

    from distill.flows.promote import run_promotion

    hide_user_errors_in_prefect_logs()
    server_ready()
    with (
        user_errors(),
        contextlib.redirect_stdout(sys.stderr),
        prefect_tags("distill", "promote"),
    ):
        decision = run_promotion(
            model if model is not None else cfg.registry.model_name,
            version,
            cfg.promote,
            rollback,
        )
    if as_json:
        _echo_json(decision)
    else:
        typer.echo(decision.line(), err=not decision.ok)
    if not decision.ok:
        raise typer.Exit(EXIT_REFUSED)


@app.command()
def predict(
    model: Annotated[
        str, typer.Option("--model", help="Model URI, e.g. models:/distill-digits@champion.")
    ],
    input_: Annotated[
        Path,
        typer.Option(
            "--input",
            help="Rows to predict: .csv / .parquet (feature columns by name) or .npz (array X).",
        ),
    ],
    output: Annotated[
        Path, typer.Option("--output", help="Where predictions go: .csv or .parquet.")
    ],
    label: Annotated[
        str | None,
        typer.Option("--label", help="A column of true labels in the input: print accuracy."),
    ] = None,
) -> None:
    """Batch prediction through mlflow.pyfunc; the model applies its own preprocessing."""
    quiet()

    with user_errors():
        from distill.tasks.platform import store
        from distill.tasks.release.predict import predict_file

        store.point_at(store.load_settings())
        with contextlib.redirect_stdout(sys.stderr):
            report = predict_file(model, input_, output, label)
    accuracy = f", accuracy {report.accuracy:.4f}" if report.accuracy is not None else ""
    if report.errors is not None:  # a regression model: R², MAE, RMSE in the label's units
        e = report.errors
        accuracy = f", R² {e['r2']:.4f}, MAE {e['mae']:.4g}, RMSE {e['rmse']:.4g}"
    if label is not None and report.unlabelled:
        accuracy += (
            f" on {report.rows - report.unlabelled} labelled rows ({report.unlabelled} "
            f"without a label)"
            if report.accuracy is not None or report.errors is not None
            else ", no row has a label"
        )
    typer.echo(f"wrote {report.rows} predictions to {report.output}{accuracy}")


def main() -> None:
    mask_passwords_in_output()  # before anything makes a logging handler on the raw streams
    # torch's OpenMP threads spin while they wait for work: on 2 shared cores a spinning thread
    # takes the core from the one with work (a teacher's step 25-40 ms instead of 3-4 ms on this
    # machine under load). Passive waiting, unless the user chose; read when torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app()


if __name__ == "__main__":
    main()
