"""Stage 8 — register: the final model into the MLflow model registry, alias `challenger`.

The registered model is a pyfunc (tasks/release/serving_model.py) that carries the ONNX model, the
training-time encoding of text columns and empty cells (as JSON data, rebuilt with
scikit-learn by tasks/compress/tabular.py, which ships as the model's code) and the standardization,
so `mlflow.pyfunc.load_model("models:/NAME@challenger")` predicts from what the user has: their
own array in its shape and dtype where the features are numbers (a tensor signature: an npz's X,
a numeric table's rows, token ids), or the raw table with text columns, its signature naming the
raw columns and their types (tasks/release/signature.py says which). It
answers a `prediction` column (the class label) and `proba_<label>` columns, or, for a regression
target, `prediction` alone in the label's units (the training-time target mean and scale undone).
Lineage goes on the version as tags.

Registration is all-or-nothing: the version is created with its lineage and
`distill.complete=false`, gets alias `challenger`, and only then `distill.complete=true`. If
anything fails in between, the version is deleted; if the process is killed (SIGKILL, OOM),
the version keeps `false`: `distill promote` refuses it and the next `distill run` deletes it
(and a registered model the killed run created and left empty), once its run is not RUNNING.
`promote` also loads a version before an alias moves to it (`check_promotable`).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from distill.tasks.compress import tabular
from distill.tasks.compress.data import Dataset
from distill.tasks.compress.evaluate import OnnxModel, TorchScriptModel
from distill.tasks.platform.caching import directory_sha256, file_sha256
from distill.tasks.platform.errors import UserError
from distill.tasks.release.aliases import CHALLENGER
from distill.tasks.release.signature import FEATURES, example_rows, tensor_input

SERVING_MODEL = Path(__file__).with_name("serving_model.py")
TABULAR = Path(tabular.__file__)  # imported by the served model as `tabular`
COMPLETE = "distill.complete"  # version tag: "false" until the registration finished
CREATED_BY = "distill.created_by_run"  # registered model tag: the run that created it


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    model_uri: str  # models:/NAME/VERSION
    model_id: (
        str  # the LoggedModel behind the version (MLflow 3): the parent's final metrics name it
    )


def raw_features(data: Dataset, X: np.ndarray) -> pd.DataFrame:
    """Standardized rows back to the user's raw feature columns."""
    return pd.DataFrame(X.astype(np.float64) * data.scale + data.mean, columns=data.feature_names)


def _requirements(runtime: str, sklearn: bool) -> list[str]:
    from importlib.metadata import version

    return [
        f"mlflow=={version('mlflow')}",
        f"{runtime}=={version(runtime).split('+')[0]}",
        f"numpy=={version('numpy')}",
        f"pandas=={version('pandas')}",
    ] + ([f"scikit-learn=={version('scikit-learn')}"] if sklearn else [])


def raw_schema(encoding: dict) -> Any:
    """The served model's input: every raw column by name, numbers as double, text as string."""
    from mlflow.types import ColSpec, DataType, Schema

    return Schema(
        [
            ColSpec(DataType.double if c["kind"] == "numeric" else DataType.string, c["name"])
            for c in encoding["columns"]
        ]
    )


MODEL_DESCRIPTION = (
    "Students compressed by distill (teacher -> reduce -> reconstruct -> fine-tune -> prune -> "
    "quantize), served by `mlflow.pyfunc` from the user's own array of numbers (a tensor "
    "signature) or, for tables with text columns, the raw columns: `prediction` and one "
    "`proba_<class>` column per class. Alias `champion`: the version `distill promote` let "
    "through its gates; `challenger`: the newest candidate (a sweep's best variant). Each "
    "version's tags hold its lineage (`mlflow.run_id`, config hash, dataset digest, git commit)."
)


