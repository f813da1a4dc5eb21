"""MLflow run records: pipelines in threads of one process keep their runs apart, runs logging
one dataset at once each link it, a retried stage record replaces the failed one, a terminated
run is closed FAILED, and large batches land whole."""

import os
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from distill.tasks.compress.architectures import build_mlp
from distill.tasks.platform import store, tracking
from tests.conftest import ROOT, child_runs


def _at_once(work: Callable[[int, threading.Barrier], None], n: int = 4) -> None:
    """`work(i, barrier)` in `n` threads, each waiting at the barrier where the threads should
    meet; whatever a thread raised fails the test."""
    barrier, errors = threading.Barrier(n), []

    def run(i: int) -> None:
        try:
            work(i, barrier)
        except Exception as exc:  # noqa: BLE001 -- whatever a thread raised is surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_pipelines_in_threads_keep_their_runs_apart(mlflow_store):
    experiment_id = store.configure(store.load_settings())
    frame = pd.DataFrame({"x": np.arange(6.0), "label": [0, 1] * 3})
    results = {}
    example = np.zeros((2, 4), dtype=np.float32)

    def pipeline(i: int, barrier: threading.Barrier) -> None:
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

    _at_once(pipeline)
    client = MlflowClient()
    assert len(set(results.values())) == 4
    for i, run_id in results.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params["variant"] == str(i)
        assert run.data.metrics == {"teacher/accuracy": i / 10, "finetuned/accuracy": i / 10}
        assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [f"digest{i}"]
        config = client.download_artifacts(run_id, "config/resolved.yaml")
        assert Path(config).read_text() == f"variant: {i}\n"
        children = child_runs(client, run_id)
        assert sorted(c.info.run_name for c in children) == ["finetuned", "teacher"]
        for child in children:
            assert child.data.params == {"variant": str(i)} and child.info.status == "FINISHED"
            models = client.search_logged_models(
                [experiment_id], filter_string=f"source_run_id = '{child.info.run_id}'"
            )
            assert len(models) == 1
            assert models[0].params == {"variant": str(i)}  # the stage's params, on its model too
            assert [m.key for m in models[0].metrics] == ["accuracy"]  # linked, plain key


def test_runs_logging_one_dataset_at_once_each_link_it(mlflow_store, monkeypatch):
    """MLflow's SQL store checks for the dataset, then inserts it: two runs logging the same one
    at once fail one insert on the unique key (a sweep's variants in threads did, once in a
    `make test`). The insert that lost is tried again, and finds the row; another error is not."""
    import mlflow
    from mlflow.exceptions import MlflowException

    experiment_id = store.configure(store.load_settings())
    frame = pd.DataFrame({"x": np.arange(6.0), "label": [0, 1] * 3})
    real, calls = mlflow.log_input, []

    def lost_the_race(*args, **kwargs):  # as the store says it, the first time
        calls.append(1)
        if len(calls) == 1:
            raise MlflowException(
                "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                "datasets.name, datasets.digest"
            )
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_input", lost_the_race)
    with tracking.parent_run(experiment_id, "raced", {}, {}) as run_id:
        tracking.log_run_inputs("a: 1\n", None, frame, "sklearn:digits", "toy", "same")
    assert len(calls) == 2
    (logged,) = MlflowClient().get_run(run_id).inputs.dataset_inputs
    assert logged.dataset.digest == "same"

    def broken(*args, **kwargs):
        raise MlflowException("the store is read-only")

    monkeypatch.setattr(mlflow, "log_input", broken)
    with (
        pytest.raises(MlflowException, match="read-only"),
        tracking.parent_run(experiment_id, "broken", {}, {}),
    ):
        tracking.log_run_inputs("a: 1\n", None, frame, "sklearn:digits", "toy", "same")
    monkeypatch.setattr(mlflow, "log_input", real)

    # and for real: four runs in threads log one dataset at once; each links it
    runs = []

    def log_one(i: int, barrier: threading.Barrier) -> None:
        with tracking.parent_run(experiment_id, f"same-{i}", {}, {}) as run_id:
            barrier.wait()
            tracking.log_run_inputs("a: 1\n", None, frame, "sklearn:digits", "toy", "d9")
            runs.append(run_id)

    _at_once(log_one)
    for run_id in runs:
        (logged,) = MlflowClient().get_run(run_id).inputs.dataset_inputs
        assert logged.dataset.digest == "d9"


