"""`import distill`: the Python API compresses a user's module in this process, with no server
and nothing written unless tracking is asked for."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import distill
from tests.api.rows import FAST, _digits, _trained_mlp
from tests.conftest import ROOT


def test_version_agrees_with_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "distill.flows.cli", "--version"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"distill {distill.__version__}"
    assert set(distill.__all__) >= {"compress", "run", "Result", "Served", "__version__"}


NOTEBOOK = """
import json, os, sys
import numpy as np, torch
sys.path.insert(0, {root!r})
from tests.api.rows import FAST, _digits, _trained_mlp
import distill

X, y, Xt, yt = _digits()
model = _trained_mlp(X, y)
before = {{k: v.clone() for k, v in model.state_dict().items()}}
model.train()
result = distill.compress(model, train=(X, y), test=(torch.from_numpy(Xt), yt), **FAST)
same = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
served = (result.served.predict(Xt) == yt).mean()
with torch.inference_mode():
    student = (result.student(torch.from_numpy(Xt)).argmax(1).numpy() == yt).mean()
print(json.dumps({{
    "accuracy": result.metrics["accuracy"], "served": float(served), "student": float(student),
    "stages": sorted(result.metrics["stages"]), "ratio": result.metrics["compression_ratio"],
    "record": result.record, "untouched": same, "training": model.training,
    "prefect": "prefect" in sys.modules, "mlflow": "mlflow" in sys.modules,
    "cwd": os.listdir("."),
}}))
"""


def test_compress_runs_in_process_with_no_server_and_writes_nothing(tmp_path):
    """A notebook's call: the user's module and arrays in, a served model that predicts from
    an ndarray out; Prefect and MLflow never imported, nothing written where it runs, and the
    caller's module as it was (weights and training mode)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    out = subprocess.run(
        [sys.executable, "-c", NOTEBOOK.format(root=str(ROOT))],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env | {"OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["cwd"] == []
    assert not got["prefect"] and not got["mlflow"]
    assert got["record"] is None
    assert got["untouched"] and got["training"]
    assert got["stages"] == ["finetuned", "pruned", "quantized", "reconstructed", "teacher"]
    # the metric is the served model's accuracy on the test rows given, as predict() gives it
    assert got["served"] == pytest.approx(got["accuracy"], abs=1e-9)
    assert got["student"] > 0.8
    assert got["ratio"] > 2  # default: 4x fewer parameters, then pruning and int8


def test_tracked_compress_records_the_run_as_the_cli_does(tmp_path):
    import mlflow

    X, y, Xt, yt = _digits()
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    result = distill.compress(
        _trained_mlp(X, y), (X, y), (Xt, yt), track=store, experiment="notebook", **FAST
    )
    assert result.record is not None
    # the process's own MLflow points where it did: `track=` was for this run only
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before
    client = mlflow.MlflowClient(store, registry_uri=store)
    parent = client.get_run(result.record)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["quantized/accuracy"] == pytest.approx(result.metrics["accuracy"])
    assert parent.data.tags["distill.entry"] == "python"
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.name == "notebook"
    nested = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{result.record}'"
    )
    names = {r.data.tags["mlflow.runName"].rsplit("/", 1)[-1] for r in nested}
    assert {"teacher", "reduce", "reconstructed", "finetuned", "pruned", "quantized"} <= {
        n.split("-")[-1] for n in names
    } | names


