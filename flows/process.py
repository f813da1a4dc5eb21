"""What a `distill` process sets up around its command: quiet, offline settings for Prefect and
MLflow, Prefect's temporary server started early (and stopped if the process dies), signals
that unwind like errors, and every error as one line with its exit code; `flow_command` puts
them together around the flow call of `distill run` and `distill sweep`.

User errors (bad config, files, columns, URIs, a model the configured mode cannot handle)
print one line `error: ...` and exit 2; faults of the environment (disk full, no write
permission, tracking server gone) one line and exit 3; a stage that fails for another reason
(the model's own code, a bug) one line and exit 4, its trace in the stage run's `error.txt` and
on the terminal with `--debug`; a promotion its gates refused exits 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer

from distill.tasks.platform.secrets import mask_passwords_in_output

EXIT_USER_ERROR = 2
EXIT_FAULT = 3  # the environment failed the run: disk full, permission denied, tracking server gone
EXIT_REFUSED = 1  # a promotion its gates refused
SIGTERM_EXIT = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM ended
EXIT_FAILED = 4  # a stage failed (the model's own code, or a bug): one line, the trace in error.txt


# Quiet, offline defaults; a user's own settings win.
QUIET_ENV = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_LOGGING_LEVEL": "ERROR",
    "DASK_LOGGING__DISTRIBUTED": "warning",
    # a tracking server that goes away mid-run: bounded retries (MLflow's default is 7 with
    # exponential backoff, minutes), then the run fails with the error
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    # MLflow prints "View run NAME at: URL" for every stage run, and a progress bar for every
    # artifact it downloads; distill prints the parent run's link itself, password masked
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}

NOISY_WARNINGS = (
    ".*Saving pytorch model by Pickle.*",
    ".*Inferred schema contains integer column.*",
    ".*consider to run pre-processing before quantization.*",
)


# Prefect's loggers at INFO, so flow and task runs send their logs to the server (the run's Logs
# tab), while its console shows warnings only: `distill` prints its own lines (stage_lines).
# Where the user set PREFECT_LOGGING_LEVEL, their level rules the console too.
PREFECT_LOG_ENV = {
    "PREFECT_LOGGING_LEVEL": "INFO",
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
    "PREFECT_LOGGING_HANDLERS_API_LEVEL": "INFO",
}


def quiet() -> None:
    mask_passwords_in_output()
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if "PREFECT_LOGGING_LEVEL" not in os.environ:
        for key, value in PREFECT_LOG_ENV.items():
            os.environ.setdefault(key, value)
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    # it logs each SQLAlchemy error with a traceback, then raises it: the raised error is reported
    # (one line for a full, read-only or corrupt store; a bug keeps its traceback)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # Prefect's events worker warns "Still processing items" whenever events are still queued as
    # the process exits: it then sends them all; nothing is wrong and nothing is lost
    logging.getLogger("EventsWorker").setLevel(logging.ERROR)


# Prefect's "Crash detected! Execution was aborted by an interrupt signal." and its state lines
SIGNAL_CRASHES = ("aborted by an interrupt signal", "aborted by a termination signal")


class _HideUserErrors(logging.Filter):
    """Prefect logs a flow's exception with its traceback; a user error or a fault gets our one
    line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        from distill.tasks.platform.errors import UserError, fault_message, mentions_fault

        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and (isinstance(exc, UserError) or fault_message(exc) is not None):
            return False
        # "Finished in state Failed('... UserError: ...')" carries no exc_info, only the text
        message = record.getMessage()
        if any(signal in message for signal in SIGNAL_CRASHES):
            return False  # a Ctrl-C or SIGTERM: distill says it stopped, in one line
        return "UserError" not in message and not mentions_fault(message)


def hide_user_errors_in_prefect_logs() -> None:
    # on the loggers Prefect reports run failures with (their handlers may be replaced later)
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_HideUserErrors())


class _HideRunFailures(logging.Filter):
    """On the terminal's Prefect handlers: a flow or task run's failure (its traceback, the
    "Finished in state Failed" line) is said once, by distill's own line; Prefect's API handler
    (the run's Logs tab) keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        run_logger = record.name.startswith(("prefect.flow_runs", "prefect.task_runs"))
        return not (run_logger and (record.levelno >= logging.ERROR or record.exc_info))


def hide_run_failures_on_the_terminal() -> None:
    """Unless `--debug`: no Prefect traceback on the terminal (its console handlers, on the root
    logger, set up when Prefect is imported)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *map(logging.getLogger, logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler) and not any(
                isinstance(f, _HideRunFailures) for f in handler.filters
            ):
                handler.addFilter(_HideRunFailures())


