"""MLflow conventions, in one place: where runs go, what they are called, which keys they use.

- `mlflow.yaml` (ours; MLflow reads no such file) says where tracking and the registry
  live; `MLFLOW_TRACKING_URI` in the environment overrides it.
- One parent run per pipeline run, one nested run per stage. Stage metrics are
  `STAGE/METRIC` on the stage's run *and* on the parent, so parent runs compare side by
  side; curves are step metrics `STAGE/CURVE`.
- Run ids are passed explicitly (MLflow's active run is thread-local).
"""

from __future__ import annotations

import os
import tempfile
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.errors import UserError

SETTINGS_FILE = Path("mlflow.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")


class ServerSettings(_Strict):
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    registry_uri: str | None = None  # None: the tracking store
    artifact_location: str | None = None  # None: `artifacts/` beside a SQLite file


class TrackingSettings(_Strict):
    experiment: str = "distill"


class UiSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(5000, ge=1, le=65535)


class MlflowSettings(_Strict):
    server: ServerSettings = Field(default_factory=ServerSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    ui: UiSettings = Field(default_factory=UiSettings)

    @property
    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or self.server.tracking_uri

    @property
    def registry_uri(self) -> str:
        return os.environ.get("MLFLOW_REGISTRY_URI") or self.server.registry_uri or self.tracking_uri

    @property
    def artifact_location(self) -> str | None:
        if self.server.artifact_location and not os.environ.get("MLFLOW_TRACKING_URI"):
            return Path(self.server.artifact_location).resolve().as_uri()
        db = _sqlite_path(self.tracking_uri)
        return (db.parent / "artifacts").resolve().as_uri() if db else None

    @property
    def ui_url(self) -> str:
        return f"http://{self.ui.host}:{self.ui.port}"


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def load_settings(path: Path | None = None) -> MlflowSettings:
    path = path or Path(os.environ.get("DISTILL_MLFLOW_CONFIG", SETTINGS_FILE))
    if not path.is_file():
        return MlflowSettings()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return MlflowSettings.model_validate(raw)
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"{path}: key '{where}': {'unknown key' if first['type'] == 'extra_forbidden' else first['msg']}") from None


def configure(settings: MlflowSettings) -> str:
    """Point MLflow at the configured store; return the experiment id (created if missing)."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    db = _sqlite_path(settings.tracking_uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the tracking store {settings.tracking_uri}: {err.strerror}") from None
    check_reachable(settings.tracking_uri)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.registry_uri)
    experiment = mlflow.get_experiment_by_name(settings.tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow.create_experiment(settings.tracking.experiment, artifact_location=settings.artifact_location)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """A tracking server that does not answer is one clear error, not minutes of retries."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered (auth, proxies): reachable
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"MLflow tracking server {uri} is not reachable ({reason}); start it, or unset "
                        "MLFLOW_TRACKING_URI to use the embedded store of mlflow.yaml") from None


def connect(settings: MlflowSettings) -> None:
    """Point MLflow at an existing store, for reading: a missing SQLite file is an error, not created."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    db = _sqlite_path(settings.tracking_uri)
    if db is not None and not db.is_file():
        raise UserError(f"no MLflow store at {db} (tracking URI {settings.tracking_uri}); run `distill run` first")
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.registry_uri)


def ui_server_command(settings: MlflowSettings, port: int | None = None) -> list[str]:
    """`mlflow server` on mlflow.yaml's ui host/port against the configured stores (for `distill ui`)."""
    if settings.tracking_uri.startswith(("http://", "https://")):
        raise UserError(f"tracking is already a server ({settings.tracking_uri}): open it in a browser")
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", settings.ui.host,
           "--port", str(port or settings.ui.port), "--workers", "1", "--backend-store-uri", settings.tracking_uri]
    if settings.registry_uri != settings.tracking_uri:
        cmd += ["--registry-store-uri", settings.registry_uri]
    if settings.artifact_location:  # runs keep their own artifact URIs; this serves new uploads
        cmd += ["--artifacts-destination", settings.artifact_location]
    return cmd


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _param_value(value: Any) -> str:
    return str(value)[:6000]  # MLflow's limit on a param value


