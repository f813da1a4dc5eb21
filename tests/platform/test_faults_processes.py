"""Processes lost or stopped during a run: the tracking server going away (exit 3, the parent
closed FAILED by the next run once it is back), Ctrl-C (exit 130, runs KILLED), and a SIGKILL
during registration (nothing promotable left, the temporary Prefect server gone with it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from distill.tasks.platform import dead_runs
from distill.tasks.platform.servers import free_port, server_process
from tests.conftest import use_store
from tests.platform.faults import RUN, fault_env, last_line


def _mlflow_server(tmp_path: Path, port: int) -> contextlib.AbstractContextManager:
    """An MLflow tracking server on `port` with its store in `tmp_path`, until the block ends."""
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port"]
    return server_process(
        [
            *command,
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server.db",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
        ],
        f"http://127.0.0.1:{port}/health",
        env=fault_env(tmp_path, MLFLOW_DISABLE_TELEMETRY="true"),
        startup_timeout=90,
    )


def _lose(server: subprocess.Popen) -> None:
    """The server and its worker go away at once (SIGKILL: no goodbye to the clients)."""
    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


@contextlib.contextmanager
def _run_in_flight(
    env: dict[str, str], cwd: Path, client: MlflowClient, db: Path | None = None, **popen: Any
) -> Iterator[tuple[subprocess.Popen, str]]:
    """`distill run` started, yielded with its parent run's id once that run is open (RUNNING);
    killed on leaving if still alive. `db`: a SQLite store the run makes, not read (so not made
    by this test's client) before it exists."""
    run = subprocess.Popen(
        [*RUN, "--set", "register.model_name=never"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
    try:
        deadline, parent = time.monotonic() + 240, None
        while parent is None and run.poll() is None and time.monotonic() < deadline:
            parent = _running_parent(client) if db is None or db.exists() else None
            time.sleep(0.2)
        assert parent is not None, "the run never opened its parent run"
        yield run, parent
    finally:
        if run.poll() is None:
            run.kill()


def _running_parent(client: MlflowClient) -> str | None:
    experiment = client.get_experiment_by_name("distill")
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="attributes.status = 'RUNNING'"
    )
    return next((r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags), None)


@pytest.mark.slow
def test_tracking_server_lost_mid_run(prefect_server, tmp_path, monkeypatch):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    # fewer, shorter HTTP retries than the CLI's default (3, backoff 2): the same path, sooner
    env = fault_env(
        tmp_path,
        MLFLOW_TRACKING_URI=uri,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
    )
    client = MlflowClient(uri, registry_uri=uri)
    with (
        _mlflow_server(tmp_path, port) as server,
        _run_in_flight(env, tmp_path, client) as (run, parent),
    ):
        _lose(server)  # the tracking server goes away mid-run
        _, stderr = run.communicate(timeout=300)
    assert run.returncode == 3, stderr
    assert last_line(stderr).startswith(
        f"error: the MLflow tracking server stopped answering ({uri}/"
    ), stderr
    assert "Traceback" not in stderr

    with _mlflow_server(tmp_path, port):  # back, same store
        assert client.get_run(parent).info.status == "RUNNING"  # nobody could close it meanwhile
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        import mlflow

        mlflow.set_tracking_uri(uri)
        experiment_id = client.get_experiment_by_name("distill").experiment_id
        assert dead_runs.close_dead_runs(experiment_id) == [
            parent
        ]  # what the next `distill run` does first
        assert client.get_run(parent).info.status == "FAILED"
        assert client.search_registered_models() == []


@pytest.mark.slow
def test_a_password_in_the_tracking_uri_is_never_printed_nor_stored(prefect_server, tmp_path):
    """MLflow prints "View run ... at: URL" per run and Prefect logs URIs; the password of
    `http://user:password@host` reaches neither the terminal nor the run's artifacts. A first
    registration prints none of MLflow's "Registered model ... already exists" either."""
    port, password = free_port(), "s3cr3t-pw"
    env = fault_env(tmp_path, MLFLOW_TRACKING_URI=f"http://alice:{password}@127.0.0.1:{port}")
    with _mlflow_server(tmp_path, port):
        done = subprocess.run(RUN, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert password not in done.stdout + done.stderr
    assert f"http://alice:***@127.0.0.1:{port}" in done.stdout  # the run's link, masked
    assert "already exists" not in done.stderr
    assert "View run" not in done.stdout + done.stderr  # distill prints the parent's link only
    stored = [p for p in (tmp_path / "server-artifacts").rglob("*") if p.is_file()]
    assert stored, "the run stored no artifacts"
    assert not [p for p in stored if password.encode() in p.read_bytes()]
    assert password.encode() not in (tmp_path / "server.db").read_bytes()


def test_redacting_stream_masks_every_password_it_is_given():
    import io

    from distill.tasks.platform.secrets import RedactingStream

    out = io.StringIO()
    stream = RedactingStream(out)
    stream.write("View run a at: http://bob:pa:ss@host:5000/#/x and postgresql://u:p@db/m\n")
    stream.write("no secret: http://host:5000/path@v2, user@example.org\n")
    assert out.getvalue() == (
        "View run a at: http://bob:***@host:5000/#/x and postgresql://u:***@db/m\n"
        "no secret: http://host:5000/path@v2, user@example.org\n"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, code, status, said",
    [
        (
            signal.SIGINT,
            130,
            "KILLED",
            "Ctrl-C",
        ),  # 128 + SIGINT (distill.flows.process.Interrupted)
        (signal.SIGTERM, 143, "FAILED", "SIGTERM"),
    ],
    ids=["ctrl-c", "sigterm"],
)
def test_a_signal_to_the_process_group_stops_the_run_in_seconds(
    tmp_path, signum, code, status, said
):
    """As a terminal's Ctrl-C does, the signal goes to the whole process group, with Prefect's
    temporary server of the run's own: it used to reach the server too, and distill then hung
    at exit in Prefect's log drain (SIGTERM: 74 s). The server lives in its own session now."""
    db = tmp_path / "mlflow.db"
    env = fault_env(tmp_path, temporary_server=True, MLFLOW_TRACKING_URI=f"sqlite:///{db}")
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    client = MlflowClient(f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    # SIGINT as a terminal delivers it: not ignored, even where the suite runs in the background;
    # a group of its own, so that the signal to the group reaches no test process
    popen = {
        "preexec_fn": lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        "start_new_session": True,
    }
    with _run_in_flight(env, tmp_path, client, db, **popen) as (run, parent):
        servers = _server_children(run.pid)
        sent = time.monotonic()
        os.killpg(run.pid, signum)
        _, stderr = run.communicate(timeout=120)
        took = time.monotonic() - sent
    assert run.returncode == code, stderr
    assert took < 10, f"{took:.1f} s to stop"
    assert "Traceback" not in stderr and "Crash detected" not in stderr, stderr
    assert last_line(stderr) == (
        f"distill: stopped by {said}; the same command resumes from the stages already done"
    )
    assert client.get_run(parent).info.status == status
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}'",
    )
    left = {c.info.run_name: c.info.status for c in children}
    assert all(s in ("FINISHED", status) for s in left.values()), (left, stderr)
    assert client.search_registered_models() == []
    deadline = time.monotonic() + 15  # the server is stopped by distill's exit, or its reaper
    while any(_alive(pid) for pid in servers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert servers and not any(_alive(pid) for pid in servers)


KILLED_AT_ALIAS = """
import os, signal, sys
from mlflow import MlflowClient
MlflowClient.set_registered_model_alias = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
from distill.flows.cli import main
main()
"""


def _server_children(pid: int) -> set[int]:
    """Prefect's temporary servers (uvicorn processes) started by process `pid`."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if (
                int(stat.read_text().rpartition(")")[2].split()[1]) == pid
                and b"uvicorn" in (stat.parent / "cmdline").read_bytes()
            ):
                found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().rpartition(")")[2].split()[0] != "Z"
    return False


def _in_process(store: Path, *args: str):
    """`distill ARGS` in this process (CliRunner) on the SQLite store in `store`."""
    from typer.testing import CliRunner

    from distill.flows.cli import app

    with use_store(store):
        return CliRunner().invoke(app, list(args))


@pytest.mark.slow
def test_sigkill_during_registration_leaves_nothing_promotable_and_no_server(tmp_path):
    """Issue 18: the killed run's version kept its lineage and `promote --version` promoted it; the
    temporary Prefect server kept listening. Now: the version is marked unfinished, promote refuses
    it, the next run removes it, and the server dies with the process."""
    db = tmp_path / "mlflow.db"
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    env = fault_env(tmp_path, **store)  # the later commands: the session's Prefect server
    fast = ["--set", "register.model_name=reg"]
    killed = subprocess.Popen(
        [sys.executable, "-c", KILLED_AT_ALIAS, *RUN[3:], *fast],
        cwd=tmp_path,
        env=fault_env(tmp_path, temporary_server=True, **store),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    servers: set[int] = set()
    while killed.poll() is None:
        servers |= _server_children(killed.pid)
        time.sleep(0.2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.read()[-2000:]
    assert servers, "no temporary Prefect server was seen"
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in servers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in servers), (
        "the temporary Prefect server outlived its process"
    )

    client = MlflowClient(
        f"sqlite:///{db}", registry_uri=f"sqlite:///{db}"
    )  # not a registry an earlier test set
    [version] = client.search_model_versions("name = 'reg'")
    assert version.tags["distill.complete"] == "false"  # the hole, reproduced: a version, no alias
    assert client.get_registered_model("reg").aliases == {}

    promote = ["promote", "--model", "reg"]  # in this process: the run is what was killed
    refused = _in_process(tmp_path, *promote, "--version", "1")
    assert refused.exit_code == 2, refused.output
    assert last_line(refused.stderr).startswith(
        "error: reg version 1 is an unfinished registration (run "
    )
    assert client.get_registered_model("reg").aliases == {}

    proc = subprocess.run(
        [*RUN, *fast], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the unfinished version is gone, and so is the empty model its run had created: the new run
    # made both anew (version numbers restart at 1)
    [new] = client.search_model_versions("name = 'reg'")
    assert (
        new.run_id != version.run_id and new.tags["mlflow.run_id"] != version.tags["mlflow.run_id"]
    )
    assert new.tags["distill.complete"] == "true"
    assert {k: str(v) for k, v in client.get_registered_model("reg").aliases.items()} == {
        "challenger": str(new.version)
    }

    # a version whose files are gone is not promoted either: promote loads it first
    model = client.get_logged_model(new.source.removeprefix("models:/"))
    shutil.rmtree(Path(model.artifact_location.removeprefix("file://")))
    refused = _in_process(tmp_path, *promote)
    assert refused.exit_code == 2, refused.output
    assert last_line(refused.stderr).startswith(f"error: reg version {new.version} does not load (")
    assert {k: str(v) for k, v in client.get_registered_model("reg").aliases.items()} == {
        "challenger": str(new.version)
    }
