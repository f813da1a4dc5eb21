"""Parent runs whose process was killed are closed FAILED by the next run."""

import os
import signal
import subprocess
import sys
import uuid

from mlflow import MlflowClient

from distill.tasks.platform import dead_runs, store, tracking
from tests.conftest import ROOT, child_runs

KILLED_RUN = """
import os, signal, sys
from distill.tasks.platform import dead_runs, store, tracking
experiment_id = store.configure(store.load_settings())
with tracking.parent_run(experiment_id, "killed", {}, tracking.process_tags()) as run_id:
    with tracking.stage_run(run_id, "finetuned"):
        print(run_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_runs_of_killed_processes_are_closed_failed(mlflow_store, prefect_server):
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_RUN], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL
    killed = proc.stdout.split()[0]
    client = MlflowClient()
    assert client.get_run(killed).info.status == "RUNNING"  # nobody closed it

    experiment_id = store.configure(store.load_settings())
    elsewhere = {"distill.host": "another-host", "distill.pid": "1"}
    gone = client.create_run(
        experiment_id,
        run_name="remote",
        tags=elsewhere | {"prefect.flow_run_id": str(uuid.uuid4())},
    ).info.run_id
    unknown = client.create_run(
        experiment_id, run_name="remote-unknown", tags=elsewhere
    ).info.run_id
    with tracking.parent_run(experiment_id, "alive", {}, tracking.process_tags()) as alive:
        # on another host, a flow run id Prefect does not know means the run is over
        assert sorted(dead_runs.close_dead_runs(experiment_id)) == sorted([killed, gone])
        assert client.get_run(alive).info.status == "RUNNING"  # this process is alive
        assert client.get_run(unknown).info.status == "RUNNING"  # nothing says it is dead
    killed_run = client.get_run(killed)
    assert (
        killed_run.info.status == "FAILED"
        and "ended without closing" in killed_run.data.tags["distill.end_reason"]
    )
    assert [c.info.status for c in child_runs(client, killed)] == ["FAILED"]
    assert dead_runs.close_dead_runs(experiment_id) == []