def test_a_file_dataset_is_logged_without_mlflows_ambiguous_source_warning(mlflow_store, tmp_path):
    """An npz / CSV source is a file URI, which MLflow 3 matches to two local sources of the
    same name and warns about on the user's terminal; the dataset still names the file."""
    experiment_id = store.configure(store.load_settings())
    path = tmp_path / "ids.npz"
    np.savez(path, X=np.zeros((2, 3)), y=np.zeros(2))
    frame = pd.DataFrame({"x": [1.0, 2.0], "label": [0, 1]})
    with (
        warnings.catch_warnings(record=True) as seen,
        tracking.parent_run(experiment_id, "npz", {}, {}) as run_id,
    ):
        warnings.simplefilter("always")
        tracking.log_run_inputs("a: 1\n", None, frame, f"npz:{path}", "ids", "d1")
    assert [str(w.message) for w in seen if "dataset source" in str(w.message)] == []
    (logged,) = MlflowClient().get_run(run_id).inputs.dataset_inputs
    assert path.name in logged.dataset.source


def test_a_retried_stage_record_replaces_the_failed_attempt(mlflow_store):
    experiment_id = store.configure(store.load_settings())
    client = MlflowClient()
    with tracking.parent_run(experiment_id, "retry", {}, {}) as run_id:
        with pytest.raises(TypeError):  # the first attempt dies inside its nested run
            tracking.record_stage(
                run_id, "finetuned", {"accuracy": 0.5}, model=object(), example=None
            )
        assert [c.info.status for c in child_runs(client, run_id)] == ["FAILED"]
        tracking.record_stage(run_id, "finetuned", {"accuracy": 0.5}, replace=True)
    children = child_runs(client, run_id)
    assert [(c.info.run_name, c.info.status) for c in children] == [("finetuned", "FINISHED")]


@pytest.mark.parametrize(
    "signal_error, status", [(KeyboardInterrupt, "KILLED"), (SystemExit, "FAILED")]
)
def test_a_signal_closes_the_stage_runs_it_caught_open(mlflow_store, signal_error, status):
    """A Ctrl-C (SIGTERM) that lands after a stage's nested run was created and before it was
    closed (CI saw one: RUNNING under a KILLED parent) leaves no run RUNNING; finished ones stay."""
    experiment_id = store.configure(store.load_settings())
    client = MlflowClient()
    with (
        pytest.raises(signal_error),
        tracking.parent_run(experiment_id, "signalled", {}, {}) as run_id,
    ):
        tracking.record_stage(run_id, "teacher", {"accuracy": 0.5})
        client.create_run(
            experiment_id, run_name="reduce", tags={"mlflow.parentRunId": run_id}
        )  # as if the signal hit `stage_run` right after `create_run`
        raise signal_error
    assert client.get_run(run_id).info.status == status
    children = {c.info.run_name: c.info.status for c in child_runs(client, run_id)}
    assert children == {"teacher": "FINISHED", "reduce": status}


TERMINATED_RUN = """
import time
from distill.flows.process import exit_on_signals
from distill.tasks.platform import dead_runs, store, tracking
exit_on_signals()
experiment_id = store.configure(store.load_settings())
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


def test_metric_and_param_batches_respect_mlflow_limits(mlflow_store):
    """MLflow takes at most 100 params and 1,000 entries per batch: larger records still land whole."""
    experiment_id = store.configure(store.load_settings())
    client = MlflowClient()
    run_id = client.create_run(experiment_id).info.run_id
    tracking.log_metrics(
        run_id, {f"m{i}": float(i) for i in range(2500)}, params={f"p{i}": i for i in range(250)}
    )
    data = client.get_run(run_id).data
    assert len(data.params) == 250 and data.params["p249"] == "249"
    assert len(data.metrics) == 2500 and data.metrics["m2499"] == 2499.0
