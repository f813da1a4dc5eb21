"""Faults of the environment during a run, as a user meets them through `distill run`: one line
`error: ...`, exit code 3, no traceback, the parent run FAILED (at once, or by the next run
once the tracking server is back) and nothing registered. Ctrl-C ends the run KILLED."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tasks import tracking
from tasks.errors import fault_message

from .conftest import ROOT, TINY, free_port

RUN = [sys.executable, "-m", "flows.cli", "run", str(ROOT / "configs" / "digits.yaml"),
       *[a for s in TINY for a in ("--set", s)]]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The session's PREFECT_HOME (its temporary server's database is made once, not per run:
    ~6 s each) with this test's own result storage, so no stage comes from another test's cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    return env | {"PYTHONPATH": str(ROOT),
                  "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "prefect-results"),
                  "DISTILL_MLFLOW_CONFIG": str(tmp_path / "mlflow.yaml")} | extra


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
    lost = MlflowException("API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/log-batch failed with "
                           "exception HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded")
    assert fault_message(lost).startswith("the MLflow tracking server stopped answering "
                                          "(http://127.0.0.1:5000/api/2.0/mlflow/runs/log-batch)")
    import shutil

    gathered = shutil.Error([("/tmp/a", "/data/artifacts/a", "[Errno 28] No space left on device")])
    assert fault_message(gathered) == "cannot write /data/artifacts/a: No space left on device"
    assert fault_message(ValueError("a bug")) is None
    assert fault_message(FileNotFoundError(errno.ENOENT, "No such file", "x")) is None
    assert not tracking.is_transient(full)  # a full disk is not retried


def _mount(disk: Path, options: str) -> None:
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)], capture_output=True)
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
    (tmp_path / "mlflow.yaml").write_text(f"server:\n  tracking_uri: sqlite:///{db}\n  artifact_location: {read_only_disk}\n")
    proc = subprocess.run(RUN, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert _last_line(proc.stderr) == (f"error: artifact location {read_only_disk.as_uri()} is not writable: "
                                       "Read-only file system")
    client = MlflowClient(f"sqlite:///{db}")
    assert client.search_runs([client.get_experiment_by_name("distill").experiment_id]) == []


def test_disk_full_mid_run_is_one_line_and_registers_nothing(tiny_disk, tmp_path):
    db = tmp_path / "mlflow.db"
    (tmp_path / "mlflow.yaml").write_text(
        f"server:\n  tracking_uri: sqlite:///{db}\n  artifact_location: {tiny_disk}/artifacts\n")
    proc = subprocess.run(RUN + ["--set", "register.model_name=never"], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert _last_line(proc.stderr).startswith(f"error: cannot write {tiny_disk}/artifacts/"), proc.stderr
    assert _last_line(proc.stderr).endswith(": No space left on device")
    assert "Traceback" not in proc.stderr
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("distill").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.status for p in parents] == ["FAILED"]  # it got as far as a parent run, and closed it
    assert all(r.info.status == "FAILED" for r in runs if r.info.status != "FINISHED")
    assert client.search_registered_models() == []


def _start_server(tmp_path: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                             "--artifacts-destination", str(tmp_path / "server-artifacts")],
                            cwd=tmp_path, env=_env(tmp_path, MLFLOW_DISABLE_TELEMETRY="true"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
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
    runs = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'RUNNING'")
    return next((r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags), None)


@pytest.mark.slow
def test_tracking_server_lost_mid_run(prefect_server, tmp_path, monkeypatch):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(tmp_path, port)
    # fewer, shorter HTTP retries than the CLI's default (3, backoff 2): the same path, sooner
    env = _env(tmp_path, MLFLOW_TRACKING_URI=uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
               MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    run = subprocess.Popen(RUN + ["--set", "register.model_name=never"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = MlflowClient(uri)
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
    assert _last_line(stderr).startswith(f"error: the MLflow tracking server stopped answering ({uri}/"), stderr
    assert "Traceback" not in stderr

    server = _start_server(tmp_path, port)  # back, same store
    try:
        assert client.get_run(parent).info.status == "RUNNING"  # nobody could close it meanwhile
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        import mlflow

        mlflow.set_tracking_uri(uri)
        experiment_id = client.get_experiment_by_name("distill").experiment_id
        assert tracking.close_dead_runs(experiment_id) == [parent]  # what the next `distill run` does first
        assert client.get_run(parent).info.status == "FAILED"
        assert client.search_registered_models() == []
    finally:
        _stop(server)


def test_ctrl_c_mid_run_ends_the_run_killed_and_registers_nothing(tmp_path):
    db = tmp_path / "mlflow.db"
    env = _env(tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{db}")
    # SIGINT as a terminal delivers it: not ignored, even where the suite runs in the background
    run = subprocess.Popen(RUN + ["--set", "register.model_name=never"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    client = MlflowClient(f"sqlite:///{db}")
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
    assert run.returncode == 130, stderr  # 128 + SIGINT, not killed by it (flows.cli.Interrupted)
    assert client.get_run(parent).info.status == "KILLED"
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert all(c.info.status in ("FINISHED", "KILLED") for c in children)
    assert client.search_registered_models() == []
