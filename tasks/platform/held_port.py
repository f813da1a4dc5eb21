"""Prefect's temporary server on a port this process holds, so it cannot answer for another's.

Prefect's `SubprocessASGIServer` (the temporary server of a `distill run` without
PREFECT_API_URL, and of `prefect_test_harness`) picks a port that is free *now*, starts
uvicorn on it, and polls `/health` on that port until something answers. Uvicorn takes
seconds to import before it binds; when two processes pick the same port in that window, the
second's uvicorn fails to bind (exit 3, after the poll already succeeded) and the second
process talks to the first's server: its flow runs land in another database, and it gets
"connection refused" mid-run once the first process ends. (Reproduced with two processes
given one port: the second reported "started" with its own uvicorn exited 3.)

`launch_on_held_port` replaces the server's launch: the socket is bound here, before uvicorn
starts, and handed to it (`uvicorn --fd`), so no other process can take the port meanwhile and
whatever answers on it is this server. The socket is bound without SO_REUSEADDR: with it,
Linux lets another socket bind the same port until one of them listens.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any


def hold_port(port: int | None = None) -> socket.socket:
    """A TCP socket bound (not listening) on 127.0.0.1:`port`, or on a free port if taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port or 0))
    except OSError:
        sock.bind(("127.0.0.1", 0))
    return sock


def serve_on(sock: socket.socket, env: dict[str, str] | None = None) -> subprocess.Popen[Any]:
    """Prefect's server (as its temporary one: no UI) in a uvicorn process listening on `sock`,
    which it takes over (closed here); `env` on top of this process's settings."""
    import prefect
    from prefect.settings import get_current_settings

    try:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(prefect.__module_path__.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--fd",
                str(sock.fileno()),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            pass_fds=(sock.fileno(),),
            # its own session: a terminal's Ctrl-C (SIGINT to the whole foreground process group)
            # must not stop the server while distill still needs it to close its runs; distill
            # stops it at exit (Prefect's atexit), or the reaper when distill dies
            start_new_session=True,
            env={
                **os.environ,
                # as Prefect's own launch: no UI, an ephemeral server
                "PREFECT_UI_ENABLED": "0",
                "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT__SERVER_FINAL": "1",
                **get_current_settings().to_environment_variables(exclude_unset=True),
                **(env or {}),
            },
        )
    finally:
        sock.close()  # uvicorn holds its own copy


def launch_on_held_port(server: Any) -> subprocess.Popen[Any]:
    """`SubprocessASGIServer._run_uvicorn_command` (Prefect 3.8) with the listening socket bound
    by this process: `server.port` becomes the port actually held."""
    sock = hold_port(server.port)
    server.port = sock.getsockname()[1]
    return serve_on(sock)
