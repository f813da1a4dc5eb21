"""MLflow conventions for the runs, in one place: what they are called, which keys they use.

- One parent run per pipeline run, named by what differs (`digits · target 20 KB`), its
  description (`mlflow.note.content`) the stage table; one nested run per stage, opened when
  the stage's work began. A stage's run holds plain keys (`accuracy`, `seconds`, curves as
  step metrics `val_accuracy`), so one chart compares a key across stages; the parent holds
  them as `STAGE/METRIC` (the flow writes them in one batch at the end), so parent runs
  compare side by side. A stage's model is logged before its metrics, which then name it.
- Run ids are passed explicitly (MLflow's active run is thread-local); stage runs are made
  with the client, not the fluent API's active-run stack.

Where the runs go (`mlflow.yaml`, connecting) is tasks/platform/store.py.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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
        close_open_stage_runs(run.info.run_id, status)
        raise
    except SystemExit:  # SIGTERM (flows/process.py's exit_on_signals)
        close_open_stage_runs(run.info.run_id, status)
        raise
    finally:
        mlflow.end_run(status=status)


def close_open_stage_runs(parent_run_id: str, status: str) -> None:
    """Nested runs of the parent still RUNNING end `status`: a signal can land after a stage run
    was created and before `stage_run` closes it (in `create_run`'s return, or inside
    `set_terminated`), which left it RUNNING under a KILLED parent. Best effort: an unreachable
    store must not hide the signal."""
    from mlflow import MlflowClient

    try:
        client = MlflowClient()
        for run in nested_runs(parent_run_id, "attributes.status = 'RUNNING'"):
            client.set_terminated(run.info.run_id, status)
    except Exception:  # noqa: BLE001 -- the signal's unwinding goes on regardless
        return


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


def nested_runs(parent_run_id: str, where: str) -> list[Any]:
    """The parent's nested runs that also match `where` (MLflow's filter syntax)."""
    from mlflow import MlflowClient

    return MlflowClient().search_runs(
        [_experiment_of(parent_run_id)],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and {where}",
    )


def delete_stage_runs(parent_run_id: str, stage: str) -> int:
    """Delete the stage's earlier nested runs under this parent (a retried attempt's record)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    earlier = nested_runs(parent_run_id, f"tags.`distill.stage` = '{stage}'")
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


ERROR_FILE = "error.txt"


def record_failure(
    parent_run_id: str, stage: str, line: str, trace: str, started: float | None = None
) -> str:
    """A failed stage as a FAILED nested run whose description (`mlflow.note.content`) is the
    one line the user read and whose artifact `error.txt` holds the line and the full trace;
    the parent gets the same description and `error.txt` (it ends FAILED as the error leaves
    it). Returns the stage run's id."""
    from mlflow import MlflowClient

    client = MlflowClient()
    text = f"{line}\n\n{trace}"
    run_id = client.create_run(
        _experiment_of(parent_run_id),
        start_time=int(started * 1000) if started is not None else None,
        run_name=stage,
        tags={
            "mlflow.parentRunId": parent_run_id,
            "distill.stage": stage,
            "distill.error": line[:5000],
            "mlflow.note.content": line,
        },
    ).info.run_id
    try:
        client.log_text(run_id, text, ERROR_FILE)
    finally:
        client.set_terminated(run_id, "FAILED")
    client.set_tag(parent_run_id, "mlflow.note.content", line)
    client.set_tag(parent_run_id, "distill.error", line[:5000])
    client.log_text(parent_run_id, text, ERROR_FILE)
    return run_id


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
    with warnings.catch_warnings():  # a file URI matches MLflow's two same-named local sources
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
        dataset = mlflow.data.from_pandas(
            frame, source=_dataset_source(source), targets="label", name=name, digest=digest
        )
    # the schema (column types) from a few rows: the same as from all of them for a typed frame,
    # without a pass over every cell (0.06-0.11 s on digits); `schema` is a cached_property
    dataset.__dict__["schema"] = infer_signature(frame.head(5)).inputs
    if rows is not None:  # the profile of the whole table, not of the rows given
        profile = {"num_rows": rows, "num_elements": rows * frame.shape[1]}
        dataset.__class__ = type("TableDataset", (type(dataset),), {"profile": profile})
    log_dataset(dataset)


def log_dataset(dataset: Any) -> None:
    """`mlflow.log_input` on the active run, once more where another run inserted the same
    dataset between its check and its insert: MLflow's SQL store looks the dataset (experiment,
    name, digest) up, then inserts it, so two runs logging one dataset at once (a sweep's
    variants in threads) fail one insert on the unique key; the second try finds the row and
    links it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.log_input(dataset, context="training")
    except MlflowException as err:
        if "unique" not in str(err).lower():
            raise
        mlflow.log_input(dataset, context="training")


def _dataset_source(source: str) -> Any:
    kind, _, ref = source.partition(":")
    if kind in ("csv", "parquet", "npz"):
        return Path(ref).resolve().as_uri()
    from mlflow.data.code_dataset_source import CodeDatasetSource

    return CodeDatasetSource(tags={"source": source})


def log_directory(run_id: str, path: str | Path, artifact_path: str) -> None:
    """Every file under `path` as artifacts of the run under `artifact_path/`."""
    from mlflow import MlflowClient

    MlflowClient().log_artifacts(run_id, str(path), artifact_path=artifact_path)


def log_note(run_id: str, text: str, artifact_file: str) -> None:
    from mlflow import MlflowClient

    MlflowClient().log_text(run_id, text, artifact_file)


def log_figure(run_id: str, figure: Any, artifact_file: str) -> str:
    """A matplotlib figure as a PNG artifact of the run; returns its artifact path."""
    from mlflow import MlflowClient

    MlflowClient().log_figure(run_id, figure, artifact_file, save_kwargs={"dpi": 100})
    return artifact_file


def run_metrics(run_id: str) -> dict[str, float]:
    from mlflow import MlflowClient

    return dict(MlflowClient().get_run(run_id).data.metrics)


def process_tags() -> dict[str, str]:
    """`distill.host`, `distill.pid`, `distill.process_start`: who runs this parent run (the next
    run closes it FAILED once that process is gone: tasks/platform/dead_runs.py)."""
    from distill.tasks.platform import reaper

    pid = os.getpid()
    return {
        "distill.host": socket.gethostname(),
        "distill.pid": str(pid),
        "distill.process_start": reaper.started(pid) or "",
    }