def register_model(
    model: OnnxModel | TorchScriptModel,
    data: Dataset,
    model_name: str,
    tags: dict[str, str],
    challenger: bool = True,
    description: str | None = None,
) -> Registered:
    """Log the pyfunc on the active (parent) run, register it with its tags and `description`,
    alias it `challenger` (unless not `challenger`: a sweep's variant)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import ModelSignature, infer_signature

    from distill.tasks.compress.tabular import needs_sklearn

    tensor = tensor_input(data, model)
    with tempfile.TemporaryDirectory() as tmp:
        model_path, meta_path = Path(tmp) / f"model{model.suffix}", Path(tmp) / "preprocess.json"
        model_path.write_bytes(model.file_bytes)
        meta_path.write_text(
            json.dumps(
                {
                    "input": "columns" if tensor is None else "tensor",
                    "features": data.feature_names,
                    "encoding": data.encoding,
                    "mean": data.mean.tolist(),
                    # what the model's input takes: float32, or int64 token ids
                    "dtype": "int64" if data.X_test.dtype.kind in "iu" else "float32",
                    "scale": data.scale.tolist(),
                    "classes": data.classes,
                    "task": data.task,
                    "target_mean": data.target_mean,
                    "target_scale": data.target_scale,
                }
            )
        )
        example = example_rows(data, tensor)
        output = (
            pd.DataFrame({"prediction": np.zeros(5, dtype=np.float64)})
            if data.is_regression
            else pd.DataFrame(
                {"prediction": np.asarray(data.classes)[:1].repeat(5)}
                | {f"proba_{c}": np.zeros(5) for c in data.classes}
            )
        )
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SERVING_MODEL),
            artifacts={model.artifact: str(model_path), "preprocess": str(meta_path)},
            code_paths=[str(TABULAR)],
            signature=ModelSignature(
                raw_schema(data.encoding) if tensor is None else tensor.schema(),
                infer_signature(model_output=output).outputs,
            ),
            input_example=example,
            metadata={FEATURES: tensor.features} if tensor and tensor.features else None,
            pip_requirements=_requirements(model.runtime, needs_sklearn(data.encoding)),
        )
    client = MlflowClient()
    _create_registered_model(client, model_name, tags.get("mlflow.run_id", ""))
    # the version is created with its lineage tags (one write, not one per tag); MLflow's own
    # lines ("Registered model ... already exists", "Created version ...") are not printed:
    # the model was created just above, and distill says what it registered
    with _mlflow_event_lines_off():
        version = str(
            mlflow.register_model(
                info.model_uri, model_name, tags=tags | {COMPLETE: "false"}
            ).version
        )
    try:
        if description:
            client.update_model_version(model_name, version, description=description)
        if challenger:
            client.set_registered_model_alias(model_name, CHALLENGER, version)
        client.set_model_version_tag(model_name, version, COMPLETE, "true")  # last
    except BaseException:  # an error, or Ctrl-C: no half-registered version
        client.delete_model_version(model_name, version)
        raise
    return Registered(model_name, version, f"models:/{model_name}/{version}", info.model_id)


@contextlib.contextmanager
def _mlflow_event_lines_off() -> Iterator[None]:
    from mlflow.utils.logging_utils import MLFLOW_LOGGING_STREAM

    before = MLFLOW_LOGGING_STREAM.enabled
    MLFLOW_LOGGING_STREAM.enabled = False
    try:
        yield
    finally:
        MLFLOW_LOGGING_STREAM.enabled = before


def _create_registered_model(client: Any, name: str, run_id: str) -> None:
    """Create the registered model if it does not exist, tagged with the run creating it (an
    empty one a killed run left behind is then known as ours)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name, tags={CREATED_BY: run_id}, description=MODEL_DESCRIPTION
        )
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _run_alive(client: Any, run_id: str | None) -> bool:
    """The run may still be registering (RUNNING, not deleted)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return False
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return False
    return run.info.status == "RUNNING" and run.info.lifecycle_stage != "deleted"


def remove_incomplete_registrations() -> list[str]:
    """Delete versions whose registration never finished (`distill.complete=false`, their run no
    longer RUNNING: killed mid-registration), then registered models created by a distill run
    that is no longer RUNNING and left without versions. Returns what was deleted
    (`NAME/VERSION`, `NAME`). Call after `dead_runs.close_dead_runs`."""
    from mlflow import MlflowClient

    client = MlflowClient()
    removed = []
    for mv in client.search_model_versions(filter_string=f"tags.`{COMPLETE}` = 'false'"):
        if not _run_alive(client, mv.tags.get("mlflow.run_id") or mv.run_id):
            client.delete_model_version(mv.name, mv.version)
            removed.append(f"{mv.name}/{mv.version}")
    for model in client.search_registered_models(filter_string=f"tags.`{CREATED_BY}` != ''"):
        if _run_alive(client, model.tags.get(CREATED_BY)):
            continue
        if not client.search_model_versions(filter_string=f"name = '{model.name}'", max_results=1):
            client.delete_registered_model(model.name)
            removed.append(model.name)
    return removed


def check_promotable(name: str, version: str) -> None:
    """Before an alias moves to a version: its registration finished, its run exists and
    FINISHED, and its model loads (artifacts present). One UserError saying which fails."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    label = f"{name} version {version}"
    mv = client.get_model_version(name, version)
    run_id = mv.tags.get("mlflow.run_id") or mv.run_id
    if mv.tags.get(COMPLETE) == "false":
        raise UserError(
            f"{label} is an unfinished registration (run {run_id} stopped while "
            "registering it): not promoted; the next `distill run` removes it"
        )
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise UserError(f"{label}: its MLflow run {run_id} is gone: not promoted") from None
        if run.info.lifecycle_stage == "deleted":
            raise UserError(f"{label}: its MLflow run {run_id} was deleted: not promoted")
        if run.info.status != "FINISHED":
            raise UserError(
                f"{label}: its MLflow run {run_id} ended {run.info.status}, not "
                "FINISHED: not promoted"
            )
    load_version(name, version)


def load_version(name: str, version: str) -> Any:
    """The version's pyfunc, or one UserError saying why it does not load (artifacts gone)."""
    import mlflow.pyfunc

    try:
        return mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    except Exception as err:  # noqa: BLE001 -- whatever stops it loading stops the promotion
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise UserError(f"{name} version {version} does not load ({first}): not promoted") from None


def teacher_lineage(source: str) -> dict[str, str]:
    """Pin down where the teacher came from: a file's sha256, an alias resolved to its version.

    Best effort before the teacher loads: a missing file or alias adds nothing here, and the
    teacher stage reports it with its own one-line error.
    """
    tags = {"distill.teacher_source": source}
    if source.startswith("file:"):
        path = Path(source.removeprefix("file:"))
        if path.is_file():
            tags["distill.teacher_sha256"] = file_sha256(path)
    elif source.startswith("hf:"):  # a save_pretrained directory: its config and weights
        path = Path(source.removeprefix("hf:"))
        if path.is_dir():
            tags["distill.teacher_sha256"] = directory_sha256(path)
    elif source.startswith("models:/") and "@" in source:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        name, _, alias = source.removeprefix("models:/").partition("@")
        try:
            version = MlflowClient().get_model_version_by_alias(name, alias)
        except MlflowException:
            return tags
        tags["distill.teacher_uri"] = f"models:/{name}/{version.version}"
        if version.run_id:
            tags["distill.teacher_run_id"] = version.run_id
    elif source.startswith("runs:/"):
        tags["distill.teacher_run_id"] = source.removeprefix("runs:/").split("/", 1)[0]
    return tags