def start_prefect_server_early() -> Callable[[], None]:
    """Without PREFECT_API_URL, Prefect starts a temporary server at a flow's first API call and
    waits for it (5-10 s here). Start it now, in a thread (the server is its own process), while
    this process imports torch, scikit-learn and MLflow; returns the wait for what is left.
    The server listens on a port this process holds (tasks/platform/held_port.py) and dies with
    this process (tasks/platform/reaper.py)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return lambda: None
    from prefect.server.api.server import SubprocessASGIServer  # the instance Prefect's clients use

    from distill.tasks.platform import reaper
    from distill.tasks.platform.held_port import launch_on_held_port

    server = SubprocessASGIServer()

    def launch_watched() -> Any:
        process = launch_on_held_port(server)
        reaper.watch(process.pid)  # a SIGKILLed distill must not leave the server listening
        return process

    server._run_uvicorn_command = launch_watched  # type: ignore[method-assign]

    def start() -> None:
        # a failed start is retried, and reported, by the flow's first call
        with contextlib.suppress(Exception), _first_start_alone():
            server.start()

    thread = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    thread.start()
    return thread.join


@contextlib.contextmanager
def _first_start_alone() -> Iterator[None]:
    """The first temporary server on a PREFECT_HOME creates and migrates its database: runs
    started together each raced to migrate it, and the losers' servers printed 100-200 lines of
    SQLAlchemy tracebacks. The first start of each Prefect version holds a file lock in
    PREFECT_HOME until its server answers (migrated); once a start succeeded, a marker file lets
    later ones start without waiting."""
    import prefect
    from filelock import FileLock
    from prefect.settings import PREFECT_HOME

    home = Path(PREFECT_HOME.value()).expanduser()
    ready = home / f".distill-database-ready-{prefect.__version__}"
    if ready.exists():
        yield
        return
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(home / ".distill-database-migration.lock"):
        yield
        ready.touch()


PREFECT_HOME_MIN_FREE_MB = 32  # a temporary server's database grows to ~8 MB in a run; results too


def check_prefect_home() -> None:
    """PREFECT_HOME holds the temporary server's database and the cached stage results: on a full
    or read-only disk the server never answers (a 90 s wait, then a traceback). Say so first."""
    import errno
    import shutil

    from prefect.settings import PREFECT_HOME

    from distill.tasks.platform.store import ensure_writable

    home = Path(PREFECT_HOME.value()).expanduser()
    try:
        ensure_writable(home)
    except OSError as err:
        raise OSError(err.errno, f"{err.strerror} (PREFECT_HOME)", str(home)) from None
    free_mb = shutil.disk_usage(home).free / 2**20
    if free_mb < PREFECT_HOME_MIN_FREE_MB:
        raise OSError(
            errno.ENOSPC,
            f"{os.strerror(errno.ENOSPC)} ({free_mb:.1f} MB free, Prefect "
            f"needs ~{PREFECT_HOME_MIN_FREE_MB} MB; PREFECT_HOME)",
            str(home),
        )


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, as the CLI raises it. Not a plain KeyboardInterrupt on purpose: CPython 3.11 notes a
    plain one that leaves code run by exec() or eval() of a string (sympy, mpmath, dataclasses and
    namedtuple make functions that way, e.g. while torch imports torch._dynamo on the teacher's
    first optimizer step) and then, under `python -m`, kills the process with SIGINT at exit
    although the interrupt was handled: exit -2 instead of 130. It checks the exact type."""


_INTERRUPTS = [0]  # Ctrl-Cs received (a swallowed one given back does not count twice)


def interrupt(signum: int, frame: Any) -> None:
    """The first Ctrl-C unwinds the run (its runs closed KILLED, the cache consistent); a second
    one, while that is under way, exits at once (the next run closes what was left open)."""
    _INTERRUPTS[0] += 1
    if _INTERRUPTS[0] > 1:
        sys.stderr.write("\ndistill: interrupted again: exiting now\n")
        sys.stderr.flush()
        os._exit(128 + signum)
    raise Interrupted


def _redeliver_swallowed_interrupt(unraisable: Any) -> None:
    """`sys.unraisablehook`: a Ctrl-C whose handler ran inside a weakref callback or a `__del__`
    (garbage collection, e.g. SQLAlchemy's class registry) raised `Interrupted` where Python
    prints it as "Exception ignored in ..." and drops it: the run would go on to the end. It is
    delivered again a moment later, in the main thread, where it unwinds the run."""
    exc = unraisable.exc_value
    if isinstance(exc, Interrupted):
        import _thread

        _INTERRUPTS[0] -= 1  # the same Ctrl-C, delivered again
        threading.Timer(0.05, _thread.interrupt_main).start()
        return
    if _is_termination(exc):  # the same for SIGTERM: ours, or Prefect's handler inside a flow
        import signal

        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()
        return
    sys.__unraisablehook__(unraisable)


