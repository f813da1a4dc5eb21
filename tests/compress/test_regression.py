"""Regression targets: the loss and the metrics by hand and against scikit-learn, the data's task
and target standardization, the R² guard and gates, and a generated table (a text column, empty
cells, a float label) through the CLI into the registry and back out of it in a fresh process."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import mean_absolute_error, r2_score, root_mean_squared_error
from typer.testing import CliRunner

from distill.flows.cli import app
from distill.tasks.compress.data import load_dataset
from distill.tasks.compress.evaluate import (
    quality_metrics,
    regression_metrics,
    relative_error,
    torch_predictor,
)
from distill.tasks.compress.finetune import regression_kd_loss
from distill.tasks.compress.guard import Guard
from distill.tasks.platform.config import DataConfig, build_config
from distill.tasks.platform.errors import UserError
from distill.tasks.release.gates import Candidate, absolute_gates, held_out_rows
from tests.conftest import ROOT, TINY, fresh_process, use_store

NAME = "regression-table"


def _table(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """make_regression's 4 features, a region (text) that shifts the target, empty cells."""
    from sklearn.datasets import make_regression

    X, y = make_regression(n_samples=n, n_features=4, noise=5.0, random_state=seed)
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(X, columns=["a", "b", "c", "d"])
    frame["region"] = rng.choice(["north", "south", "west"], n)
    frame["y"] = y + np.where(frame.region == "north", 60.0, 0.0) + 100.0
    frame.loc[rng.choice(n, 20, replace=False), "a"] = np.nan
    frame.loc[rng.choice(n, 10, replace=False), "region"] = np.nan
    return frame


# --- the math -----------------------------------------------------------------------------


def test_regression_kd_loss_by_hand():
    s, t, y = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [4.0]]), torch.tensor([1.0, 1.0])
    # MSE(s, t) = (1 + 4) / 2 = 2.5, MSE(s, y) = (0 + 1) / 2 = 0.5
    assert regression_kd_loss(s, t, y, alpha=0.25).item() == pytest.approx(0.25 * 2.5 + 0.75 * 0.5)
    assert regression_kd_loss(s, None, y, alpha=0.25).item() == pytest.approx(0.5)
    assert regression_kd_loss(s, t, y, alpha=0.0).item() == pytest.approx(0.5)
    # Huber, delta 1: |d| <= 1 -> d²/2, else |d| - 1/2. To t: (0.5 + 1.5) / 2; to y: (0 + 0.5) / 2
    huber = regression_kd_loss(s, t, y, alpha=0.25, huber_delta=1.0).item()
    assert huber == pytest.approx(0.25 * 1.0 + 0.75 * 0.25)


def test_regression_metrics_are_scikit_learns():
    rng = np.random.default_rng(0)
    y = rng.normal(50, 10, 200)
    pred = y + rng.normal(0, 4, 200)
    teacher = y + rng.normal(0, 2, 200)
    m = regression_metrics(pred, y, teacher)
    assert m["r2"] == pytest.approx(r2_score(y, pred), abs=1e-12)
    assert m["mae"] == pytest.approx(mean_absolute_error(y, pred), abs=1e-12)
    assert m["rmse"] == pytest.approx(root_mean_squared_error(y, pred), abs=1e-12)
    rel = np.sqrt(np.mean((pred - teacher) ** 2)) / teacher.std()
    assert m["teacher_rel_error"] == pytest.approx(rel)
    assert relative_error(teacher, teacher) == 0.0
    assert relative_error(np.full(5, 3.0), np.arange(5.0)) == pytest.approx(
        np.sqrt(np.mean((3.0 - np.arange(5.0)) ** 2)) / np.arange(5.0).std()
    )


# --- the data: the task, the standardized target, the split ------------------------------


