"""Local server processes (tasks/platform/servers.py): ready when their health URL answers,
stopped with the whole process group, and a server that never gets ready is stopped too.
(`prefect_server` runs in tests/flows/test_orchestration.py, `distill ui` in test_ui.py.)"""

import sys
import time
import urllib.request
from pathlib import Path

import pytest

from distill.tasks.platform.servers import ServerNotReady, free_port, server_process

# a server that starts a worker of its own, then serves `folder`: /health is the file "health"
SERVER = """
import functools, http.server, subprocess, sys
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(str(worker.pid))
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[2])
http.server.HTTPServer(("127.0.0.1", int(sys.argv[3])), handler).serve_forever()
"""


def _gone(pid: int, seconds: float = 10) -> bool:
    """The process ended (a zombie nobody reaped yet counts as ended)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


def test_a_server_is_yielded_once_healthy_and_stopped_with_its_workers(tmp_path):
    (tmp_path / "health").write_text("ok")
    port, pid_file = free_port(), tmp_path / "worker.pid"
    command = [sys.executable, "-c", SERVER, str(pid_file), str(tmp_path), str(port)]
    with server_process(command, f"http://127.0.0.1:{port}/health") as proc:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            assert response.read() == b"ok"
        worker = int(pid_file.read_text())
        assert proc.poll() is None and not _gone(worker, 0)
    assert proc.poll() is not None
    assert _gone(worker), "the server's own worker outlived it"


def _start(command: list[str], url: str, **options) -> None:
    with server_process(command, url, **options):
        pytest.fail("a server that never got ready was yielded")


def test_a_server_that_exits_or_never_answers_is_one_error_and_stopped(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/health"
    with pytest.raises(ServerNotReady, match="exited with code 3") as exited:
        _start([sys.executable, "-c", "raise SystemExit(3)"], url)
    assert exited.value.returncode == 3

    pid_file = tmp_path / "pid"
    silent = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(99)"
    )
    with pytest.raises(ServerNotReady, match="did not answer within 2 s") as timed_out:
        _start([sys.executable, "-c", silent], url, startup_timeout=2)
    assert timed_out.value.returncode is None
    assert _gone(int(pid_file.read_text()))
