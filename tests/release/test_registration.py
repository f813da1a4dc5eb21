"""All-or-nothing registration and what promotion accepts, on versions made directly in a fresh
MLflow store (the SIGKILL itself, through the CLI, is in tests/platform/test_faults_processes.py)."""

import mlflow
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from distill.flows.cli import app
from distill.tasks.platform.errors import UserError
from distill.tasks.release.registry import (
    COMPLETE,
    CREATED_BY,
    check_promotable,
    remove_incomplete_registrations,
)


def _run(status: str = "FINISHED") -> str:
    client = MlflowClient()
    experiment = client.get_experiment_by_name("distill") or client.get_experiment(
        client.create_experiment("distill")
    )
    run_id = client.create_run(experiment.experiment_id).info.run_id
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


def _version(
    name: str, run_id: str, complete: str | None = "true", created_by: str | None = None
) -> str:
    client = MlflowClient()
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, tags={CREATED_BY: created_by} if created_by else None)
    tags = {"mlflow.run_id": run_id} | ({COMPLETE: complete} if complete else {})
    return str(
        client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id, tags=tags).version
    )


def _versions(name: str) -> list[str]:
    return sorted(str(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'"))


def test_unfinished_versions_of_dead_runs_are_removed_and_nothing_else(registry_store):
    finished = _version("m", _run())
    legacy = _version("m", _run(), complete=None)  # registered before the mark existed: kept
    killed = _version("m", _run("FAILED"), complete="false")
    registering = _version("m", _run("RUNNING"), complete="false")  # a run registering right now
    deleted_run = _run()
    unfinished_of_deleted = _version("m", deleted_run, complete="false")
    MlflowClient().delete_run(deleted_run)
    # empty models: one a killed run created (ours, removed), one a live run just created, one a user's
    MlflowClient().create_registered_model("left-empty", tags={CREATED_BY: _run("FAILED")})
    MlflowClient().create_registered_model("being-made", tags={CREATED_BY: _run("RUNNING")})
    MlflowClient().create_registered_model("users-own")

    removed = remove_incomplete_registrations()

    assert sorted(removed) == sorted([f"m/{killed}", f"m/{unfinished_of_deleted}", "left-empty"])
    assert _versions("m") == sorted([finished, legacy, registering])
    assert {m.name for m in MlflowClient().search_registered_models()} == {
        "m",
        "being-made",
        "users-own",
    }
    assert remove_incomplete_registrations() == []


def test_a_killed_runs_model_goes_with_its_only_version(registry_store):
    run_id = _run("FAILED")
    _version("solo", run_id, complete="false", created_by=run_id)
    assert remove_incomplete_registrations() == ["solo/1", "solo"]
    assert MlflowClient().search_registered_models() == []


@pytest.mark.parametrize(
    "case, message",
    [
        ("unfinished", "m version 1 is an unfinished registration (run "),
        (
            "failed run",
            "m version 1: its MLflow run {run} ended FAILED, not FINISHED: not promoted",
        ),
        ("deleted run", "m version 1: its MLflow run {run} was deleted: not promoted"),
        ("no files", "m version 1 does not load ("),
    ],
)
def test_what_promotion_refuses(registry_store, case, message):
    run_id = _run("FAILED" if case == "failed run" else "FINISHED")
    version = _version("m", run_id, complete="false" if case == "unfinished" else "true")
    if case == "deleted run":
        MlflowClient().delete_run(run_id)
    with pytest.raises(UserError) as refused:
        check_promotable("m", version)
    assert str(refused.value).startswith(message.format(run=run_id))


def test_promote_cli_refuses_a_version_whose_run_was_deleted(prefect_server, registry_store):
    run_id = _run()
    version = _version("m", run_id)
    MlflowClient().delete_run(run_id)
    result = CliRunner().invoke(app, ["promote", "--model", "m", "--version", version])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: m version {version}: its MLflow run {run_id} was deleted: not promoted"
    )
    assert MlflowClient().get_registered_model("m").aliases == {}
    assert "promotion.status" not in MlflowClient().get_model_version("m", version).tags


def test_registration_marks_the_version_complete_last(registry_store, digits, monkeypatch):
    """The order that makes a kill at any point safe: created unfinished, alias, then the mark;
    an error (or Ctrl-C) in between deletes the version."""
    import torch

    from distill.tasks.compress.architectures import build_mlp
    from distill.tasks.compress.evaluate import OnnxModel
    from distill.tasks.compress.quantize import export_onnx
    from distill.tasks.release.registry import register_model

    torch.manual_seed(0)
    model = OnnxModel(
        export_onnx(build_mlp(digits.n_features, [8], digits.n_classes), digits.n_features), 0, 0
    )
    writes = []
    set_alias, set_tag = MlflowClient.set_registered_model_alias, MlflowClient.set_model_version_tag
    monkeypatch.setattr(
        MlflowClient,
        "set_registered_model_alias",
        lambda self, *a: (writes.append(("alias", a[1])), set_alias(self, *a))[1],
    )
    monkeypatch.setattr(
        MlflowClient,
        "set_model_version_tag",
        lambda self, *a: (writes.append(("tag", a[2], a[3])), set_tag(self, *a))[1],
    )
    with mlflow.start_run() as run:
        registered = register_model(model, digits, "ordered", {"mlflow.run_id": run.info.run_id})
    assert writes == [("alias", "challenger"), ("tag", COMPLETE, "true")]
    assert MlflowClient().get_model_version("ordered", registered.version).tags[COMPLETE] == "true"

    def interrupted(self, *a):
        raise KeyboardInterrupt

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", interrupted)
    with mlflow.start_run() as run, pytest.raises(KeyboardInterrupt):
        register_model(model, digits, "ordered", {"mlflow.run_id": run.info.run_id})
    assert _versions("ordered") == [registered.version]  # the interrupted one was deleted