def test_float_label_is_regression_standardized_on_train(tmp_path):
    frame = _table()
    frame.to_csv(tmp_path / "t.csv", index=False)
    data = load_dataset(DataConfig(source=f"csv:{tmp_path / 't.csv'}", label="y"), 0)
    assert data.task == "regression" and data.n_outputs == 1 and data.classes == []
    assert data.y_train.dtype == np.float32
    assert abs(data.y_train.mean()) < 1e-5 and data.y_train.std() == pytest.approx(1, abs=1e-5)
    # back in the label's units: the test split's labels, the rows make_regression would split
    rows = held_out_rows(frame["y"].to_numpy(), 0.2, 0, regression=True)
    assert np.allclose(np.sort(data.to_units(data.y_test)), np.sort(frame["y"].to_numpy()[rows]))
    assert np.allclose(data.raw_frame()["label"].sort_values(), np.sort(frame["y"]), atol=1e-4)


def test_integer_labels_need_the_task_said(tmp_path):
    frame = _table().assign(y=np.arange(300) % 40)  # 40 whole numbers: classes or a quantity?
    frame.to_csv(tmp_path / "i.csv", index=False)
    cfg = DataConfig(source=f"csv:{tmp_path / 'i.csv'}", label="y")
    with pytest.raises(UserError) as err:
        load_dataset(cfg, 0)
    assert str(err.value) == (
        f"data file {tmp_path / 'i.csv'}: label column 'y' holds 40 distinct integers (0 to 39): "
        "classes or a quantity? set config key 'data.task' to classification to train 40 "
        "classes, or to regression to predict the number"
    )
    assert load_dataset(cfg.model_copy(update={"task": "regression"}), 0).is_regression
    frame.assign(y="x").to_csv(tmp_path / "s.csv", index=False)
    with pytest.raises(UserError, match=r"holds text .*data.task regression needs a numeric"):
        load_dataset(
            DataConfig(source=f"csv:{tmp_path / 's.csv'}", label="y", task="regression"), 0
        )


def test_keys_of_the_other_task_are_named():
    build_config({}, ["data.task=regression", "promote.min_accuracy=null"])  # null: gate off
    with pytest.raises(UserError) as err:
        build_config(
            {}, ["data.task=regression", "target.size_kb=10", "target.max_accuracy_drop=0.1"]
        )
    assert str(err.value) == (
        "config key 'target.max_accuracy_drop': a classification setting, but this is a "
        "regression run (data.task); remove it (use target.max_r2_drop)"
    )
    with pytest.raises(UserError, match=r"^config key 'promote.min_r2': a regression setting"):
        build_config({}, ["data.task=classification", "promote.min_r2=0.5"])


# --- guard and gates ----------------------------------------------------------------------


def test_r2_guard_on_validation_rows(tmp_path):
    _table().to_csv(tmp_path / "t.csv", index=False)
    data = load_dataset(DataConfig(source=f"csv:{tmp_path / 't.csv'}", label="y"), 0)
    perfect = torch.nn.Linear(data.n_features, 1)
    guard = Guard.of(perfect, data, max_drop=0.05)
    assert guard.metric == "r2"
    assert guard.reference == pytest.approx(
        r2_score(data.y_val, perfect(torch.from_numpy(data.X_val)).detach().numpy()[:, 0]),
        abs=1e-6,
    )
    # the evaluate stage's validation score is the one the guard holds the teacher to
    val_r2 = quality_metrics(torch_predictor(perfect), data, None, validation=True)["validation_r2"]
    assert val_r2 == pytest.approx(guard.reference, abs=1e-6)
    truth = data.y_val.reshape(-1, 1)
    check = guard.check("t", lambda X: truth if len(X) == len(truth) else None, 1)
    assert check.accuracy == pytest.approx(1.0) and check.drop == pytest.approx(
        guard.reference - 1.0
    )
    assert check.ok  # better than the teacher


