"""Stop Prefect's temporary server when the `distill` process that started it dies, however.

Without PREFECT_API_URL each `distill run` starts a temporary Prefect server (a uvicorn
process, ~240 MB) and stops it at exit (atexit). A SIGKILL or the OOM killer runs no atexit:
the server would listen forever. `watch(pid)` starts a small watchdog process holding the read
end of a pipe whose write end only this process holds; when this process ends, the pipe
closes and the watchdog stops the server, if it is still the same process (its start time
in /proc, so a recycled pid is left alone). Linux (where /proc exists) only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

_WATCHDOGS: list[subprocess.Popen] = []  # held: the pipe stays open as long as this process lives


def started(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22): with the pid,
    it names one process, even after the pid is recycled. None when gone; "" when alive on a
    system without /proc (no identity: nothing is stopped there)."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.is_dir() and Path("/proc/self/stat").is_file():
        try:
            return stat.read_text().rpartition(")")[2].split()[19]
        except (OSError, IndexError):
            return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # exists, owned by someone else
    return ""


def watch(pid: int) -> subprocess.Popen | None:
    """Stop process `pid` (SIGTERM, then SIGKILL) once this process has ended."""
    start = started(pid)
    if not start:  # gone, or no /proc to tell a recycled pid
        return None
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "distill.tasks.platform.reaper", str(pid), start],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    _WATCHDOGS.append(watchdog)
    return watchdog


def stop(pid: int, start: str, grace: float = 5.0) -> bool:
    """SIGTERM `pid` if it is still the process that started at `start`, SIGKILL after `grace`
    seconds; True when it was ours to stop."""
    if started(pid) != start:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while started(pid) == start and time.monotonic() < deadline:
        time.sleep(0.1)
    if started(pid) == start:
        os.kill(pid, signal.SIGKILL)
    return True


def main() -> None:
    pid, start = int(sys.argv[1]), sys.argv[2]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C for distill is not for the watchdog
    sys.stdin.buffer.read()  # returns at EOF: the distill process has ended
    with contextlib.suppress(ProcessLookupError):
        stop(pid, start)


if __name__ == "__main__":
    main()
