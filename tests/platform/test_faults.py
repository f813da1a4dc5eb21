"""Faults of the environment during a run, as a user meets them through `distill run`: one line
`error: ...`, exit code 3, no traceback, the parent run FAILED (at once, or by the next run
once the tracking server is back) and nothing registered. Ctrl-C ends the run KILLED."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tasks.platform import tracking
from tasks.platform.errors import fault_message
from tasks.platform.servers import free_port
from tests.conftest import ROOT, TINY

RUN = [
    sys.executable,
    "-m",
    "flows.cli",
    "run",
    str(ROOT / "configs" / "digits.yaml"),
    *[a for s in TINY for a in ("--set", s)],
]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The session's PREFECT_HOME (its temporary server's database is made once, not per run:
    ~6 s each) with this test's own result storage, so no stage comes from another test's cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    return (
        env
        | {
            "PYTHONPATH": str(ROOT),
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "prefect-results"),
            "DISTILL_MLFLOW_CONFIG": str(tmp_path / "mlflow.yaml"),
        }
        | extra
    )


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def test_fault_messages_name_the_fault_and_leave_bugs_alone():
    from mlflow.exceptions import MlflowException

    full = OSError(errno.ENOSPC, "No space left on device", "/data/artifacts/model.pth")
    assert fault_message(full) == "cannot write /data/artifacts/model.pth: No space left on device"
    try:  # found behind what it caused
        try:
            raise full
        except OSError as err:
            raise RuntimeError("logging the model failed") from err
    except RuntimeError as wrapped:
        assert fault_message(wrapped) == fault_message(full)
    lost = MlflowException(
        "API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/log-batch failed with "
        "exception HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded"
    )
    assert fault_message(lost).startswith(
        "the MLflow tracking server stopped answering "
        "(http://127.0.0.1:5000/api/2.0/mlflow/runs/log-batch)"
    )
    import shutil

    gathered = shutil.Error([("/tmp/a", "/data/artifacts/a", "[Errno 28] No space left on device")])
    assert fault_message(gathered) == "cannot write /data/artifacts/a: No space left on device"
    assert fault_message(ValueError("a bug")) is None
    assert fault_message(FileNotFoundError(errno.ENOENT, "No such file", "x")) is None
    assert not tracking.is_transient(full)  # a full disk is not retried


def _mount(disk: Path, options: str) -> None:
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("needs permission to mount a small tmpfs (root)")


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 64 KB filesystem: room for the run's first files, not for its models."""
    _mount(tmp_path / "disk", "size=64k")
    yield tmp_path / "disk"
    subprocess.run(["umount", "-l", str(tmp_path / "disk")], check=False)


@pytest.fixture
def read_only_disk(tmp_path: Path):
    _mount(tmp_path / "ro", "ro,size=64k")
    yield tmp_path / "ro"
    subprocess.run(["umount", "-l", str(tmp_path / "ro")], check=False)


