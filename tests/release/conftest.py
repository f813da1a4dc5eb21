"""Registered versions made directly in a temporary MLflow store (a run with the metrics and tags
the pipeline logs, and a version pointing at it): the promotion and gate tests share them."""

import shutil

import mlflow
import pytest
from mlflow import MlflowClient

from distill.tasks.compress.sources import read_table, table_digest
from distill.tasks.platform.config import PromoteConfig
from tests.conftest import ARTIFACT_ROOT_VAR, end_active_runs, point_mlflow_at

NAME = "gated"


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory):
    """An MLflow database with its tables made once (~5 s): each test gets a copy. Its Default
    experiment keeps artifacts beside it, not in the repository's ./mlruns."""
    folder = tmp_path_factory.mktemp("template")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ARTIFACT_ROOT_VAR, str(folder / "mlruns"))
        MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


@pytest.fixture
def registry_store(empty_db, tmp_path, monkeypatch):
    """conftest's `mlflow_store`, its tables copied from the template."""
    shutil.copy(empty_db, tmp_path / "mlflow.db")
    yield point_mlflow_at(tmp_path, monkeypatch)
    end_active_runs()


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
