"""MLflow conventions, in one place: where runs go, what they are called, which keys they use.

- `mlflow.yaml` (ours; MLflow reads no such file) says where tracking and the registry
  live; `MLFLOW_TRACKING_URI` in the environment overrides it.
- One parent run per pipeline run, named by what differs (`digits · target 20 KB`), its
  description (`mlflow.note.content`) the stage table; one nested run per stage, opened when
  the stage's work began. A stage's run holds plain keys (`accuracy`, `seconds`, curves as
  step metrics `val_accuracy`), so one chart compares a key across stages; the parent holds
  them as `STAGE/METRIC` (the flow writes them in one batch at the end), so parent runs
  compare side by side. A stage's model is logged before its metrics, which then name it.
- Run ids are passed explicitly (MLflow's active run is thread-local); stage runs are made
  with the client, not the fluent API's active-run stack.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from tasks.platform import locks, reaper, safe_yaml
from tasks.platform.config import Strict, validation_message
from tasks.platform.errors import WRITE_FAULTS, UserError

SETTINGS_FILE = Path("mlflow.yaml")


class ServerSettings(Strict):
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    registry_uri: str | None = None  # None: the tracking store
    artifact_location: str | None = None  # None: `artifacts/` beside a SQLite file


class TrackingSettings(Strict):
    experiment: str = "distill"


class UiSettings(Strict):
    host: str = "127.0.0.1"
    port: int = Field(5000, ge=1, le=65535)


class MlflowSettings(Strict):
    server: ServerSettings = Field(default_factory=ServerSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    ui: UiSettings = Field(default_factory=UiSettings)

    @property
    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or self.server.tracking_uri

    @property
    def registry_uri(self) -> str:
        return (
            os.environ.get("MLFLOW_REGISTRY_URI") or self.server.registry_uri or self.tracking_uri
        )

    @property
    def artifact_location(self) -> str | None:
        # mlflow.yaml's location goes with mlflow.yaml's store (MLflow's set_tracking_uri writes
        # MLFLOW_TRACKING_URI into the environment: its presence alone says nothing)
        if self.server.artifact_location and self.tracking_uri == self.server.tracking_uri:
            return Path(self.server.artifact_location).resolve().as_uri()
        db = locks.sqlite_path(self.tracking_uri)
        return (db.parent / "artifacts").resolve().as_uri() if db else None

    @property
    def ui_url(self) -> str:
        return f"http://{self.ui.host}:{self.ui.port}"


def load_settings(path: Path | None = None) -> MlflowSettings:
    path = path or Path(os.environ.get("DISTILL_MLFLOW_CONFIG", SETTINGS_FILE))
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a YAML file")
    if not path.is_file():
        return MlflowSettings()
    raw = safe_yaml.load(path.read_text(), str(path)) or {}
    try:
        return MlflowSettings.model_validate(raw)
    except ValidationError as err:
        raise UserError(validation_message(err, f"{path}: key")) from None


def point_at(settings: MlflowSettings) -> None:
    """Point this process's MLflow (tracking and registry) at the configured store, once it
    answers; every command that reads or writes MLflow starts here."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    check_reachable(settings.tracking_uri)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.registry_uri)


def configure(settings: MlflowSettings) -> str:
    """Point MLflow at the configured store; return the experiment id (created if missing)."""
    import mlflow

    db = locks.sqlite_path(settings.tracking_uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(
                f"cannot create the tracking store {settings.tracking_uri}: {err.strerror}"
            ) from None
    point_at(settings)
    # the first touch creates tables and the experiment: one process at a time
    with locks.beside_store(settings.tracking_uri, "create"):
        experiment = mlflow.get_experiment_by_name(settings.tracking.experiment)
        if experiment is None:
            experiment_id = mlflow.create_experiment(
                settings.tracking.experiment, artifact_location=settings.artifact_location
            )
            experiment = mlflow.get_experiment(experiment_id)
    check_artifact_root(experiment.artifact_location)
    return experiment.experiment_id


def check_artifact_root(location: str | None) -> None:
    """A local artifact root must take files before a run starts, not fail at the first model."""
    if not location or not location.startswith("file:"):
        return  # a server or object store: its own errors, at upload
    from urllib.parse import unquote, urlparse

    path = Path(unquote(urlparse(location).path))
    probe = path / f".distill-write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"artifact location {location} is not writable: {err.strerror or err}"
        ) from None