@contextmanager
def parent_run(experiment_id: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> Iterator[str]:
    """The pipeline's run: FINISHED on success, FAILED on error, KILLED on Ctrl-C."""
    import mlflow

    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)
    status = "FAILED"
    try:
        mlflow.log_params({k: _param_value(v) for k, v in params.items()})
        yield run.info.run_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status=status)


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for i in range(0, len(batch), 1000):  # MLflow's batch limit
        MlflowClient().log_batch(run_id, metrics=batch[i:i + 1000])


def log_curves(run_id: str, stage: str, curves: dict[str, list[float]]) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(f"{stage}/{name}", float(v), now, step)
             for name, values in curves.items() for step, v in enumerate(values)]
    for i in range(0, len(batch), 1000):
        MlflowClient().log_batch(run_id, metrics=batch[i:i + 1000])


def prefixed(stage: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{stage}/{k}": v for k, v in metrics.items()}


@contextmanager
def stage_run(parent_run_id: str, stage: str) -> Iterator[str]:
    """A nested run for one stage, under the pipeline's parent run."""
    import mlflow

    experiment_id = mlflow.MlflowClient().get_run(parent_run_id).info.experiment_id
    with mlflow.start_run(run_name=stage, nested=True, parent_run_id=parent_run_id, experiment_id=experiment_id,
                          tags={"distill.stage": stage}) as run:
        yield run.info.run_id


def log_stage_params(params: dict[str, Any]) -> None:
    import mlflow

    if params:
        mlflow.log_params({k: _param_value(v) for k, v in params.items()})


def log_model(stage: str, model: Any, example: Any) -> None:
    """A stage's model as an MLflow artifact: PyTorch modules pickled (loadable as their class,
    requirements pinned to skip inference), ONNX models as their .onnx file."""
    import mlflow

    if hasattr(model, "file_bytes"):  # a serialized model (ONNX, TorchScript)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{stage}{model.suffix}"
            path.write_bytes(model.file_bytes)
            mlflow.log_artifact(str(path), artifact_path="model")
        return
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    mlflow.pytorch.log_model(model, name=stage.replace("/", "_"), serialization_format="pickle",
                             signature=signature, pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])


def record_stage(parent_run_id: str, stage: str, metrics: dict[str, float], params: dict[str, Any] | None = None,
                 curves: dict[str, list[float]] | None = None, model: Any = None, example: Any = None) -> str:
    """One nested run for the stage (params, metrics, curves, model); its metrics also on the parent."""
    keyed = prefixed(stage, metrics)
    with stage_run(parent_run_id, stage) as run_id:
        log_stage_params(params or {})
        log_metrics(run_id, keyed)
        if curves:
            log_curves(run_id, stage, curves)
        if model is not None:
            log_model(stage, model, example)
    log_metrics(parent_run_id, keyed)
    return run_id


def log_run_inputs(config_yaml: str, config_path: Path | None, frame: Any, source: str, name: str,
                   digest: str) -> None:
    """On the active parent run: the resolved config, the file it came from, the dataset."""
    import mlflow
    import mlflow.data

    mlflow.log_text(config_yaml, "config/resolved.yaml")
    if config_path is not None and config_path.is_file():
        mlflow.log_artifact(str(config_path), artifact_path="config")
    dataset = mlflow.data.from_pandas(frame, source=_dataset_source(source), targets="label", name=name,
                                      digest=digest)
    mlflow.log_input(dataset, context="training")


def _dataset_source(source: str) -> Any:
    kind, _, ref = source.partition(":")
    if kind in ("csv", "parquet", "npz"):
        return Path(ref).resolve().as_uri()
    from mlflow.data.code_dataset_source import CodeDatasetSource

    return CodeDatasetSource(tags={"source": source})


def log_figure(run_id: str, figure: Any, artifact_file: str) -> str:
    """A matplotlib figure as a PNG artifact of the run; returns its artifact path."""
    from mlflow import MlflowClient

    MlflowClient().log_figure(run_id, figure, artifact_file, save_kwargs={"dpi": 100})
    return artifact_file


def ui_base_url(settings: MlflowSettings) -> str:
    """Where a person sees the runs: the tracking server itself, else `distill ui` (mlflow.yaml `ui`)."""
    uri = settings.tracking_uri
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else settings.ui_url


def run_url(settings: MlflowSettings, experiment_id: str, run_id: str) -> str:
    return f"{ui_base_url(settings)}/#/experiments/{experiment_id}/runs/{run_id}"


def run_metrics(run_id: str) -> dict[str, float]:
    from mlflow import MlflowClient

    return dict(MlflowClient().get_run(run_id).data.metrics)
