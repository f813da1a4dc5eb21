"""Faults of the disk and the store, as a user meets them through `distill run`: one line
`error: ...`, exit code 3 (2 when refused before any run), no traceback, the parent run FAILED
and nothing registered; a store that cannot be written is left as it was."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from distill.tasks.platform import retry
from distill.tasks.platform.errors import fault_message
from tests.platform.faults import RUN, fault_env, fill, last_line, mount


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
    assert not retry.is_transient(full)  # a full disk is not retried


@pytest.mark.slow
def test_read_only_artifact_location_is_refused_before_any_run(read_only_disk, tmp_path):
    """Root may write anywhere it has permission bits for; a read-only filesystem stops it too."""
    db = tmp_path / "mlflow.db"
    (tmp_path / "mlflow.yaml").write_text(
        f"server:\n  tracking_uri: sqlite:///{db}\n  artifact_location: {read_only_disk}\n"
    )
    proc = subprocess.run(
        RUN, cwd=tmp_path, env=fault_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    assert last_line(proc.stderr) == (
        f"error: artifact location {read_only_disk.as_uri()} is not writable: Read-only file system"
    )
    client = MlflowClient(f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    assert client.search_runs([client.get_experiment_by_name("distill").experiment_id]) == []


@pytest.mark.slow
def test_disk_full_mid_run_is_one_line_and_registers_nothing(tiny_disk, tmp_path):
    db = tmp_path / "mlflow.db"
    (tmp_path / "mlflow.yaml").write_text(
        f"server:\n  tracking_uri: sqlite:///{db}\n  artifact_location: {tiny_disk}/artifacts\n"
    )
    proc = subprocess.run(
        [*RUN, "--set", "register.model_name=never"],
        cwd=tmp_path,
        env=fault_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr
    assert last_line(proc.stderr).startswith(f"error: cannot write {tiny_disk}/artifacts/"), (
        proc.stderr
    )
    assert last_line(proc.stderr).endswith(": No space left on device")
    assert "Traceback" not in proc.stderr
    client = MlflowClient(f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("distill").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.status for p in parents] == [
        "FAILED"
    ]  # it got as far as a parent run, and closed it
    assert all(r.info.status == "FAILED" for r in runs if r.info.status != "FINISHED")
    assert client.search_registered_models() == []


# --- issue 18: the store and PREFECT_HOME -------------------------------------------------------


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
        env=fault_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_full_store_is_one_line_and_leaves_it_as_it_was(tmp_path):
    disk = tmp_path / "disk"
    mount(disk, "size=4m")  # room for the store, then filled
    try:
        db = disk / "mlflow.db"
        shutil.copy(_store(tmp_path), db)
        fill(disk)
        _refused_and_unchanged(db, tmp_path, "database or disk is full")
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _refused_and_unchanged(db: Path, tmp_path: Path, reason: str) -> None:
    """A run on store `db` fails with exit 3 and one last line naming the store and `reason`,
    and leaves the file as it was."""
    before = db.read_bytes()
    proc = _run_on(db, tmp_path)
    assert proc.returncode == 3, proc.stderr
    # the per-stage lines of the stages before it, then one line
    assert last_line(proc.stderr) == f"error: cannot write the tracking store {db}: {reason}"
    assert "Traceback" not in proc.stderr
    assert db.read_bytes() == before


@pytest.mark.slow
def test_read_only_store_is_one_line_and_leaves_it_as_it_was(tmp_path):
    db = _store(tmp_path)
    if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode != 0:
        pytest.skip("needs chattr +i (root, ext4)")
    try:
        _refused_and_unchanged(db, tmp_path, "attempt to write a readonly database")
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=False)


@pytest.mark.slow
def test_corrupt_store_is_one_line_for_run_and_compare(tmp_path):
    db = tmp_path / "store.db"
    db.write_bytes(b"not a database " * 100)
    for args in (RUN, [sys.executable, "-m", "distill.flows.cli", "compare"]):
        proc = _run_on(db, tmp_path, *args)
        assert proc.returncode == 3, proc.stderr
        assert (
            last_line(proc.stderr)
            == f"error: cannot read the tracking store {db}: file is not a database"
        )
        assert "Traceback" not in proc.stderr
    assert db.read_bytes() == b"not a database " * 100


def test_prefect_home_on_a_full_disk_fails_at_once(tiny_disk, tmp_path):
    fill(tiny_disk)
    started = time.monotonic()
    proc = subprocess.run(
        RUN,
        cwd=tmp_path,
        env=fault_env(
            tmp_path,
            temporary_server=True,
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
