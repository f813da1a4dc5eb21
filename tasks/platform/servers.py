"""Local server processes: started in their own process group, waited for until their health URL
answers, stopped with the whole group (the workers a server spawns too).

`server_process` is the mechanism (`distill ui` runs the MLflow server with it);
`prefect_server` starts a real Prefect server on 127.0.0.1 with its own PREFECT_HOME for the
tests and benchmarks that need one (a deployment, a worker, Dask workers, the Prefect UI).
`distill run` needs none: it starts Prefect's temporary server in-process (flows/process.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO


class ServerNotReady(RuntimeError):
    """The server exited (`returncode`) or did not answer in time (`returncode` None)."""

    def __init__(self, message: str, returncode: int | None) -> None:
        super().__init__(message)
        self.returncode = returncode


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    """`url` answers 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the process's group, SIGKILL after `timeout` seconds; waits for it."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def server_process(
    command: list[str],
    health_url: str,
    *,
    env: dict[str, str] | None = None,
    output: IO | int = subprocess.DEVNULL,
    startup_timeout: float = 120,
    stop_timeout: float = 30,
) -> Iterator[subprocess.Popen]:
    """`command` in a new process group (stdout and stderr to `output`), yielded once `health_url`
    answers 200; stopped with its group on leaving (and when it never gets ready: then
    `ServerNotReady`)."""
    proc = subprocess.Popen(
        command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + startup_timeout
        while not answers(health_url):
            if proc.poll() is not None:
                raise ServerNotReady(
                    f"the server exited with code {proc.returncode} before {health_url} answered",
                    proc.returncode,
                )
            if time.monotonic() > deadline:
                raise ServerNotReady(
                    f"{health_url} did not answer within {startup_timeout:.0f} s", None
                )
            time.sleep(0.5)
        yield proc
    finally:
        stop_group(proc, stop_timeout)


@contextlib.contextmanager
def prefect_server(home: Path, *, ui: bool = False, log: Path | None = None) -> Iterator[str]:
    """`prefect server start` on a free port of 127.0.0.1 with its own PREFECT_HOME `home` (its
    database; a PREFECT_API_* of this environment is not passed on), its output in `log`
    (default: `home`/server.log); waits for /api/health, yields the API URL
    (http://127.0.0.1:PORT/api) and stops the whole process group. The Prefect UI is served at
    the URL without /api when `ui` is set."""
    home.mkdir(parents=True, exist_ok=True)
    log = log or home / "server.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")} | {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": str(ui).lower(),
        "PREFECT_UI_API_URL": url,  # what the UI's pages call
    }
    command = [sys.executable, "-m", "prefect", "server", "start"]
    with log.open("w") as out:
        try:
            with server_process(
                [*command, "--host", "127.0.0.1", "--port", str(port)],
                f"{url}/health",
                env=env,
                output=out,
            ):
                yield url
        except ServerNotReady as err:
            out.flush()
            raise ServerNotReady(
                f"prefect server: {err}; its log ({log}) ends:\n{log.read_text()[-3000:]}",
                err.returncode,
            ) from None
