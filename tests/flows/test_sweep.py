"""Sweep pieces (grid, variants, Pareto front, summary) and the deployment file, without servers;
then a small sweep in threads of one process."""

import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from distill.flows.deployments import PREFECT_FILE, read_spec, runner_deployments
from distill.flows.sweep import check_variants, parse_grid, split_values, sweep_flow, variants
from distill.tasks.platform.errors import UserError
from distill.tasks.release.pareto import best_variant, markdown_table, pareto_mask, summary_frame
from tests.conftest import ROOT, TINY

CONFIG = str(ROOT / "configs" / "digits.yaml")


def test_grid_values_split_on_top_level_commas_only():
    assert split_values("8,16") == ["8", "16"]
    assert split_values("[64, 64],[32]") == ["[64, 64]", "[32]"]
    grid = parse_grid(["reduce.budget.size_kb=8,16", "teacher.hidden=[64, 64],[32]"])
    assert grid == {"reduce.budget.size_kb": ["8", "16"], "teacher.hidden": ["[64, 64]", "[32]"]}
    assert variants(grid) == [
        ["reduce.budget.size_kb=8", "teacher.hidden=[64, 64]"],
        ["reduce.budget.size_kb=8", "teacher.hidden=[32]"],
        ["reduce.budget.size_kb=16", "teacher.hidden=[64, 64]"],
        ["reduce.budget.size_kb=16", "teacher.hidden=[32]"],
    ]


@pytest.mark.parametrize(
    "pairs, message",
    [
        (["finetune.temperature"], "--grid expects key=v1,v2,..., got 'finetune.temperature'"),
        (
            ["finetune.temperature=2,"],
            "--grid expects key=v1,v2,..., got 'finetune.temperature=2,'",
        ),
        (["a=1", "a=2"], "--grid a: given twice"),
        (
            ["reduce.budget.size_kb=8,16", "reduce.budget.ratio=10,20"],
            "--grid: reduce.budget.size_kb and reduce.budget.ratio are both budgets; a variant has one",
        ),
    ],
)
def test_bad_grids_are_one_line(pairs, message):
    with pytest.raises(UserError) as err:
        parse_grid(pairs)
    assert str(err.value) == message


def test_every_variant_is_checked_before_anything_runs():
    with pytest.raises(
        UserError, match=r"sweep variant finetune.temperature=-1: config key 'finetune.temperature'"
    ):
        check_variants(CONFIG, [], {"finetune.temperature": ["2", "-1"]})
    with pytest.raises(UserError, match="unknown key"):
        check_variants(CONFIG, [], {"finetune.temprature": ["2"]})


def test_pareto_front_keeps_the_undominated_variants():
    sizes = [10.0, 12.0, 12.0, 20.0, 9.0]
    accuracies = [0.90, 0.95, 0.93, 0.95, 0.80]
    assert pareto_mask(sizes, accuracies) == [True, True, False, False, True]
    assert pareto_mask([5.0, 5.0], [0.9, 0.9]) == [True, True]  # ties dominate nobody


def test_summary_table_lists_failed_variants_without_a_front_position():
    def ok(i, size, acc):
        return {
            "index": i,
            "overrides": [f"k={i}"],
            "run_id": f"r{i}",
            "metrics": {
                "final/accuracy": acc,
                "final/size_kb": size,
                "compression_ratio": 100 / size,
                "accuracy_drop": 0.97 - acc,
            },
        }

    results = [
        ok(0, 20.0, 0.96),
        {
            "index": 1,
            "overrides": ["k=1"],
            "run_id": None,
            "metrics": None,
            "error": "UserError: impossible budget",
        },
        ok(2, 10.0, 0.95),
        ok(3, 15.0, 0.94),
    ]
    frame = summary_frame(results)
    assert list(frame["variant"]) == [2, 3, 0, 1]  # smallest first, failed last
    assert list(frame["pareto"]) == [True, False, True, False]
    assert (
        frame.loc[frame["variant"] == 1, "status"].item() == "failed: UserError: impossible budget"
    )
    table = markdown_table(frame)
    assert (
        table.count("**yes**") == 2
        and "| 1 | k=1 | failed: UserError: impossible budget |" in table
    )


def test_served_deployments_match_the_deployment_file():
    spec = read_spec(ROOT / PREFECT_FILE)
    served = {d.name: d for d in runner_deployments(ROOT / PREFECT_FILE)}
    assert set(served) == {d["name"] for d in spec["deployments"]}
    for d in spec["deployments"]:
        runner = served[d["name"]]
        assert [(s.schedule.cron, s.schedule.timezone) for s in runner.schedules] == [
            (s["cron"], s["timezone"]) for s in d.get("schedules", [])
        ]
        assert [(t.expect, t.match_related.root) for t in runner.triggers] == [
            (set(t["expect"]), t["match_related"]) for t in d.get("triggers", [])
        ]
        assert runner.parameters == d["parameters"]
        assert runner.entrypoint.endswith(d["entrypoint"].split(":")[1])
    # every deployment's parameters are a valid call of its flow
    for d in spec["deployments"]:
        if "grid" in d["parameters"]:
            params = d["parameters"]
            check_variants(
                str(ROOT / params["config_path"]), params.get("overrides", []), params["grid"]
            )


