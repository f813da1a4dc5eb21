"""Progress bars that show in a terminal and stay silent in logs, CI and tests; one line per
finished stage with its time, everywhere (`stage_lines`)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    if not sys.stderr.isatty():
        yield from items
        return
    from rich.progress import track as rich_track

    yield from rich_track(items, description=description, total=total, transient=True)


def note(message: str) -> None:
    """One line `distill: MESSAGE` on stderr, in a terminal or a log alike."""
    print(f"distill: {message}", file=sys.stderr, flush=True)


class _StageLines(logging.Filter):
    """On Prefect's task-run logger: each "Finished in state ..." record becomes one line on
    stderr, `distill: teacher done in 12.1 s (15.0 s in all)`, timed from the task run's
    "Created task run" record; the other DEBUG and INFO records stay hidden, as Prefect's
    WARNING level had them. Warnings and errors pass as before."""

    def __init__(self) -> None:
        super().__init__()
        self.restart()

    def restart(self) -> None:
        self.start = time.monotonic()
        self.started: dict[str, float] = {}  # task run id -> when it was created

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
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
        return False


_STAGE_LINES = _StageLines()


def stage_lines() -> None:
    """One line per finished stage (task run) with its time, for `distill run`: what a log
    file or CI shows while the run goes on. Not when the user asked Prefect for INFO logs
    (they hold the same news). Idempotent; the clock restarts at each call."""
    logger = logging.getLogger("prefect.task_runs")
    _STAGE_LINES.restart()
    if _STAGE_LINES in logger.filters or logger.getEffectiveLevel() <= logging.INFO:
        return
    logger.addFilter(_STAGE_LINES)
    logger.setLevel(logging.DEBUG)  # "Created task run" is a DEBUG record: the stage's start
