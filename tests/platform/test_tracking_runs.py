"""MLflow records under concurrency and after a kill: pipelines in threads of one process keep
their runs apart, a retried stage record replaces the failed one, and parent runs whose
process was killed are closed FAILED by the next run."""

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from tasks.compress.teacher import build_mlp
from tasks.platform import tracking
from tests.conftest import ROOT


def _children(client, parent_id):
    experiment_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )


def test_pipelines_in_threads_keep_their_runs_apart(mlflow_store):
    experiment_id = tracking.configure(tracking.load_settings())
    frame = pd.DataFrame({"x": np.arange(6.0), "label": [0, 1] * 3})
    barrier, results, errors = threading.Barrier(4), {}, []
    example = np.zeros((2, 4), dtype=np.float32)

    def pipeline(i: int) -> None:
        try:
            barrier.wait()
            with tracking.parent_run(
                experiment_id, f"variant-{i}", {"variant": i}, {"distill.sweep_id": "s"}
            ) as run_id:
                tracking.log_run_inputs(
                    f"variant: {i}\n", None, frame, "sklearn:digits", "toy", f"digest{i}"
                )
                recorded = {}
                for stage in ("teacher", "finetuned"):
                    recorded |= tracking.record_stage(
                        run_id,
                        stage,
                        {"accuracy": i / 10},
                        {"variant": i},
                        model=build_mlp(4, [3], 2),
                        example=example,
                    )
                tracking.log_metrics(run_id, recorded)  # as the flow does, at the end
                results[i] = run_id
        except Exception as exc:  # noqa: BLE001 -- whatever a thread raised is surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=pipeline, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    client = MlflowClient()
    assert len(set(results.values())) == 4
    for i, run_id in results.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params["variant"] == str(i)
        assert run.data.metrics == {"teacher/accuracy": i / 10, "finetuned/accuracy": i / 10}
        assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [f"digest{i}"]
        config = client.download_artifacts(run_id, "config/resolved.yaml")
        assert Path(config).read_text() == f"variant: {i}\n"
        children = _children(client, run_id)
        assert sorted(c.info.run_name for c in children) == ["finetuned", "teacher"]
        for child in children:
            assert child.data.params == {"variant": str(i)} and child.info.status == "FINISHED"
            models = client.search_logged_models(
                [experiment_id], filter_string=f"source_run_id = '{child.info.run_id}'"
            )
            assert len(models) == 1
            assert models[0].params == {"variant": str(i)}  # the stage's params, on its model too
            assert [m.key for m in models[0].metrics] == ["accuracy"]  # linked, plain key


def test_a_retried_stage_record_replaces_the_failed_attempt(mlflow_store):
    experiment_id = tracking.configure(tracking.load_settings())
    client = MlflowClient()
    with tracking.parent_run(experiment_id, "retry", {}, {}) as run_id:
        with pytest.raises(TypeError):  # the first attempt dies inside its nested run
            tracking.record_stage(
                run_id, "finetuned", {"accuracy": 0.5}, model=object(), example=None
            )
        assert [c.info.status for c in _children(client, run_id)] == ["FAILED"]
        tracking.record_stage(run_id, "finetuned", {"accuracy": 0.5}, replace=True)
    children = _children(client, run_id)
    assert [(c.info.run_name, c.info.status) for c in children] == [("finetuned", "FINISHED")]


def test_transient_tracking_errors_are_retried_and_bugs_are_not():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    assert tracking.is_transient(
        MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE)
    )
    assert tracking.is_transient(ConnectionError("refused"))
    assert not tracking.is_transient(
        MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST)
    )
    assert not tracking.is_transient(MlflowException("a bug"))
    assert not tracking.is_transient(ValueError("a bug"))


KILLED_RUN = """
import os, signal, sys
from tasks.platform import tracking
experiment_id = tracking.configure(tracking.load_settings())
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

    experiment_id = tracking.configure(tracking.load_settings())
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
        assert sorted(tracking.close_dead_runs(experiment_id)) == sorted([killed, gone])
        assert client.get_run(alive).info.status == "RUNNING"  # this process is alive
        assert client.get_run(unknown).info.status == "RUNNING"  # nothing says it is dead
    killed_run = client.get_run(killed)
    assert (
        killed_run.info.status == "FAILED"
        and "ended without closing" in killed_run.data.tags["distill.end_reason"]
    )
    assert [c.info.status for c in _children(client, killed)] == ["FAILED"]
    assert tracking.close_dead_runs(experiment_id) == []


def test_prefect_retries_a_task_on_tracking_errors_only(prefect_server):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
    from prefect import flow, task

    calls = {"locked": 0, "bug": 0}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=tracking.retry_on_tracking_error)
    def record(kind: str) -> str:
        calls[kind] += 1
        if calls[kind] == 1:
            raise (
                MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE)
                if kind == "locked"
                else ValueError("a bug")
            )
        return "recorded"

    @flow
    def both() -> tuple:
        return record("locked", return_state=True), record("bug", return_state=True)

    locked, bug = both()
    assert locked.is_completed() and calls["locked"] == 2
    assert bug.is_failed() and calls["bug"] == 1


TERMINATED_RUN = """
import time
from flows.process import exit_on_signals
from tasks.platform import tracking
exit_on_signals()
experiment_id = tracking.configure(tracking.load_settings())
with tracking.parent_run(experiment_id, "terminated", {}, tracking.process_tags()) as run_id:
    print(run_id, flush=True)
    time.sleep(120)
"""


def test_a_terminated_cli_run_closes_its_run_failed(mlflow_store):
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", TERMINATED_RUN], env=env, stdout=subprocess.PIPE, text=True
    )
    run_id = proc.stdout.readline().strip()
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert MlflowClient().get_run(run_id).info.status == "FAILED"


FIRST_TOUCH = """
import sys, time
from tasks.platform import tracking
import mlflow  # imported before the start line, so the processes reach the store together
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
print(tracking.configure(tracking.load_settings()))
"""


def test_processes_starting_together_share_a_fresh_store(tmp_path):
    env = os.environ | {
        "PYTHONPATH": str(ROOT),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "DISTILL_MLFLOW_CONFIG": str(tmp_path / "absent.yaml"),
    }
    start = str(time.time() + 8)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FIRST_TOUCH, start],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-500:] for _, err in outputs]
    assert len({out.strip() for out, _ in outputs}) == 1  # one experiment, created once


def test_metric_and_param_batches_respect_mlflow_limits(mlflow_store):
    """MLflow takes at most 100 params and 1,000 entries per batch: larger records still land whole."""
    experiment_id = tracking.configure(tracking.load_settings())
    client = MlflowClient()
    run_id = client.create_run(experiment_id).info.run_id
    tracking.log_metrics(
        run_id, {f"m{i}": float(i) for i in range(2500)}, params={f"p{i}": i for i in range(250)}
    )
    data = client.get_run(run_id).data
    assert len(data.params) == 250 and data.params["p249"] == "249"
    assert len(data.metrics) == 2500 and data.metrics["m2499"] == 2499.0
