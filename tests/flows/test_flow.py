"""The whole pipeline through Prefect, against a fresh MLflow store."""

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from distill.flows.distill import distill_flow
from distill.tasks.compress.pipeline import STAGES
from distill.tasks.platform.errors import UserError
from distill.tasks.release.registry import raw_features
from tests.conftest import ROOT, TINY, use_store

CONFIG = str(ROOT / "configs" / "digits.yaml")


@pytest.fixture(scope="module")
def flow_store(tmp_path_factory):
    return tmp_path_factory.mktemp("flow-store")


@pytest.fixture(scope="module")
def pipeline(prefect_server, flow_store):
    """One pipeline run for the tests that only read what it recorded."""
    with use_store(flow_store):
        return distill_flow(
            CONFIG, [*TINY, "register.model_name=tiny-digits", "evaluate.plots=true"]
        )


@pytest.fixture
def run(pipeline, flow_store):
    with use_store(flow_store):  # an earlier test may have pointed MLflow elsewhere
        yield pipeline


def test_flow_records_parent_and_stage_runs(run):
    client = MlflowClient()
    parent = client.get_run(run.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["reduce.budget.size_kb"] == "12.0"
    assert parent.data.params["teacher.hidden"] == "[64, 64]"
    tags = parent.data.tags
    assert {
        "prefect.flow_run_id",
        "distill.config_hash",
        "distill.dataset_digest",
        "distill.git_commit",
    } <= set(tags)
    assert tags["distill.split"] == "seeded"  # digits: split by distill, with seed and test_size
    assert parent.inputs.dataset_inputs[0].dataset.digest == tags["distill.dataset_digest"]

    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.run_id}'"
    )
    assert sorted(r.info.run_name for r in children) == sorted(["reduce", *STAGES])
    metrics = parent.data.metrics
    for stage in STAGES:
        assert f"{stage}/accuracy" in metrics and f"{stage}/size_kb" in metrics
    for key in (
        "final/accuracy",
        "final/size_kb",
        "compression_ratio",
        "accuracy_drop",
        "speedup_b1",
    ):
        assert key in metrics
    assert metrics["accuracy_drop"] == pytest.approx(
        metrics["teacher/accuracy"] - metrics["final/accuracy"]
    )
    assert metrics["compression_ratio"] == pytest.approx(
        metrics["teacher/size_kb"] / metrics["final/size_kb"]
    )
    assert (
        metrics["final/size_kb"] < metrics["teacher/size_kb"] / 2
    )  # tiny: ONNX's fixed overhead shows
    assert run.metrics == metrics

    finetuned = next(r for r in children if r.info.run_name == "finetuned")
    curve = client.get_metric_history(finetuned.info.run_id, "val_accuracy")
    assert [m.step for m in curve] == list(range(len(curve))) and len(curve) >= 1
    artifacts = [a.path for a in client.list_artifacts(run.run_id, "config")]
    assert "config/resolved.yaml" in artifacts and "config/digits.yaml" in artifacts
    # at the root: MLflow's compare view shows root-level artifacts only
    plots = sorted(a.path for a in client.list_artifacts(run.run_id) if a.path.endswith(".png"))
    assert plots == ["confusion.png", "curves.png", "pareto.png", "tsne.png"]
    assert (
        metrics["final/flops"] == metrics["pruned/flops"]
    )  # the ONNX model carries its float model's count


def test_runs_say_what_they_are_in_the_mlflow_ui(run):
    client = MlflowClient()
    parent = client.get_run(run.run_id)
    assert parent.info.run_name == run.run_name == "digits · budget 12 KB"
    tags = parent.data.tags
    assert tags["mlflow.source.git.commit"] == tags["distill.git_commit"]
    note = tags["mlflow.note.content"]  # the run's description: the stage table
    assert note.startswith("# distill run: digits · budget 12 KB")
    assert all(f"| {stage} |" in note for stage in STAGES) and "points" in note
    assert "data.shape" not in parent.data.params  # None: no parameter
    children = {
        r.info.run_name: r
        for r in client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.run_id}'"
        )
    }
    # the teacher's own training curves, one point per epoch
    assert len(client.get_metric_history(children["teacher"].info.run_id, "val_accuracy")) >= 1
    finetuned = children["finetuned"]
    # plain keys inside a stage's run; its run spans the work it timed
    assert (
        "accuracy" in finetuned.data.metrics and "finetuned/accuracy" not in finetuned.data.metrics
    )
    took = finetuned.data.metrics["seconds"]
    assert parent.data.metrics["finetuned/seconds"] == pytest.approx(took)
    assert (finetuned.info.end_time - finetuned.info.start_time) / 1000 >= took - 0.5
    assert run.stages["finetuned"]["seconds"] == pytest.approx(took)
    # the served model is an MLflow `onnx` model, its metrics linked to it
    (model,) = client.search_logged_models(
        [parent.info.experiment_id],
        filter_string=f"source_run_id = '{children['quantized'].info.run_id}'",
    )
    flavors = mlflow.models.get_model_info(model.model_uri).flavors
    assert "onnx" in flavors and "accuracy" in {m.key for m in model.metrics}
    version = client.get_model_version("tiny-digits", run.model_version)
    assert version.description.startswith("digits · budget 12 KB: accuracy ")
    assert client.get_registered_model("tiny-digits").description.startswith("Students")