def test_read_only_artifact_location_is_refused_before_any_run(read_only_disk, tmp_path):
    """Root may write anywhere it has permission bits for; a read-only filesystem stops it too."""
    db = tmp_path / "mlflow.db"
    (tmp_path / "mlflow.yaml").write_text(
        f"server:\n  tracking_uri: sqlite:///{db}\n  artifact_location: {read_only_disk}\n"
    )
    proc = subprocess.run(
        RUN, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    assert _last_line(proc.stderr) == (
        f"error: artifact location {read_only_disk.as_uri()} is not writable: Read-only file system"
    )
    client = MlflowClient(f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    assert client.search_runs([client.get_experiment_by_name("distill").experiment_id]) == []


def test_disk_full_mid_run_is_one_line_and_registers_nothing(tiny_disk, tmp_path):
    db = tmp_path / "mlflow.db"
    (tmp_path / "mlflow.yaml").write_text(
        f"server:\n  tracking_uri: sqlite:///{db}\n  artifact_location: {tiny_disk}/artifacts\n"
    )
    proc = subprocess.run(
        [*RUN, "--set", "register.model_name=never"],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr
    assert _last_line(proc.stderr).startswith(f"error: cannot write {tiny_disk}/artifacts/"), (
        proc.stderr
    )
    assert _last_line(proc.stderr).endswith(": No space left on device")
    assert "Traceback" not in proc.stderr
    client = MlflowClient(f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("distill").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.status for p in parents] == [
        "FAILED"
    ]  # it got as far as a parent run, and closed it
    assert all(r.info.status == "FAILED" for r in runs if r.info.status != "FINISHED")
    assert client.search_registered_models() == []


def _start_server(tmp_path: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server.db",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
        ],
        cwd=tmp_path,
        env=_env(tmp_path, MLFLOW_DISABLE_TELEMETRY="true"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return proc
        except OSError:
            time.sleep(0.3)
    _stop(proc)
    raise TimeoutError("mlflow server did not start")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its worker
        proc.wait(timeout=30)


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
    server = _start_server(tmp_path, port)
    # fewer, shorter HTTP retries than the CLI's default (3, backoff 2): the same path, sooner
    env = _env(
        tmp_path,
        MLFLOW_TRACKING_URI=uri,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
    )
    run = subprocess.Popen(
        [*RUN, "--set", "register.model_name=never"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = MlflowClient(uri, registry_uri=uri)
    try:
        deadline, parent = time.monotonic() + 240, None
        while parent is None and run.poll() is None and time.monotonic() < deadline:
            parent = _running_parent(client)
            time.sleep(0.2)
        assert parent is not None, "the run never opened its parent run"
        _stop(server)  # the tracking server goes away mid-run
        _, stderr = run.communicate(timeout=300)
    finally:
        _stop(server)
        if run.poll() is None:
            run.kill()
    assert run.returncode == 3, stderr
    assert _last_line(stderr).startswith(
        f"error: the MLflow tracking server stopped answering ({uri}/"
    ), stderr
    assert "Traceback" not in stderr

    server = _start_server(tmp_path, port)  # back, same store
    try:
        assert client.get_run(parent).info.status == "RUNNING"  # nobody could close it meanwhile
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        import mlflow

        mlflow.set_tracking_uri(uri)
        experiment_id = client.get_experiment_by_name("distill").experiment_id
        assert tracking.close_dead_runs(experiment_id) == [
            parent
        ]  # what the next `distill run` does first
        assert client.get_run(parent).info.status == "FAILED"
        assert client.search_registered_models() == []
    finally:
        _stop(server)


def test_ctrl_c_mid_run_ends_the_run_killed_and_registers_nothing(tmp_path):
    db = tmp_path / "mlflow.db"
    env = _env(tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{db}")
    # SIGINT as a terminal delivers it: not ignored, even where the suite runs in the background
    run = subprocess.Popen(
        [*RUN, "--set", "register.model_name=never"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    client = MlflowClient(f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    try:
        deadline, parent = time.monotonic() + 240, None
        while parent is None and run.poll() is None and time.monotonic() < deadline:
            parent = _running_parent(client) if db.exists() else None
            time.sleep(0.2)
        assert parent is not None, "the run never opened its parent run"
        run.send_signal(signal.SIGINT)  # Ctrl-C
        _, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130, (
        stderr
    )  # 128 + SIGINT, not killed by it (flows.process.Interrupted)
    assert client.get_run(parent).info.status == "KILLED"
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}'",
    )
    assert all(c.info.status in ("FINISHED", "KILLED") for c in children)
    assert client.search_registered_models() == []


# --- issue 18: the store, PREFECT_HOME, and a SIGKILL during registration ----------------------


def _store(tmp_path: Path) -> Path:
    """A SQLite store with experiment `distill` and one finished run (what a user's store holds)."""
    db = tmp_path / "store.db"
    client = MlflowClient(f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    experiment_id = client.create_experiment(
        "distill", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    client.set_terminated(client.create_run(experiment_id).info.run_id)
    return db


def _run_on(db: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "mlflow.yaml").write_text(
        f"server:\n  tracking_uri: sqlite:///{db}\n  artifact_location: {tmp_path / 'artifacts'}\n"
    )
    return subprocess.run(
        [*(args or RUN)],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _fill(disk: Path) -> None:
    with contextlib.suppress(OSError), open(disk / "filler", "wb", buffering=0) as handle:
        while True:
            handle.write(b"\0" * 4096)


def test_full_store_is_one_line_and_leaves_it_as_it_was(tmp_path):
    disk = tmp_path / "disk"
    _mount(disk, "size=4m")  # room for the store, then filled
    try:
        db = disk / "mlflow.db"
        shutil.copy(_store(tmp_path), db)
        _fill(disk)
        _full_store(db, tmp_path)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _full_store(db: Path, tmp_path: Path) -> None:
    _refused_and_unchanged(db, tmp_path, "database or disk is full")


def _refused_and_unchanged(db: Path, tmp_path: Path, reason: str) -> None:
    """A run on store `db` fails with exit 3 and one last line naming the store and `reason`,
    and leaves the file as it was."""
    before = db.read_bytes()
    proc = _run_on(db, tmp_path)
    assert proc.returncode == 3, proc.stderr
    # the per-stage lines of the stages before it, then one line
    assert _last_line(proc.stderr) == f"error: cannot write the tracking store {db}: {reason}"
    assert "Traceback" not in proc.stderr
    assert db.read_bytes() == before


def test_read_only_store_is_one_line_and_leaves_it_as_it_was(tmp_path):
    db = _store(tmp_path)
    if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode != 0:
        pytest.skip("needs chattr +i (root, ext4)")
    try:
        _refused_and_unchanged(db, tmp_path, "attempt to write a readonly database")
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=False)


def test_corrupt_store_is_one_line_for_run_and_compare(tmp_path):
    db = tmp_path / "store.db"
    db.write_bytes(b"not a database " * 100)
    for args in (RUN, [sys.executable, "-m", "flows.cli", "compare"]):
        proc = _run_on(db, tmp_path, *args)
        assert proc.returncode == 3, proc.stderr
        assert (
            _last_line(proc.stderr)
            == f"error: cannot read the tracking store {db}: file is not a database"
        )
        assert "Traceback" not in proc.stderr
    assert db.read_bytes() == b"not a database " * 100


def test_prefect_home_on_a_full_disk_fails_at_once(tiny_disk, tmp_path):
    _fill(tiny_disk)
    started = time.monotonic()
    proc = subprocess.run(
        RUN,
        cwd=tmp_path,
        env=_env(
            tmp_path,
            PREFECT_HOME=str(tiny_disk / "prefect"),
            MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/m.db",
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: cannot write {tiny_disk / 'prefect'}: No space left on device (PREFECT_HOME)"
    ]
    assert (
        time.monotonic() - started < 60
    )  # was: a 90 s wait for a server that cannot start, then a traceback
    assert not (tmp_path / "m.db").exists()


# `distill run`, SIGKILLed at the moment registration would give the new version its alias
KILLED_AT_ALIAS = """
import os, signal, sys
from mlflow import MlflowClient
MlflowClient.set_registered_model_alias = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
from flows.cli import main
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


def test_sigkill_during_registration_leaves_nothing_promotable_and_no_server(tmp_path):
    """Issue 18: the killed run's version kept its lineage and `promote --version` promoted it; the
    temporary Prefect server kept listening. Now: the version is marked unfinished, promote refuses
    it, the next run removes it, and the server dies with the process."""
    db = tmp_path / "mlflow.db"
    env = _env(tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{db}")
    fast = ["--set", "register.model_name=reg", "--set", "evaluate.plots=false"]
    killed = subprocess.Popen(
        [sys.executable, "-c", KILLED_AT_ALIAS, *RUN[3:], *fast],
        cwd=tmp_path,
        env=env,
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

    promote = [sys.executable, "-m", "flows.cli", "promote", "--model", "reg"]
    proc = subprocess.run(
        [*promote, "--version", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert _last_line(proc.stderr).startswith(
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
    proc = subprocess.run(
        promote, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    assert _last_line(proc.stderr).startswith(f"error: reg version {new.version} does not load (")
    assert {k: str(v) for k, v in client.get_registered_model("reg").aliases.items()} == {
        "challenger": str(new.version)
    }
