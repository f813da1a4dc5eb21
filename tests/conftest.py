"""Shared fixtures: quiet offline settings, one Prefect test server for the session, and a
fresh MLflow store (SQLite + artifacts under tmp_path) for every test that tracks."""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Before anything imports prefect or mlflow.
_HOME = tempfile.mkdtemp(prefix="distill-tests-")
os.environ.update(
    {
        "PREFECT_HOME": os.path.join(_HOME, "prefect"),
        "DO_NOT_TRACK": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_TO_API_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_LOGGING_LEVEL": "ERROR",
        # idle OpenMP threads sleep instead of spinning: on 2 busy cores torch's spinning
        # threads made a tiny teacher's step 25-40 ms instead of 3-4 ms (benchmarks/scale.py)
        "OMP_WAIT_POLICY": "PASSIVE",
    }
)
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs 2 workers on 2 cores: 1 thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from distill.tasks.compress.data import Dataset, load_dataset  # noqa: E402 -- likewise
from distill.tasks.platform.config import PipelineConfig, build_config  # noqa: E402 -- after the environment above

ROOT = Path(__file__).resolve().parents[1]

TINY = [  # a full pipeline in seconds: small teacher, few epochs, few latency repeats
    "teacher.hidden=[64, 64]",
    "teacher.epochs=8",
    "reduce.budget.size_kb=12",
    "reduce.calibration_samples=256",
    "finetune.epochs=3",
    "compress.prune.recovery_epochs=1",
    "evaluate.latency_repeats=3",
    "evaluate.large_batch=32",
    "target=null",  # hand-sized stages; tests/compress/test_target.py runs targets
    "evaluate.plots=false",  # matplotlib and t-SNE: ~2 s of a run; the tests of plots turn them on
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files run by their number of slow tests, then by their number of tests, most first.
    `make test` hands whole files to two workers in this order (`--dist loadfile
    --no-loadscope-reorder`; xdist's own order, by number of tests alone, handed the files of a
    few minute-long tests out last, and one worker ran them alone at the end)."""
    slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
    count = collections.Counter(item.path for item in items)
    items.sort(key=lambda item: (-slow[item.path], -count[item.path]))  # stable within a file


_TEST_SERVER: dict[str, Any] = {}  # this process's Prefect test server: "process", "url"


def pytest_configure(config: pytest.Config) -> None:
    """Start this process's Prefect test server now, while pytest collects (imports torch,
    MLflow, Prefect: seconds), and put its URL in the environment before anything imports
    Prefect: this process's flows and the `distill` processes tests start use it; each would
    otherwise start and stop a temporary server of its own, seconds of CPU each. (Tests of the
    temporary server remove PREFECT_API_URL.) The xdist controller runs no test: no server."""
    if getattr(config, "workerinput", None) is None and getattr(
        config.option, "numprocesses", None
    ):
        return
    from distill.tasks.platform import reaper
    from distill.tasks.platform.held_port import hold_port, serve_on

    # a port held from before uvicorn starts: with Prefect's own launch, two servers starting
    # together on one port left one process talking to the other's server, and "connection
    # refused" once that one stopped (tasks/platform/held_port.py)
    sock = hold_port()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/api"
    os.environ["PREFECT_API_URL"] = url
    database = f"sqlite+aiosqlite:///{_HOME}/prefect-test-server.db"  # not PREFECT_HOME's
    process = serve_on(sock, {"PREFECT_SERVER_DATABASE_CONNECTION_URL": database})
    reaper.watch(process.pid)  # gone with this process, however it ends
    _TEST_SERVER.update(process=process, url=url)


def pytest_unconfigure(config: pytest.Config) -> None:
    process = _TEST_SERVER.get("process")
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> Iterator[str]:
    """This process's Prefect test server (pytest_configure), once it answers: its API URL.
    In-process temporary servers (none is needed while PREFECT_API_URL is set) would listen on
    held ports too."""
    import time
    import urllib.request

    from prefect.server.api.server import SubprocessASGIServer

    from distill.tasks.platform.held_port import launch_on_held_port

    process, url = _TEST_SERVER["process"], _TEST_SERVER["url"]
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=5).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the Prefect test server did not start (exit code {process.poll()})"
                ) from None
            time.sleep(0.2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SubprocessASGIServer, "_run_uvicorn_command", launch_on_held_port)
        yield url


# Where MLflow puts the artifacts of experiments made without an artifact location (a new store's
# Default experiment, `mlflow.start_run()` in a test): `./mlruns` of the working directory, the
# repository's, unless this variable (MLflow 3's, private) names another root.
ARTIFACT_ROOT_VAR = "_MLFLOW_SERVER_ARTIFACT_ROOT"


def point_mlflow_at(directory: Path, mp: pytest.MonkeyPatch) -> str:
    """MLflow (environment and this process's URIs) on the SQLite store in `directory`, without
    an mlflow.yaml; `mp` restores the environment. Returns the URI."""
    import mlflow

    uri = f"sqlite:///{directory}/mlflow.db"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("MLFLOW_REGISTRY_URI", uri)  # mlflow.set_registry_uri writes it: restore after
    mp.setenv("DISTILL_MLFLOW_CONFIG", str(directory / "absent-mlflow.yaml"))
    mp.setenv(ARTIFACT_ROOT_VAR, str(directory / "mlruns"))
    mlflow.set_tracking_uri(uri)  # a URI set by an earlier test would win over the environment
    mlflow.set_registry_uri(uri)
    return uri


def end_active_runs() -> None:
    import mlflow

    while mlflow.active_run():
        mlflow.end_run()


@contextlib.contextmanager
def use_store(directory: Path) -> Iterator[str]:
    """`point_mlflow_at` for a block: in module-scoped fixtures that share one store (and in each
    test that reads it, since another test may have pointed MLflow elsewhere meanwhile)."""
    with pytest.MonkeyPatch.context() as mp:
        try:
            yield point_mlflow_at(directory, mp)
        finally:
            end_active_runs()


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh store for this test."""
    yield point_mlflow_at(tmp_path, monkeypatch)
    end_active_runs()


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_dataset(PipelineConfig().data, seed=0)


@pytest.fixture
def tiny_config() -> PipelineConfig:
    return build_config({}, TINY)


def fresh_process(
    cwd: Path,
    *args: str,
    code: str | None = None,
    store: str | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """`distill ARGS` (or `python -c CODE`) in a new process in `cwd`, where nothing of this test
    process is loaded, with this environment (`store`: tracking and registry URI)."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if store is not None:
        env |= {"MLFLOW_TRACKING_URI": store, "MLFLOW_REGISTRY_URI": store}
    command = (
        [sys.executable, "-c", code] if code else [sys.executable, "-m", "distill.flows.cli", *args]
    )
    return subprocess.run(
        command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def child_runs(client, parent_id):
    """The nested runs under a parent run (its stage runs)."""
    experiment_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