def _is_termination(exc: BaseException | None) -> bool:
    """SIGTERM as raised by `exit_on_signals`'s handler or by Prefect's while a flow runs
    (`prefect.exceptions.TerminationSignal`)."""
    return (isinstance(exc, SystemExit) and exc.code == SIGTERM_EXIT) or (
        type(exc).__name__ == "TerminationSignal"
    )


def exit_on_signals() -> None:
    """SIGTERM (a `kill`, a supervisor stopping the job) unwinds like an error, so the MLflow
    parent run is closed FAILED rather than left RUNNING (SIGKILL: see dead_runs.close_dead_runs);
    Ctrl-C unwinds as `Interrupted`: runs end KILLED and the exit code is 130."""
    import signal

    def terminate(signum: int, _frame: Any) -> None:
        raise SystemExit(SIGTERM_EXIT)

    signal.signal(signal.SIGTERM, terminate)
    sys.unraisablehook = _redeliver_swallowed_interrupt
    # where SIGINT came in ignored (nohup, a background job), it stays ignored
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, interrupt)


@contextlib.contextmanager
def flow_command(
    name: str,
    *,
    note: str | None = None,
    stage_lines: bool = False,
    refresh: bool = False,
    debug: bool | None = None,
) -> Iterator[None]:
    """Around the flow call of `distill run` and `distill sweep`, once their inputs are checked:
    PREFECT_HOME checked, `note` printed, Prefect's temporary server started while the pipeline's
    modules import, Prefect's logs without the user errors we print as one line, a line per
    finished stage (`stage_lines`), signals that unwind like errors. Then, around the block: user
    errors and faults as one line, stdout to stderr (stdout is the command's result: table or
    JSON), distill's local Prefect settings, tags `distill` and `name`, and with `refresh` every
    stage recomputed (cached results are not reused, but refreshed). `debug` (not None: `distill
    run`): every error is one line, and a traceback only when True (Prefect's included)."""
    with user_errors(debug):
        check_prefect_home()
    if note is not None:
        from distill.tasks.platform.progress import note as print_note

        print_note(note)
    server_ready = start_prefect_server_early()
    from distill.flows.distill import local_settings  # torch, MLflow...: while the server starts

    server_ready()
    from prefect import tags

    hide_user_errors_in_prefect_logs()
    if debug is False:
        hide_run_failures_on_the_terminal()
    if stage_lines:
        from distill.tasks.platform.progress import stage_lines as print_stage_lines

        print_stage_lines()
    exit_on_signals()
    try:
        with (
            user_errors(debug),
            contextlib.redirect_stdout(sys.stderr),
            _recompute(refresh),
            local_settings(),
            tags("distill", name),
        ):
            yield
    except Interrupted:
        _stopped_by("Ctrl-C")
        raise
    except SystemExit as stop:
        if stop.code == SIGTERM_EXIT:
            _stopped_by("SIGTERM")
        raise


def _stopped_by(what: str) -> None:
    print(
        f"distill: stopped by {what}; the same command resumes from the stages already done",
        file=sys.stderr,
    )


def _recompute(refresh: bool) -> Any:
    """A reproduction recomputes every stage: cached task results are not reused (but refreshed)."""
    if not refresh:
        return contextlib.nullcontext()
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    return temporary_settings(updates={PREFECT_TASKS_REFRESH_CACHE: True})


@contextlib.contextmanager
def user_errors(debug: bool | None = None) -> Iterator[None]:
    """A UserError inside becomes one line `error: ...` on stderr and exit 2; a fault of the
    environment (disk full, no write permission, tracking server gone) one line and exit 3; a
    failed stage (`StageFailed`) its line and exit 4. Anything else is a bug: it keeps its
    traceback, unless `debug` is given (`distill run`): then it is one line and exit 4 too,
    and `debug=True` prints the traceback of every error before its line."""
    import click

    from distill.tasks.platform.errors import StageFailed, UserError, fault_message, first_line

    try:
        yield
    except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort):
        raise  # a line already printed (fail), or Ctrl-C at a prompt
    except click.ClickException:
        raise  # the CLI's own usage errors
    except UserError as err:
        fail(str(err), trace=err if debug else None)
    except StageFailed as err:
        fail(err.line, EXIT_FAILED, trace=err if debug else None)
    except Exception as err:
        message = fault_message(err)
        if message is not None:
            fail(message, EXIT_FAULT, trace=err if debug else None)
        if debug is None:
            raise  # a bug: keep the traceback
        fail(
            f"{type(err).__name__}: {first_line(err)} (unexpected: please report it; "
            "`distill run --debug` prints the traceback)",
            EXIT_FAILED,
            trace=err if debug else None,
        )


def fail(message: str, code: int = EXIT_USER_ERROR, trace: BaseException | None = None) -> None:
    """`error: MESSAGE` on stderr and exit `code`; `trace`: its traceback first (`--debug`)."""
    if trace is not None:
        import traceback

        traceback.print_exception(trace, file=sys.stderr)
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)
