"""Registered versions made directly in a temporary MLflow store (a run with the metrics and tags
the pipeline logs, and a version pointing at it): the promotion and gate tests share them."""

import shutil

import mlflow
import pytest
from mlflow import MlflowClient

from tasks.compress.sources import read_table, table_digest
from tasks.platform.config import PromoteConfig

NAME = "gated"


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory):
    """An MLflow database with its tables made once (~5 s): each test gets a copy."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def registry_store(empty_db, tmp_path, monkeypatch):
    """A fresh store like tests/conftest.py's `mlflow_store`, copied from the template."""
    shutil.copy(empty_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(
        "MLFLOW_REGISTRY_URI", uri
    )  # mlflow.set_registry_uri writes it to os.environ: undo after
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


DIGITS_DIGEST = table_digest(*read_table("sklearn:digits", "target")[:2])


def make_version(
    accuracy: float,
    teacher: float = 0.96,
    size_kb: float = 70.0,
    latency: float = 0.01,
    digest: str = DIGITS_DIGEST,
    seed: int = 0,
    test_size: float = 0.2,
    name: str = NAME,
) -> str:
    """A registered version whose parent run carries the pipeline's keys; alias challenger moves to it."""
    client = MlflowClient()
    with mlflow.start_run(tags={"distill.dataset_digest": digest}) as run:
        mlflow.log_params(
            {
                "seed": seed,
                "data.test_size": test_size,
                "data.source": "sklearn:digits",
                "data.label": "target",
            }
        )
        mlflow.log_metrics(
            {
                "final/accuracy": accuracy,
                "teacher/accuracy": teacher,
                "accuracy_drop": teacher - accuracy,
                "final/size_kb": size_kb,
                "final/latency_ms_b1": latency,
            }
        )
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(
        name,
        f"runs:/{run.info.run_id}/model",
        run_id=run.info.run_id,
        tags={"mlflow.run_id": run.info.run_id},
    ).version
    client.set_registered_model_alias(name, "challenger", version)
    return str(version)


def aliases(name: str = NAME) -> dict[str, str]:
    return {k: str(v) for k, v in MlflowClient().get_registered_model(name).aliases.items()}


def tags(version: str, name: str = NAME) -> dict[str, str]:
    return MlflowClient().get_model_version(name, version).tags


GATES = PromoteConfig(
    max_accuracy_drop=0.01, min_accuracy=0.9, max_size_kb=100, max_latency_ms_b1=0.05
)
