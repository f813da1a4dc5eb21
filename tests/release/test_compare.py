"""`distill compare`: parent runs side by side, parsed back from CSV and JSON."""

import io
import json

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from distill.flows.cli import app
from distill.tasks.release.compare import load_comparison

T0 = 1_700_000_000_000  # ms


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the read-only tests of this module (a fresh store costs seconds)."""
    tmp = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{tmp}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("DISTILL_MLFLOW_CONFIG", str(tmp / "absent-mlflow.yaml"))
        mlflow.set_tracking_uri(uri)
        yield uri


@pytest.fixture(scope="module")
def runs(store):
    """Three pipeline (parent) runs, each with a stage run, and a failed one without final metrics."""
    client = MlflowClient()
    experiment_id = mlflow.create_experiment("distill")
    ids = []
    for i, (size_kb, accuracy) in enumerate([(250.0, 0.97), (100.0, 0.95), (50.0, 0.90)]):
        run = client.create_run(experiment_id, start_time=T0 + i * 60_000, run_name=f"digits-{i}")
        rid = run.info.run_id
        for key, value in {
            "seed": 0,
            "reduce.budget.size_kb": size_kb,
            "finetune.epochs": 20,
        }.items():
            client.log_param(rid, key, value)
        for key, value in {
            "final/accuracy": accuracy,
            "final/size_kb": size_kb / 4,
            "compression_ratio": 1000 / size_kb,
            "accuracy_drop": 0.98 - accuracy,
            "speedup_b1": 2.0 + i,
            "teacher/accuracy": 0.98,
        }.items():
            client.log_metric(rid, key, value)
        client.set_terminated(rid)
        child = client.create_run(
            experiment_id,
            start_time=T0 + i * 60_000 + 1,
            run_name="teacher",
            tags={"mlflow.parentRunId": rid},
        )
        client.log_metric(child.info.run_id, "teacher/accuracy", 0.98)
        ids.append(rid)
    failed = client.create_run(experiment_id, start_time=T0 + 300_000, run_name="digits-failed")
    client.log_param(failed.info.run_id, "seed", 0)
    client.log_param(failed.info.run_id, "reduce.budget.size_kb", 250.0)
    client.log_param(failed.info.run_id, "finetune.epochs", 40)
    client.set_terminated(failed.info.run_id, "FAILED")
    return [failed.info.run_id, *reversed(ids)]  # newest first


def _compare(*args):
    return CliRunner().invoke(app, ["compare", *args])


def test_csv_is_parent_runs_newest_first_with_differing_config(runs):
    result = _compare("--format", "csv", "--last", "10")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(io.StringIO(result.stdout))
    assert list(frame["run_id"]) == runs  # stage runs left out
    assert "seed" not in frame.columns  # the same everywhere: not a difference
    assert list(frame["reduce.budget.size_kb"]) == [250.0, 50.0, 100.0, 250.0]
    assert list(frame["finetune.epochs"]) == [40, 20, 20, 20]
    assert list(frame["status"]) == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]
    assert frame["final/accuracy"].tolist()[1:] == [0.90, 0.95, 0.97]
    assert pd.isna(frame["final/accuracy"][0])
    assert frame["compression_ratio"][1] == pytest.approx(20.0)
    assert "teacher/accuracy" not in frame.columns  # stage metrics stay in the stage runs
    # headline order: what it cost first, then the final model's metrics
    assert list(frame.columns[:4]) == ["run_id", "run_name", "start_time", "status"]
    assert set(frame.columns[4:6]) == {"reduce.budget.size_kb", "finetune.epochs"}
    assert frame.columns.get_loc("compression_ratio") < frame.columns.get_loc("final/accuracy")


def test_json_parses_and_last_limits(runs):
    result = _compare("--format", "json", "--last", "2")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)  # stdout holds the JSON and nothing else
    assert [r["run_id"] for r in records] == runs[:2]
    assert records[0]["final/accuracy"] is None and records[1]["final/accuracy"] == 0.90
    assert records[0]["finetune.epochs"] == "40"  # params are MLflow's strings
    assert "reduce.budget.size_kb" in records[0]  # 250 vs 50 among these two
    assert records[1]["start_time"] == pd.Timestamp(T0 + 120_000, unit="ms", tz="UTC").strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


def test_table_shows_runs_side_by_side(runs):
    result = _compare("--last", "3")
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if runs[0][:8] in line)
    assert all(r[:8] in header for r in runs[:3]) and runs[3][:8] not in result.stdout
    assert "final/accuracy" in result.stdout and "reduce.budget.size_kb" in result.stdout


def test_one_run_has_no_differences(runs):
    frame = load_comparison("distill", 1)
    assert list(frame.columns[:4]) == ["run_id", "run_name", "start_time", "status"]
    assert not any("." in c and "/" not in c for c in frame.columns)  # no config columns


@pytest.mark.parametrize(
    "args, message",
    [
        (["--experiment", "nope"], "error: no MLflow experiment named 'nope'"),
    ],
)
def test_unknown_experiment_is_one_line(runs, args, message):
    result = _compare(*args)
    assert result.exit_code == 2 and result.stderr.startswith(message) and result.stdout == ""


def test_missing_store_is_one_line_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/none/mlflow.db")
    monkeypatch.setenv("DISTILL_MLFLOW_CONFIG", str(tmp_path / "absent.yaml"))
    result = _compare("--format", "json")
    assert result.exit_code == 2 and result.stderr.startswith("error: no MLflow store at")
    assert not (tmp_path / "none").exists()


def test_empty_experiment_gives_empty_outputs(mlflow_store):
    mlflow.create_experiment("distill")
    assert json.loads(_compare("--format", "json").stdout) == []
    assert _compare("--format", "csv").stdout.strip() == "run_id,run_name,start_time,status"


def test_only_keys_that_mean_something_for_a_run_are_shown():
    """A budget is ignored where a target planned the run, max_r2_drop means nothing to a
    classifier, a width-mode key nothing under low_rank: blank there; a key that means nothing
    to any of the runs compared is not shown at all."""
    from distill.tasks.release.compare import comparison

    runs = pd.DataFrame(
        {
            "run_id": ["a", "b"],
            "start_time": [pd.Timestamp(T0, unit="ms", tz="UTC")] * 2,
            "status": ["FINISHED"] * 2,
            "params.target": [None, "None"],
            "params.target.size_kb": ["30.0", None],
            "params.target.max_accuracy_drop": ["0.01", None],
            "params.target.max_r2_drop": ["0.01", None],
            "params.reduce.budget.size_kb": ["100.0", "120.0"],
            "params.reconstruct.mode": ["width", "low_rank"],
            "params.reconstruct.ridge": ["0.3", "0.0001"],
            "metrics.final/accuracy": [0.97, 0.96],
        }
    )
    frame = comparison(runs).set_index("run_id")
    assert frame["target.size_kb"].fillna("-").tolist() == ["30.0", "-"]
    assert frame["target.max_accuracy_drop"].fillna("-").tolist() == ["0.01", "-"]
    assert "target.max_r2_drop" not in frame.columns  # a classifier: never meaningful here
    assert frame["reduce.budget.size_kb"].isna().tolist() == [True, False]  # a target planned a
    assert frame["reconstruct.ridge"].fillna("-").tolist() == ["0.3", "-"]  # width mode only


def test_a_piped_table_fits_columns(runs, monkeypatch):
    """Piped (no terminal), the table takes $COLUMNS: every line fits 80 columns, where the
    same runs laid out at the default width need more; cells fold, keys are never cut short."""
    monkeypatch.delenv("COLUMNS", raising=False)
    wide = _compare("--last", "3")
    assert wide.exit_code == 0, wide.output
    assert max(map(len, wide.stdout.splitlines())) > 80
    monkeypatch.setenv("COLUMNS", "80")
    narrow = _compare("--last", "3")
    assert narrow.exit_code == 0, narrow.output
    lines = narrow.stdout.splitlines()
    assert max(map(len, lines)) <= 80, narrow.stdout
    header = next(line for line in lines if runs[0][:8] in line)
    assert all(r[:8] in header for r in runs[:3]), narrow.stdout
    keys = {line.split("│")[1].strip() for line in lines if line.startswith("│")}
    assert {"reduce.budget.size_kb", "accuracy_drop (points)", "final/accuracy"} <= keys
    assert "…" not in narrow.stdout
