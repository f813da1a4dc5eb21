"""`distill ui`: an MLflow server for the configured store, on 127.0.0.1, until Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import urllib.parse
import urllib.request

import mlflow
import pytest
from mlflow import MlflowClient

from distill.tasks.platform.errors import UserError
from distill.tasks.platform.servers import free_port
from distill.tasks.platform.store import (
    MlflowSettings,
    ServerSettings,
    UiSettings,
    load_settings,
    run_url,
    running_ui,
    ui_server_command,
)
from tests.conftest import ROOT


def test_server_command_uses_the_configured_store_and_ui(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    settings = MlflowSettings(
        server=ServerSettings(tracking_uri="sqlite:///db/m.db", artifact_location="arts"),
        ui=UiSettings(host="127.0.0.1", port=5123),
    )
    cmd = ui_server_command(settings)
    assert cmd[1:4] == ["-m", "mlflow", "server"]
    opts = dict(zip(cmd[4::2], cmd[5::2], strict=False))
    assert opts["--host"] == "127.0.0.1" and opts["--port"] == "5123"
    assert opts["--backend-store-uri"] == "sqlite:///db/m.db"
    assert opts["--artifacts-destination"].startswith("file://") and opts[
        "--artifacts-destination"
    ].endswith("/arts")
    assert "--registry-store-uri" not in opts
    other = ui_server_command(settings, 6000)
    assert other[other.index("--port") + 1] == "6000"
    assert run_url(settings, "3", "abc") == "http://127.0.0.1:5123/#/experiments/3/runs/abc"
    remote = MlflowSettings(server=ServerSettings(tracking_uri="http://mlflow.example:8080/"))
    assert run_url(remote, "3", "abc") == "http://mlflow.example:8080/#/experiments/3/runs/abc"
    with pytest.raises(UserError, match="already a server"):
        ui_server_command(remote)


def test_ui_serves_the_runs_and_their_artifacts_and_stops_on_ctrl_c(mlflow_store, tmp_path):
    experiment_id = mlflow.create_experiment(
        "distill", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_metric("final/accuracy", 0.97)
        mlflow.log_text("a plot", "plots/note.txt")
    port = free_port()
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "distill.flows.cli", "ui", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # printed once the server answers
        assert line.startswith(f"MLflow UI: http://127.0.0.1:{port}"), line
        base = f"http://127.0.0.1:{port}"
        request = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/get?run_id={run.info.run_id}")
        with urllib.request.urlopen(request, timeout=30) as response:
            metrics = json.load(response)["run"]["data"]["metrics"]
        assert {"key": "final/accuracy", "value": 0.97} in [
            {k: m[k] for k in ("key", "value")} for m in metrics
        ]
        query = urllib.parse.urlencode({"path": "plots/note.txt", "run_uuid": run.info.run_id})
        with urllib.request.urlopen(f"{base}/get-artifact?{query}", timeout=30) as response:
            assert response.read() == b"a plot"  # the run's own file:// artifacts are served
        # `distill run` links to the port this UI serves, not mlflow.yaml's 5000
        settings = load_settings()
        assert running_ui(settings) == base
        assert run_url(settings, "1", "abc") == f"{base}/#/experiments/1/runs/abc"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    assert running_ui(load_settings()) is None  # stopped: back to mlflow.yaml's address
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
    assert MlflowClient().get_run(run.info.run_id).info.status == "FINISHED"


def test_ui_against_a_tracking_server_is_one_line(tmp_path):
    env = os.environ | {"PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": "http://127.0.0.1:1"}
    proc = subprocess.run(
        [sys.executable, "-m", "distill.flows.cli", "ui"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith(
        "error: tracking is already a server"
    )


def test_ui_refuses_a_port_another_server_holds(tmp_path):
    """It used to print the URL of whatever answered /health there, and exit 0."""
    import socket

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        env = os.environ | {
            "PYTHONPATH": str(ROOT),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db",
        }
        proc = subprocess.run(
            [sys.executable, "-m", "distill.flows.cli", "ui", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: 127.0.0.1:{port} is already in use (Address already in use): choose another port with --port"
    ]
    assert proc.stdout == ""
