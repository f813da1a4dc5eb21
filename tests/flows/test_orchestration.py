"""Orchestration end to end, against a real `prefect server` on 127.0.0.1 (slow: minutes).

- `distill deploy` puts the cron schedules on the server; a triggered run of the pipeline
  deployment is executed by `prefect worker start --run-once` and lands in MLflow.
- A run killed (SIGKILL) the moment fine-tuning starts: the re-run with the same config
  finds teacher, reduce and reconstruct in state Cached, and closes the killed MLflow run FAILED.
- A sweep of 4 variants on a LocalCluster of 2 Dask worker processes: 4 parent runs and a
  Pareto summary run.

Every process gets its own PREFECT_HOME (result storage) and MLflow store under tmp_path.
"""

import json
import os
import signal
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from distill.flows.deployments import PREFECT_FILE
from distill.tasks.platform.servers import prefect_server
from distill.tasks.release.pareto import pareto_mask
from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.slow

CONFIG = str(ROOT / "configs" / "digits.yaml")
SETS = [a for s in TINY for a in ("--set", s)]
DISTILL = [sys.executable, "-m", "distill.flows.cli"]


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A real Prefect server for this module (tasks/platform/servers.py)."""
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as url:
        yield url


def _env(api: str, tmp_path: Path) -> dict[str, str]:
    return os.environ | {
        "PYTHONPATH": str(ROOT),
        "PREFECT_API_URL": api,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_LOGGING_TO_API_ENABLED": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "DISTILL_MLFLOW_CONFIG": str(tmp_path / "absent-mlflow.yaml"),
    }


def _client(api: str):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api)


def _task_runs(api: str, flow_run_id: str) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with _client(api) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            limit=200,
        )


def _task_states(api: str, flow_run_id: str) -> dict[str, list[str]]:
    runs = _task_runs(api, flow_run_id)
    states: dict[str, list[str]] = {}
    for run in runs:
        states.setdefault(run.name.rsplit("-", 1)[0], []).append(
            run.state.name
        )  # "teacher-a1f" -> "teacher"
    return states


def test_deploy_schedules_and_a_worker_runs_the_pipeline(prefect_api, tmp_path):
    env = _env(prefect_api, tmp_path)
    proc = subprocess.run(
        [*DISTILL, "deploy"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = yaml.safe_load((ROOT / PREFECT_FILE).read_text())

    with _client(prefect_api) as client:
        on_server = {d.name: d for d in client.read_deployments()}
        for d in spec["deployments"]:
            deployed = on_server[d["name"]]
            assert f"deployed {client.read_flow(deployed.flow_id).name}/{d['name']}" in proc.stdout
            assert [
                (s.schedule.cron, s.schedule.timezone, s.active) for s in deployed.schedules
            ] == [(s["cron"], s["timezone"], True) for s in d.get("schedules", [])]
            assert (
                deployed.work_pool_name == d["work_pool"]["name"]
                and deployed.parameters == d["parameters"]
            )
        assert client.read_work_pool(spec["deployments"][0]["work_pool"]["name"]).type == "process"
        nightly = client.read_deployment_by_name("distill/nightly")
        flow_run = client.create_flow_run_from_deployment(
            nightly.id, parameters={"config_path": "configs/digits.yaml", "overrides": TINY}
        )

    worker = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefect",
            "worker",
            "start",
            "--pool",
            nightly.work_pool_name,
            "--run-once",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert worker.returncode == 0, (worker.stdout + worker.stderr)[-3000:]
    with _client(prefect_api) as client:
        assert client.read_flow_run(flow_run.id).state.is_completed()

    mlflow = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = mlflow.search_runs(
        [mlflow.get_experiment_by_name("distill").experiment_id],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run.id}'",
    )
    assert run.info.status == "FINISHED" and run.data.params["teacher.hidden"] == "[64, 64]"
    assert "final/accuracy" in run.data.metrics

    # the completed nightly run triggers the promotion deployment (its run waits for a worker)
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with _client(prefect_api) as client:
        promote = client.read_deployment_by_name("promote/after-nightly")
        deadline, triggered = time.monotonic() + 60, []
        while not triggered and time.monotonic() < deadline:
            time.sleep(1)
            triggered = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[promote.id])),
                limit=5,
            )
        assert len(triggered) == 1 and triggered[0].parameters == {"model_name": "distill-digits"}


KILLED_IN_FINETUNE = """
import os, signal, sys
import distill.tasks.compress.finetune

def killed(*args, **kwargs):  # the process dies the moment fine-tuning starts, like a kill -9
    os.kill(os.getpid(), signal.SIGKILL)

