"""The MLflow store: where tracking and the registry live, connecting to them, and where a
person sees the runs.

- `mlflow.yaml` (ours; MLflow reads no such file) says where tracking and the registry
  live; `MLFLOW_TRACKING_URI` in the environment overrides it.
- `configure` points MLflow at the store for writing (creating a SQLite store and the
  experiment), `connect` at an existing one for reading; a server that does not answer is one
  clear error.
- The UI: `distill ui` serves the store (`ui_server_command`) and says where (`record_ui`), so a
  run links to its page (`run_url`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pydantic import Field, ValidationError

from distill.tasks.platform import locks, reaper, safe_yaml
from distill.tasks.platform.config import Strict, validation_message
from distill.tasks.platform.errors import UserError

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


def ensure_writable(folder: Path) -> None:
    """`folder` exists (made if missing) and takes a file: OSError if not."""
    probe = folder / f".distill-write-probe-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b"probe")
    probe.unlink()


def check_artifact_root(location: str | None) -> None:
    """A local artifact root must take files before a run starts, not fail at the first model."""
    if not location or not location.startswith("file:"):
        return  # a server or object store: its own errors, at upload
    from urllib.parse import unquote, urlparse

    try:
        ensure_writable(Path(unquote(urlparse(location).path)))
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