def redact(uri: str) -> str:
    """`uri` without the password of its `user:password@` part (for messages and links)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """A tracking server that does not answer is one clear error, not minutes of retries."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)  # urllib takes no user:password@ in a URL; /health needs none
    plain = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    try:
        urllib.request.urlopen(f"{plain.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered (auth, proxies): reachable
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(
            f"MLflow tracking server {redact(uri)} is not reachable ({reason}); start "
            "it, or unset MLFLOW_TRACKING_URI to use the embedded store of mlflow.yaml"
        ) from None


def connect(settings: MlflowSettings) -> None:
    """Point MLflow at an existing store, for reading: a missing SQLite file is an error, not
    created."""
    db = locks.sqlite_path(settings.tracking_uri)
    if db is not None and not db.is_file():
        raise UserError(
            f"no MLflow store at {db} (tracking URI {settings.tracking_uri}); "
            "run `distill run` first"
        )
    point_at(settings)


def ui_server_command(settings: MlflowSettings, port: int | None = None) -> list[str]:
    """`mlflow server` on mlflow.yaml's ui host/port against the configured stores (for
    `distill ui`)."""
    if settings.tracking_uri.startswith(("http://", "https://")):
        raise UserError(
            f"tracking is already a server ({redact(settings.tracking_uri)}): open it in a browser"
        )
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        settings.ui.host,
        "--port",
        str(port or settings.ui.port),
        "--workers",
        "1",
        "--backend-store-uri",
        settings.tracking_uri,
    ]
    if settings.registry_uri != settings.tracking_uri:
        cmd += ["--registry-store-uri", settings.registry_uri]
    if settings.artifact_location:  # runs keep their own artifact URIs; this serves new uploads
        cmd += ["--artifacts-destination", settings.artifact_location]
    return cmd


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
            check=False,  # outside a git checkout: empty stdout, read as "unknown"
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _param_value(value: Any) -> str:
    return str(value)[:6000]  # MLflow's limit on a param value


def source_tags() -> dict[str, str]:
    """MLflow's own source tags (its UI shows the commit on the run page) and ours."""
    commit = git_commit()
    return {"mlflow.source.git.commit": commit, "distill.git_commit": commit}


@contextmanager
def parent_run(
    experiment_id: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    system_metrics: bool = True,
) -> Iterator[str]:
    """The pipeline's run: FINISHED on success, FAILED on error, KILLED on Ctrl-C. Params whose
    value is None are left out (an unset option is no parameter); `system_metrics`: CPU, memory
    and disk sampled while it runs (MLflow's System metrics tab; psutil)."""
    import mlflow

    run = mlflow.start_run(
        experiment_id=experiment_id,
        run_name=run_name,
        tags=tags,
        log_system_metrics=system_metrics,
    )
    status = "FAILED"
    try:
        mlflow.log_params({k: _param_value(v) for k, v in params.items() if v is not None})
        yield run.info.run_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status=status)


def set_description(run_id: str, markdown: str) -> None:
    """The run's description in the MLflow UI (the `mlflow.note.content` tag, markdown)."""
    from mlflow import MlflowClient

    MlflowClient().set_tag(run_id, "mlflow.note.content", markdown)


def _log_points(
    run_id: str,
    points: list[tuple[str, float, int]],
    params: dict[str, Any] | None = None,
    model_id: str | None = None,
) -> None:
    """(key, value, step) points and params in one `log_batch` (the client splits it into calls
    within MLflow's limits); `model_id` links the metrics to a logged model (its page in MLflow 3
    shows them)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    param_list = [Param(k, _param_value(v)) for k, v in (params or {}).items() if v is not None]
    metric_list = [
        Metric(key, float(value), now, step, model_id=model_id) for key, value, step in points
    ]
    if param_list or metric_list:
        MlflowClient().log_batch(run_id, metrics=metric_list, params=param_list)


def log_metrics(
    run_id: str,
    metrics: dict[str, float],
    step: int = 0,
    params: dict[str, Any] | None = None,
    model_id: str | None = None,
) -> None:
    _log_points(run_id, [(k, v, step) for k, v in metrics.items()], params, model_id)


def log_curves(run_id: str, curves: dict[str, list[float]]) -> None:
    """Step metrics (one point per epoch) under their own names, in the stage's run."""
    _log_points(
        run_id,
        [(name, v, step) for name, values in curves.items() for step, v in enumerate(values)],
    )