distill.tasks.compress.finetune.distill = killed
from distill.flows.distill import distill_flow
distill_flow(sys.argv[1], sys.argv[2:])
"""


def test_a_killed_run_resumes_from_the_cache(prefect_api, tmp_path):
    env = _env(prefect_api, tmp_path)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_IN_FINETUNE, CONFIG, *TINY],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    mlflow = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment_id = mlflow.get_experiment_by_name("distill").experiment_id
    (dead,) = mlflow.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'")
    dead_flow_run = dead.data.tags["prefect.flow_run_id"]
    recorded = mlflow.search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{dead.info.run_id}'"
    )
    assert sorted(r.info.run_name for r in recorded) == [
        "reconstructed",
        "reduce",
        "teacher",
    ]  # died in fine-tuning

    rerun = subprocess.run(
        [*DISTILL, "run", CONFIG, *SETS, "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    run_id = json.loads(rerun.stdout)["run_id"]
    flow_run_id = mlflow.get_run(run_id).data.tags["prefect.flow_run_id"]
    states = _task_states(prefect_api, flow_run_id)
    # finished before the kill: read back from the persisted results, not recomputed
    assert states["teacher"] == states["reduce"] == states["reconstruct"] == ["Cached"]
    assert states["finetune"] == states["prune"] == states["quantize"] == ["Completed"]
    assert set(states["evaluate"]) == {"Completed"}  # records are never cached
    # the flow run carries the tags, its task runs none: Prefect asks the server for a
    # concurrency slot for each tag of a task run (flows/distill.py, untagged_task_runs)
    with _client(prefect_api) as client:
        flow_tags = set(client.read_flow_run(flow_run_id).tags)
    assert {"distill", "run", "config:digits"} <= flow_tags, flow_tags
    assert [t.tags for t in _task_runs(prefect_api, flow_run_id) if t.tags] == []

    dead = mlflow.get_run(dead.info.run_id)
    assert (
        dead.info.status == "FAILED"
        and "ended without closing" in dead.data.tags["distill.end_reason"]
    )
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    with _client(prefect_api) as client:
        assert client.read_flow_run(dead_flow_run).state.is_crashed()


def test_a_dask_sweep_of_four_variants(prefect_api, tmp_path):
    env = _env(prefect_api, tmp_path)
    grid = {"reduce.budget.size_kb": ["8", "16"], "finetune.temperature": ["2", "4"]}
    args = [a for k, v in grid.items() for a in ("--grid", f"{k}={','.join(v)}")]
    proc = subprocess.run(
        [
            *DISTILL,
            "sweep",
            CONFIG,
            *args,
            *SETS,
            "--set",
            "register.enabled=false",
            "--dask",
            "--workers",
            "2",
            "--json",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)

    mlflow = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(
        [mlflow.get_experiment_by_name("distill").experiment_id],
        filter_string=f"tags.`distill.sweep_id` = '{out['sweep_id']}'",
    )
    variants = [r for r in runs if "distill.sweep_summary" not in r.data.tags]
    (summary,) = [r for r in runs if r.data.tags.get("distill.sweep_summary") == "true"]
    assert len(variants) == 4 and {r.info.status for r in variants} == {"FINISHED"}
    assert {
        (r.data.params["reduce.budget.size_kb"], r.data.params["finetune.temperature"])
        for r in variants
    } == {(f"{float(s)}", f"{float(t)}") for s, t in product(*grid.values())}
    # the variants ran in the cluster's two worker processes, not in the sweep's own process
    worker_pids = {r.data.tags["distill.pid"] for r in variants}
    assert len(worker_pids) == 2 and summary.data.tags["distill.pid"] not in worker_pids

    table = out["variants"]
    assert summary.info.run_id == out["summary_run_id"] and summary.info.status == "FINISHED"
    assert {row["run_id"] for row in table} == {r.info.run_id for r in variants}
    # the front of what MLflow recorded for each variant, not of the table's own columns
    recorded = {r.info.run_id: r.data.metrics for r in variants}
    sizes = [recorded[row["run_id"]]["final/size_kb"] for row in table]
    accuracies = [recorded[row["run_id"]]["final/accuracy"] for row in table]
    assert [row["size_kb"] for row in table] == pytest.approx(sizes)
    assert [row["accuracy"] for row in table] == pytest.approx(accuracies)
    assert [row["pareto"] for row in table] == pareto_mask(sizes, accuracies)
    assert summary.data.metrics["sweep/pareto"] == sum(row["pareto"] for row in table)
    assert {a.path for a in mlflow.list_artifacts(summary.info.run_id, "sweep")} == {
        "sweep/pareto.md",
        "sweep/pareto.png",
        "sweep/variants.csv",
    }
