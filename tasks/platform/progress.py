"""Progress bars that show in a terminal and stay silent in logs, CI and tests; one line per
finished stage with its time, everywhere (`stage_lines`)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


QUIET_LINE_EVERY_S = 30.0  # without a terminal: one progress line at most this often


def _no_label() -> str:
    return ""


# What names the run a progress line belongs to ("[variant name] "); the flows set it to the
# Prefect flow run's name (a sweep variant's grid values): this module knows nothing of Prefect.
run_label: Callable[[], str] = _no_label


def _who() -> str:
    return run_label()


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """A progress bar in a terminal, in the main thread; elsewhere (a log file, CI, a sweep's
    threads, whose bars would overwrite each other on one line) a line every 30 s that names
    the flow run. A loop that stops early (early stopping) fills its bar: the work is done."""
    total = total if total is not None else len(items) if hasattr(items, "__len__") else None
    if not sys.stderr.isatty() or threading.current_thread() is not threading.main_thread():
        yield from _lines(items, description, total)
        return
    from rich.progress import Progress

    with Progress(*Progress.get_default_columns(), transient=True) as progress:
        bar = progress.add_task(description, total=total)
        try:
            for item in items:
                yield item
                progress.advance(bar)
        finally:
            progress.update(bar, completed=total or 0)


def _lines(items: Iterable[T], description: str, total: int | None) -> Iterator[T]:
    start = last = time.monotonic()
    for done, item in enumerate(items):
        yield item
        now = time.monotonic()
        if now - last >= QUIET_LINE_EVERY_S:
            last = now
            of = f"/{total}" if total else ""
            print(
                f"distill: {_who()}{description} {done + 1}{of} ({now - start:.0f} s)",
                file=sys.stderr,
                flush=True,
            )


class _StageLines(logging.Handler):
    """On Prefect's task-run logger: each "Finished in state ..." record becomes one line on
    stderr, `distill: teacher done in 12.1 s (15.0 s in all)`, timed from the task run's
    "Created task run" record. A handler, not a filter: the records still reach Prefect's API
    handler (the run's Logs tab) and console handler (WARNING and up, QUIET_ENV)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.restart()

    def restart(self) -> None:
        self.start = time.monotonic()
        self.started: dict[str, float] = {}  # task run id -> when it was created

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno > logging.INFO:
            return
        message, now = record.getMessage(), time.monotonic()
        run_id = getattr(record, "task_run_id", None)
        if message.startswith("Created task run "):
            self.started[str(run_id)] = now
        elif record.levelno == logging.INFO and message.startswith("Finished in state "):
            state = message.removeprefix("Finished in state ").split("(")[0]
            took = now - self.started.pop(str(run_id), now)
            name = getattr(record, "task_run_name", None) or getattr(record, "task_name", "stage")
            print(
                f"distill: {name} "
                f"{'cached' if state == 'Cached' else 'done'} in {took:.1f} s "
                f"({now - self.start:.1f} s in all)",
                file=sys.stderr,
                flush=True,
            )


_STAGE_LINES = _StageLines()


def stage_lines() -> None:
    """One line per finished stage (task run) with its time, for `distill run`: what a log
    file or CI shows while the run goes on. Not when the user asked Prefect's console for INFO
    logs (they hold the same news). Idempotent; the clock restarts at each call."""
    logger = logging.getLogger("prefect.task_runs")
    _STAGE_LINES.restart()
    console = os.environ.get("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING").upper()
    if _STAGE_LINES in logger.handlers or console in ("DEBUG", "INFO", "0", "10", "20"):
        return
    logger.addHandler(_STAGE_LINES)
    logger.setLevel(logging.DEBUG)  # "Created task run" is a DEBUG record: the stage's start


def note(message: str) -> None:
    """One line on stderr for a phase that is no task run (start-up, registration), in the same
    form as the stage lines, so a log never goes silent for long."""
    print(f"distill: {message}", file=sys.stderr, flush=True)