def prefixed(stage: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{stage}/{k}": v for k, v in metrics.items()}


@functools.lru_cache(maxsize=1024)
def _experiment_of(run_id: str) -> str:
    """The experiment of a run (run ids are unique across stores: safe to remember)."""
    from mlflow import MlflowClient

    return MlflowClient().get_run(run_id).info.experiment_id


def delete_stage_runs(parent_run_id: str, stage: str) -> int:
    """Delete the stage's earlier nested runs under this parent (a retried attempt's record)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    earlier = client.search_runs(
        [_experiment_of(parent_run_id)],
        filter_string=(
            f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`distill.stage` = '{stage}'"
        ),
    )
    for run in earlier:
        client.delete_run(run.info.run_id)
    return len(earlier)


@contextmanager
def stage_run(parent_run_id: str, stage: str, started: float | None = None) -> Iterator[str]:
    """A nested run for one stage, under the pipeline's parent run: FINISHED, FAILED on error,
    KILLED on Ctrl-C. Made with the client (explicit ids), not MLflow's thread-local active run.
    `started` (time.time()): when the stage's work began, so the run's duration in the UI is the
    stage's, not the time it took to log it."""
    from mlflow import MlflowClient

    client = MlflowClient()
    run_id = client.create_run(
        _experiment_of(parent_run_id),
        start_time=int(started * 1000) if started is not None else None,
        run_name=stage,
        tags={"mlflow.parentRunId": parent_run_id, "distill.stage": stage},
    ).info.run_id
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(run_id, status)


PIP_ONNX = ("onnx", "onnxruntime")


def _signature(example: Any, output: Any) -> Any:
    from mlflow.models import infer_signature

    return infer_signature(example, output)


def log_model(
    run_id: str, stage: str, model: Any, example: Any, params: dict[str, Any] | None = None
) -> str | None:
    """A stage's model in its run, as an MLflow 3 LoggedModel whose id is returned: PyTorch
    modules with `mlflow.pytorch` (pickled, so they load as their class; requirements pinned to
    skip inference), ONNX models with `mlflow.onnx`; the stage's params on it. TorchScript files
    go under `model/` as an artifact (no flavour serves them; no id)."""
    from importlib.metadata import version

    logged_params = {k: _param_value(v) for k, v in (params or {}).items() if v is not None}
    if getattr(model, "suffix", None) == ".onnx":
        import mlflow.onnx
        import onnx

        return mlflow.onnx.log_model(
            onnx.load_from_string(model.file_bytes),
            name=stage.replace("/", "_"),
            signature=_signature(example, model.predictor()(example)),
            run_id=run_id,
            params=logged_params,
            pip_requirements=[f"{p}=={version(p)}" for p in PIP_ONNX],
            save_as_external_data=False,
        ).model_id
    if hasattr(model, "file_bytes"):  # TorchScript
        from mlflow import MlflowClient

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{stage}{model.suffix}"
            path.write_bytes(model.file_bytes)
            MlflowClient().log_artifact(run_id, str(path), artifact_path="model")
        return None
    import mlflow.pytorch
    import torch

    with torch.no_grad():
        signature = _signature(example, model(torch.from_numpy(example)).numpy())
    info = mlflow.pytorch.log_model(
        model,
        name=stage.replace("/", "_"),
        serialization_format="pickle",
        signature=signature,
        run_id=run_id,
        params=logged_params,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )
    return info.model_id


def logged_model_of(experiment_id: str, digest: str) -> str | None:
    """The id of a model this experiment already holds with this content digest (tag
    `distill.model_digest`): a cached teacher is logged once, not again by every run."""
    from mlflow import MlflowClient

    found = MlflowClient().search_logged_models(
        [experiment_id],
        filter_string=f"tags.`distill.model_digest` = '{digest}'",
        max_results=1,
    )
    return found[0].model_id if found else None


def record_stage(
    parent_run_id: str,
    stage: str,
    metrics: dict[str, float],
    params: dict[str, Any] | None = None,
    curves: dict[str, list[float]] | None = None,
    model: Any = None,
    example: Any = None,
    replace: bool = False,
    started: float | None = None,
    model_digest: str | None = None,
) -> dict[str, float]:
    """One nested run for the stage (params, metrics, curves, model); returns its `STAGE/METRIC`
    metrics, which the flow puts on the parent run. In the stage's own run the metrics keep
    their plain names (`accuracy`), so the UI charts one key across stages.

    `started` (time.time() when the stage's work began): the run spans the work, and its
    `seconds` metric says how long it took. `model_digest`: a model the experiment already holds
    under that digest is not logged again; the run's tag `distill.logged_model_id` points to it.
    `replace` (a retried attempt): the earlier attempt's nested run is deleted first, so a stage
    is recorded once per parent."""
    if started is not None:
        metrics = metrics | {"seconds": time.time() - started}
    if replace:
        delete_stage_runs(parent_run_id, stage)
    with stage_run(parent_run_id, stage, started) as run_id:
        # the model first: MLflow links a run's existing metrics to a newly logged model by
        # reading each metric's history, one query per key; the metrics logged after name it
        model_id = None
        if model is not None and model_digest is not None:
            model_id = logged_model_of(_experiment_of(parent_run_id), model_digest)
            if model_id is not None:
                from mlflow import MlflowClient

                MlflowClient().set_tag(run_id, "distill.logged_model_id", model_id)
        if model is not None and model_id is None:
            model_id = log_model(run_id, stage, model, example, params)
            if model_id is not None and model_digest is not None:
                from mlflow import MlflowClient

                MlflowClient().set_logged_model_tags(
                    model_id, {"distill.model_digest": model_digest}
                )
        log_metrics(run_id, metrics, params=params, model_id=model_id)
        if curves:
            log_curves(run_id, curves)
    return prefixed(stage, metrics)


def log_run_inputs(
    config_yaml: str,
    config_path: Path | None,
    frame: Any,
    source: str,
    name: str,
    digest: str,
    rows: int | None = None,
) -> None:
    """On the active parent run: the resolved config, the file it came from, the dataset.
    `frame` may be the table's first rows only, `rows` the table's length (its profile)."""
    import mlflow
    import mlflow.data
    from mlflow.models import infer_signature

    mlflow.log_text(config_yaml, "config/resolved.yaml")
    if config_path is not None and config_path.is_file():
        mlflow.log_artifact(str(config_path), artifact_path="config")
    dataset = mlflow.data.from_pandas(
        frame, source=_dataset_source(source), targets="label", name=name, digest=digest
    )
    # the schema (column types) from a few rows: the same as from all of them for a typed frame,
    # without a pass over every cell (0.06-0.11 s on digits); `schema` is a cached_property
    dataset.__dict__["schema"] = infer_signature(frame.head(5)).inputs
    if rows is not None:  # the profile of the whole table, not of the rows given
        profile = {"num_rows": rows, "num_elements": rows * frame.shape[1]}
        dataset.__class__ = type("TableDataset", (type(dataset),), {"profile": profile})
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


def _ui_state_file(settings: MlflowSettings) -> Path | None:
    db = locks.sqlite_path(settings.tracking_uri)
    return db.parent / ".distill-ui.json" if db is not None else None


def record_ui(settings: MlflowSettings, url: str | None) -> None:
    """`distill ui` says where it serves this store (its --port may not be mlflow.yaml's), so
    `distill run` links to it; None: it stopped."""
    import json

    state = _ui_state_file(settings)
    if state is None:
        return
    try:
        if url is None:
            state.unlink(missing_ok=True)
        else:
            state.write_text(json.dumps({"url": url, "pid": os.getpid()}))
    except OSError:
        pass  # a link is a convenience: a read-only store folder goes without


def running_ui(settings: MlflowSettings) -> str | None:
    """The URL of a `distill ui` serving this store now, if one is (its process is alive)."""
    import json

    state = _ui_state_file(settings)
    try:
        recorded = json.loads(state.read_text()) if state is not None else None
        if recorded is None or reaper.started(int(recorded["pid"])) is None:
            return None
        return str(recorded["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ui_base_url(settings: MlflowSettings) -> str:
    """Where a person sees the runs: the tracking server itself, else the `distill ui` serving
    the store now, else where `distill ui` will (mlflow.yaml `ui`)."""
    uri = settings.tracking_uri
    if uri.startswith(("http://", "https://")):
        return redact(uri).rstrip("/")
    return running_ui(settings) or settings.ui_url


def run_url(settings: MlflowSettings, experiment_id: str, run_id: str) -> str:
    return f"{ui_base_url(settings)}/#/experiments/{experiment_id}/runs/{run_id}"


def run_metrics(run_id: str) -> dict[str, float]:
    from mlflow import MlflowClient

    return dict(MlflowClient().get_run(run_id).data.metrics)


# Transient tracking failures worth a retry: a locked SQLite file, an unreachable or busy server
# (INTERNAL_ERROR is MlflowException's default code, bugs included: not retried; MLflow's HTTP
# client already retries a server's 5xx answers itself).
TRANSIENT_ERROR_CODES = frozenset(
    {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED"}
)


def is_transient(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in TRANSIENT_ERROR_CODES
    # a network hiccup may pass; a full disk or a forbidden path does not (tasks/platform/errors.py)
    return isinstance(exc, (ConnectionError, TimeoutError)) or (
        isinstance(exc, OSError) and exc.errno not in WRITE_FAULTS
    )


def retry_on_tracking_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry a task that failed on tracking I/O, not on a bug."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 -- the task's own exception, re-raised by result()
        return is_transient(exc)
    return False


# -- runs whose process died -------------------------------------------------------------------
# A parent run is closed by `parent_run` on success, error or Ctrl-C; a process killed by
# SIGKILL (or the OOM killer, or a lost machine) closes nothing. Each parent carries the
# host and process that ran it; the next run in the experiment closes the dead ones.


def process_tags() -> dict[str, str]:
    """`distill.host`, `distill.pid`, `distill.process_start`: who runs this parent run."""
    pid = os.getpid()
    return {
        "distill.host": socket.gethostname(),
        "distill.pid": str(pid),
        "distill.process_start": reaper.started(pid) or "",
    }


def _process_gone(tags: dict[str, str]) -> bool | None:
    """True when the run's process is gone, False when alive, None when it ran elsewhere."""
    if (
        tags.get("distill.host") != socket.gethostname()
        or not tags.get("distill.pid", "").isdigit()
    ):
        return None
    started = reaper.started(int(tags["distill.pid"]))
    return started is None or (
        bool(started) and started != tags.get("distill.process_start", started)
    )


def _flow_run_finished(flow_run_id: str | None) -> bool:
    """The Prefect flow run is in a final state or unknown to this server."""
    if not flow_run_id:
        return False
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
    except ObjectNotFound:
        return True
    except Exception:  # noqa: BLE001 -- no reachable server: cannot tell
        return False
    return state is not None and state.is_final()


def _crash_flow_run(flow_run_id: str | None, message: str) -> None:
    if not flow_run_id:
        return
    from prefect import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
            if state is not None and not state.is_final():
                client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
    except Exception:  # noqa: BLE001, S110 -- Prefect client errors are many
        pass  # best effort: the MLflow record is what this function owns


def close_dead_runs(experiment_id: str) -> list[str]:
    """Mark FAILED the experiment's RUNNING distill parent runs (and their RUNNING stage runs)
    whose process is gone (same host) or whose Prefect flow run has finished (another host).
    A run on another host whose flow run Prefect still believes RUNNING is left alone: nothing
    tells a slow run from a dead one there. Returns the ids of the runs closed."""
    from mlflow import MlflowClient

    client = MlflowClient()
    running = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
    )
    parents = [
        r for r in running if "distill.pid" in r.data.tags and "distill.stage" not in r.data.tags
    ]
    closed = []
    for run in parents:
        tags = run.data.tags
        gone = _process_gone(tags)
        if gone is False or (
            gone is None and not _flow_run_finished(tags.get("prefect.flow_run_id"))
        ):
            continue
        reason = (
            f"process {tags.get('distill.pid')} on {tags.get('distill.host')} ended without "
            "closing the run (killed)"
        )
        for child in running:
            if child.data.tags.get("mlflow.parentRunId") == run.info.run_id:
                client.set_terminated(child.info.run_id, "FAILED")
        client.set_tag(run.info.run_id, "distill.end_reason", reason)
        client.set_terminated(run.info.run_id, "FAILED")
        if gone:
            _crash_flow_run(tags.get("prefect.flow_run_id"), reason)
        closed.append(run.info.run_id)
    return closed