def test_a_bad_deployment_file_is_one_line(tmp_path):
    bad = tmp_path / "prefect.yaml"
    bad.write_text(yaml.safe_dump({"deployments": [{"name": "nightly"}]}))
    with pytest.raises(UserError, match=r"deployments\[0\] has no 'entrypoint'"):
        read_spec(bad)
    with pytest.raises(UserError, match="deployment file not found"):
        read_spec(tmp_path / "absent.yaml")


@pytest.mark.slow
def test_deploy_and_dask_need_a_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PYTHONPATH": str(ROOT)
    }
    proc = subprocess.run(
        [sys.executable, "-m", "distill.flows.cli", "deploy"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith(
        "error: no Prefect server: set PREFECT_API_URL"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill.flows.cli",
            "sweep",
            CONFIG,
            "--grid",
            "finetune.temperature=2,4",
            "--dask",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "a Dask sweep needs a Prefect server" in proc.stderr
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill.flows.cli",
            "sweep",
            CONFIG,
            "--grid",
            "finetune.temperature",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --grid expects key=v1,v2,..., got 'finetune.temperature'"
    assert not (tmp_path / "mlruns").exists()


def test_the_best_variant_is_the_smallest_within_the_gate():
    frame = summary_frame(
        [
            {"index": i, "overrides": [f"k={i}"], "run_id": f"r{i}", "metrics": m}
            for i, m in enumerate(
                [
                    {"final/accuracy": 0.97, "final/size_kb": 40.0, "accuracy_drop": 0.0},
                    {"final/accuracy": 0.965, "final/size_kb": 20.0, "accuracy_drop": 0.005},
                    {"final/accuracy": 0.90, "final/size_kb": 10.0, "accuracy_drop": 0.07},
                ]
            )
        ]
    )
    assert best_variant(frame, 0.01) == 1  # the smallest that keeps the accuracy
    assert best_variant(frame, 0.001) == 0  # none smaller within it
    assert best_variant(frame, None) == 0  # no gate: the most accurate
    assert best_variant(frame.assign(status="failed: x"), 0.01) is None


def test_sweep_in_threads_records_each_variant_apart(prefect_server, mlflow_store):
    grid = {"finetune.temperature": ["2", "4"], "finetune.alpha": ["0.5"]}
    summary = sweep_flow(CONFIG, grid, [*TINY, "register.model_name=swept"])
    runs = mlflow.search_runs(
        experiment_names=["distill"],
        filter_string=f"tags.`distill.sweep_id` = '{summary.sweep_id}'",
    )
    variants_ = runs[runs["tags.distill.sweep_summary"].isna()]
    assert sorted(variants_["params.finetune.temperature"]) == ["2.0", "4.0"]
    assert set(variants_["status"]) == {"FINISHED"} and set(variants_["params.finetune.alpha"]) == {
        "0.5"
    }
    client = MlflowClient()
    for run_id in variants_["run_id"]:
        children = client.search_runs(
            [runs["experiment_id"][0]], f"tags.mlflow.parentRunId = '{run_id}'"
        )
        assert len(children) == 6  # five evaluated stages and reduce, each under its own parent
    (summary_run,) = runs[runs["tags.distill.sweep_summary"] == "true"]["run_id"]
    assert summary_run == summary.summary_run_id
    table = summary.table
    assert sorted(table["run_id"]) == sorted(variants_["run_id"])
    # the front of what MLflow recorded for each variant, not of the table's own columns
    recorded = variants_.set_index("run_id").loc[table["run_id"]]
    sizes = list(recorded["metrics.final/size_kb"])
    accuracies = list(recorded["metrics.final/accuracy"])
    assert np.allclose(table["size_kb"], sizes) and np.allclose(table["accuracy"], accuracies)
    assert list(table["pareto"]) == pareto_mask(sizes, accuracies)
    artifacts = {a.path for a in client.list_artifacts(summary_run, "sweep")}
    assert artifacts == {"sweep/pareto.md", "sweep/variants.csv", "sweep/pareto.png"}
    # the variants nest under the sweep's run and are named by their grid values
    assert set(variants_["tags.mlflow.parentRunId"]) == {summary_run}
    assert sorted(variants_["tags.mlflow.runName"]) == [
        "digits · finetune.temperature=2, finetune.alpha=0.5",
        "digits · finetune.temperature=4, finetune.alpha=0.5",
    ]
    assert runs.set_index("run_id").loc[summary_run, "tags.mlflow.runName"] == (
        "sweep · finetune.temperature=2,4; finetune.alpha=0.5"
    )
    # every variant registered a version; only the best one is challenger
    versions = client.search_model_versions("name = 'swept'")
    assert len(versions) == 2
    best = table.set_index("variant").loc[
        best_variant(table, 0.01), "run_id"
    ]  # digits.yaml promote gate
    challenger = client.get_model_version_by_alias("swept", "challenger")
    assert challenger.run_id == best and challenger.tags["distill.sweep_best"] == "true"
    assert summary.challenger.startswith(f"challenger: swept version {challenger.version}")