def test_a_cached_teacher_is_logged_once_per_experiment(run, flow_store):
    with use_store(flow_store):
        again = distill_flow(CONFIG, [*TINY, "register.enabled=false"])
        client = MlflowClient()
        teacher_runs = client.search_runs(
            [client.get_run(again.run_id).info.experiment_id],
            filter_string="tags.`distill.stage` = 'teacher'",
        )
        logged = [r for r in teacher_runs if "distill.logged_model_id" not in r.data.tags]
        assert len(teacher_runs) >= 2 and len(logged) == 1
        (reused,) = {r.data.tags.get("distill.logged_model_id") for r in teacher_runs} - {None}
        assert client.get_logged_model(reused).source_run_id == logged[0].info.run_id


def test_registered_challenger_reproduces_the_logged_accuracy(run, digits):
    client = MlflowClient()
    version = client.get_model_version_by_alias("tiny-digits", "challenger")
    assert str(version.version) == run.model_version
    assert version.tags["mlflow.run_id"] == run.run_id
    model = mlflow.pyfunc.load_model("models:/tiny-digits@challenger")
    out = model.predict(raw_features(digits, digits.X_test))
    accuracy = (out["prediction"].to_numpy() == np.asarray(digits.classes)[digits.y_test]).mean()
    assert accuracy == pytest.approx(run.metrics["final/accuracy"])
    probas = out[[f"proba_{c}" for c in digits.classes]].to_numpy()
    assert np.allclose(probas.sum(1), 1.0)


def test_failed_stage_marks_the_run_failed_and_registers_nothing(
    prefect_server, mlflow_store, tmp_path
):
    # a teacher file that is missing is found before any run opens: nothing is recorded
    with pytest.raises(UserError, match="file not found"):
        distill_flow(
            CONFIG, [*TINY, f"teacher.source=file:{tmp_path}/none.pt", "register.model_name=never"]
        )
    assert mlflow.search_runs(search_all_experiments=True).empty
    # an MLflow teacher is loaded by its stage: the run it failed in ends FAILED
    with pytest.raises(UserError, match="cannot load models:/nothing-here/1"):
        distill_flow(
            CONFIG, [*TINY, "teacher.source=models:/nothing-here/1", "register.model_name=never"]
        )
    runs = mlflow.search_runs(
        experiment_names=["distill"], filter_string="tags.mlflow.runName LIKE 'digits%'"
    )
    assert list(runs["status"]) == ["FAILED"]
    assert MlflowClient().search_registered_models(filter_string="name = 'never'") == []


def test_bad_config_leaves_nothing_in_mlflow(prefect_server, mlflow_store):
    with pytest.raises(UserError, match=r"config key 'reduce\.budget\.params'"):
        distill_flow(CONFIG, ["reduce.budget.params=0"])
    assert mlflow.search_experiments(filter_string="name = 'distill'") == []


def test_torch_runtime_is_registered_and_served(prefect_server, mlflow_store, digits):
    run = distill_flow(
        CONFIG,
        [
            *TINY,
            "compress.quantize.runtime=torch",
            "register.model_name=tiny-torch",
        ],
    )
    model = mlflow.pyfunc.load_model("models:/tiny-torch@challenger")
    out = model.predict(raw_features(digits, digits.X_test))
    accuracy = (out["prediction"].to_numpy() == np.asarray(digits.classes)[digits.y_test]).mean()
    assert accuracy == pytest.approx(run.metrics["final/accuracy"])
    # (TorchScript's code and packing overhead outweighs int8 on a model this tiny: no size claim here)