def test_regression_gates_use_r2():
    metrics = {"final/r2": 0.80, "r2_drop": 0.05, "final/size_kb": 10.0}
    c = Candidate("m", "1", "run", metrics, {}, {})
    gates = build_config({}, ["promote.max_r2_drop=0.02", "promote.min_r2=0.7"]).promote
    result = {g.name: g for g in absolute_gates(c, gates)}
    assert set(result) == {"max_r2_drop", "min_r2"}  # the accuracy gates do not apply
    assert not result["max_r2_drop"].passed and result["min_r2"].passed
    assert result["max_r2_drop"].detail == "R² drop vs teacher 0.0500 > 0.0200"


# --- end to end: the CLI registers it, a fresh process predicts from the raw file ----------


@pytest.fixture(scope="module")
def registered(prefect_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("regression")
    _table().to_csv(tmp / "table.csv", index=False)
    with use_store(tmp):
        args = [
            a
            for s in [
                *TINY,
                "teacher.epochs=30",
                f"data.source=csv:{tmp / 'table.csv'}",
                "data.label=y",
                "data.task=auto",  # the float label decides
                f"register.model_name={NAME}",
                "promote.max_r2_drop=0.5",
                "promote.min_r2=0.5",
                "evaluate.plots=true",  # predicted vs true, checked below
            ]
            for a in ("--set", s)
        ]
        config = str(ROOT / "configs" / "regression.yaml")
        result = CliRunner().invoke(app, ["run", config, *args, "--promote", "--json"])
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        yield tmp, out


def test_run_logs_r2_and_is_gated_by_it(registered):
    from mlflow import MlflowClient

    _, out = registered
    metrics = MlflowClient().get_run(out["run_id"]).data.metrics
    assert 0.5 < metrics["final/r2"] <= 1 and 0.5 < metrics["teacher/r2"] <= 1
    assert metrics["r2_drop"] == pytest.approx(metrics["teacher/r2"] - metrics["final/r2"])
    assert {"final/mae", "final/rmse", "final/teacher_rel_error"} <= set(metrics)
    assert not any("accuracy" in k for k in metrics)
    assert "final/validation_r2" in metrics and "teacher/validation_r2" in metrics
    assert out["promotion"]["status"] == "promoted"
    assert {g["name"] for g in out["promotion"]["gates"]} == {"max_r2_drop", "min_r2"}
    artifacts = {a.path for a in MlflowClient().list_artifacts(out["run_id"])}
    assert "predicted.png" in artifacts and "confusion.png" not in artifacts


def test_registered_model_predicts_label_units_in_a_fresh_process(registered):
    tmp, out = registered
    code = f"""
import json, mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model("models:/{NAME}@champion")
rows = pd.read_csv("table.csv", dtype={{"region": str}}).drop(columns="y")
pred = model.predict(rows)
print(json.dumps({{"columns": list(pred.columns), "prediction": pred["prediction"].tolist()}}))
"""
    served = fresh_process(tmp, code=code)
    assert served.returncode == 0, served.stderr[-3000:]
    answer = json.loads(served.stdout.strip().splitlines()[-1])
    assert answer["columns"] == ["prediction"]
    y = pd.read_csv(tmp / "table.csv")["y"].to_numpy()
    test = held_out_rows(y, 0.2, 0, regression=True)  # the run's test rows
    pred = np.asarray(answer["prediction"])
    assert r2_score(y[test], pred[test]) == pytest.approx(out["metrics"]["final/r2"], abs=1e-3)

    cli = fresh_process(
        tmp,
        "predict",
        "--model",
        f"models:/{NAME}@champion",
        "--input",
        "table.csv",
        "--output",
        "out.csv",
        "--label",
        "y",
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    written = pd.read_csv(tmp / "out.csv")
    assert list(written.columns) == ["prediction"]
    assert np.allclose(written["prediction"], pred)
    assert cli.stdout.strip() == (
        f"wrote {len(y)} predictions to out.csv, R² {r2_score(y, pred):.4f}, "
        f"MAE {mean_absolute_error(y, pred):.4g}, RMSE {root_mean_squared_error(y, pred):.4g}"
    )