def test_dataframes_with_text_labels_come_back_as_those_labels(tmp_path):
    X, y, Xt, yt = _digits(400)
    names = np.array(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    )
    columns = [f"px{i}" for i in range(64)]
    train = (pd.DataFrame(X, columns=columns), pd.Series(names[y]))
    test = (pd.DataFrame(Xt, columns=columns), pd.Series(names[yt]))
    result = distill.compress(_trained_mlp(X, y), train, test, **FAST)
    predicted = result.served.predict(test[0])
    assert set(predicted) <= set(names)
    assert (predicted == names[yt]).mean() == pytest.approx(result.metrics["accuracy"], abs=1e-9)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, X, y: distill.compress(m, (X,), (X, y)), "train: expected a pair (X, y)"),
        (lambda m, X, y: distill.compress("no/such/dir", (X, y), (X, y)), "teacher: expected"),
        (lambda m, X, y: distill.compress(m, (X, y), (X, y[:5])), "test: X has 200 rows, y 5"),
        (
            lambda m, X, y: distill.compress(m, (X, y), (X, y), finetune={"epoch": 3}),
            "finetune.epoch",
        ),
        (
            lambda m, X, y: distill.compress(m, (X[:, :10], y), (X[:, :10], y)),
            "[2, 10]",
        ),
    ],
    ids=["not-a-pair", "no-teacher", "rows-differ", "bad-setting", "wrong-width"],
)
def test_bad_input_is_one_line_naming_what(call, message):
    X, y, _, _ = _digits(200)
    with pytest.raises(distill.UserError) as err:
        call(_trained_mlp(X, y), X, y)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_the_notebook_in_docs_runs(tmp_path):
    """docs/notebook.ipynb's code cells, in order, in a fresh process: it ships what it says."""
    cells = json.loads((ROOT / "docs" / "notebook.ipynb").read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    code += "\nprint('METRICS', result.target_met, result.metrics['compression_ratio'])"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1].split()
    assert last[:2] == ["METRICS", "True"] and float(last[2]) >= 10
    assert (tmp_path / "student.onnx").stat().st_size > 0


RUN = """
import json, sys
import distill
s = distill.run({config!r}, {overrides!r})
print(json.dumps({{"run_id": s.run_id, "model": s.model_name, "version": s.model_version,
                   "accuracy": s.metrics["quantized/accuracy"]}}))
"""


@pytest.mark.slow
def test_run_is_the_cli_flow_from_python(tmp_path):
    """`distill.run(config, overrides)`: the flow `distill run` runs (a temporary Prefect API in
    this process), recorded in MLflow and registered as challenger."""
    import mlflow

    from tests.conftest import TINY

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = os.environ | {
        "MLFLOW_TRACKING_URI": store,
        "MLFLOW_REGISTRY_URI": store,
        "DISTILL_MLFLOW_CONFIG": str(tmp_path / "absent-mlflow.yaml"),
        "_MLFLOW_SERVER_ARTIFACT_ROOT": str(tmp_path / "mlruns"),
    }
    env.pop("PREFECT_API_URL", None)
    overrides = [*TINY, "target=null", "evaluate.plots=false"]
    code = RUN.format(config=str(ROOT / "configs" / "digits.yaml"), overrides=overrides)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    # the registry named, not left to this process's MLflow (another test may have pointed it)
    client = mlflow.MlflowClient(store, registry_uri=store)
    assert client.get_run(summary["run_id"]).info.status == "FINISHED"
    version = client.get_model_version_by_alias(summary["model"], "challenger")
    assert str(version.version) == summary["version"] and version.run_id == summary["run_id"]
    assert 0.5 < summary["accuracy"] <= 1.0


def test_orchestrate_runs_the_stages_as_cached_prefect_task_runs(monkeypatch):
    """`orchestrate=True`: one flow run `distill-compress` whose stages are task runs; the same
    call again takes every stage from Prefect's cache (the same student), where the plain call
    never touches Prefect."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
    )
    from prefect.utilities.asyncutils import run_coro_as_sync

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    X, y, Xt, yt = _digits(400)
    teacher = _trained_mlp(X, y)

    async def stages() -> list[tuple[str, str]]:
        async with get_client() as client:
            (run,) = await client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["distill-compress"])),
                sort="START_TIME_DESC",
                limit=1,
            )
            tasks = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                task_run_filter=TaskRunFilter(),
            )
            assert run.state.is_completed()
            return sorted((t.name, t.state.name) for t in tasks)

    first = distill.compress(teacher, (X, y), (Xt, yt), orchestrate=True, **FAST)
    ran = run_coro_as_sync(stages())
    again = distill.compress(teacher, (X, y), (Xt, yt), orchestrate=True, **FAST)
    cached = run_coro_as_sync(stages())
    # a given teacher is no task (there is nothing to cache: the user holds it)
    made = {"reduce", "reconstruct", "finetune", "prune", "quantize"}
    assert made <= {name for name, _ in ran}
    assert all(state == "Completed" for name, state in ran if name in made)
    assert all(state == "Cached" for name, state in cached if name in made)
    assert again.metrics["accuracy"] == first.metrics["accuracy"]
    assert again.served.model.file_bytes == first.served.model.file_bytes
