"""distill from Python: compress a model in a notebook, no server, nothing written unless asked.

    import distill

    result = distill.compress(my_mlp, train=(X, y), test=(X_test, y_test),
                              target={"ratio": 10, "max_accuracy_drop": 0.02})
    result.metrics["accuracy"], result.metrics["size_kb"], result.served.predict(X_test[:5])

`compress` runs the pipeline's stages as plain functions (tasks/compress/pipeline.py): no Prefect,
and no MLflow unless `track=` (or `MLFLOW_TRACKING_URI`) names a store, where the run is recorded
as the CLI records it (a parent run, a nested run per stage). With `orchestrate=True` the stages
are Prefect task runs of one flow run, as `distill run` makes them: cached by content (a second
call with the same teacher, rows and settings reuses them), seen in Prefect's UI; the API is
PREFECT_API_URL's, else a temporary local server. The arrays go to a temporary npz that is
removed when it returns. `run` is what `distill run` does: a config file through the Prefect
flow, recorded and registered.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd
from torch import nn

from distill.tasks.compress.data import Dataset, load_dataset
from distill.tasks.compress.evaluate import OnnxModel, TorchScriptModel
from distill.tasks.compress.finetune import History
from distill.tasks.compress.pipeline import PLAIN_STEPS, Outcome, Recorder, Steps
from distill.tasks.compress.pipeline import compress as run_pipeline
from distill.tasks.compress.recipe import recipe_for, with_recipe
from distill.tasks.compress.teacher import GIVEN, given_teacher
from distill.tasks.platform.config import PipelineConfig, build_config, merge
from distill.tasks.platform.errors import UserError

if TYPE_CHECKING:
    from distill.tasks.release.recorder import TrackingRecorder

_SCHEMES = ("hf:", "file:", "models:/", "runs:/", "train")
_LABEL, _SPLIT = "__label__", "__split__"  # the columns a DataFrame's rows are written with

Pair = tuple[Any, Any]  # (X, y): arrays, tensors, lists, or a DataFrame and a Series


@dataclass
class Served:
    """The model that ships (ONNX or TorchScript), with what its callers need: `predict(X)` takes
    rows as the teacher took them (an ndarray or tensor, or a DataFrame of the training
    columns' numbers) and gives the labels (classification) or the values (regression)."""

    model: OnnxModel | TorchScriptModel
    classes: list
    mean: np.ndarray
    scale: np.ndarray
    integer_input: bool  # token ids: given as int64, never standardized
    regression: bool
    target_mean: float = 0.0
    target_scale: float = 1.0
    _predict: Any = field(default=None, repr=False)

    @classmethod
    def of(cls, model: OnnxModel | TorchScriptModel, data: Dataset) -> Served:
        return cls(
            model,
            list(data.classes),
            np.asarray(data.mean, dtype=np.float64),
            np.asarray(data.scale, dtype=np.float64),
            data.X_test.dtype.kind in "iu",
            data.is_regression,
            data.target_mean,
            data.target_scale,
        )

    @property
    def format(self) -> str:
        return self.model.runtime

    @property
    def size_kb(self) -> float:
        return len(self.model.file_bytes) / 1024

    def save(self, path: str | Path) -> Path:
        """The served file (`.onnx` or `.pt`), as the registry would get it."""
        path = Path(path)
        path.write_bytes(self.model.file_bytes)
        return path

    def outputs(self, X: Any) -> np.ndarray:
        """The model's raw outputs (logits; a regression's standardized value) for rows `X`."""
        rows = _array(X)
        rows = rows.reshape(len(rows), -1)
        if self.integer_input:
            z = rows.astype(np.int64)
        else:
            z = ((rows.astype(np.float64) - self.mean) / self.scale).astype(np.float32)
        if self._predict is None:
            self._predict = self.model.predictor()
        return np.asarray(self._predict(z))

    def predict(self, X: Any) -> np.ndarray:
        out = self.outputs(X).astype(np.float64)
        if self.regression:
            return out[:, 0] * self.target_scale + self.target_mean
        return np.asarray(self.classes)[out.argmax(axis=1)]

    __call__ = predict


@dataclass
class Result:
    """What `compress` returns.

    - `student`: the float student (an nn.Module taking the teacher's inputs);
    - `served`: the model that ships (`Served`: its file, `predict`);
    - `metrics`: the shipped model's test metrics (accuracy or R², size_kb, latency_ms_b1, ...),
      `compression_ratio` and the drop vs the teacher, and `stages`: each stage's metrics;
    - `record`: the MLflow parent run id when tracked, else None;
    - `target`: the verdict line of a `target` (met or not), else None (where a target's search
      ships another build than the reconstructed and finetuned stages' student,
      `outcome.target.fitted.lineage` says which each is);
    - `outcome`: everything the pipeline returned (each stage's model, curves, the plan);
    - `frontier`: a drop-only target's candidates (`target={"max_accuracy_drop": 0.01}`: the
      smallest served file within the drop), one dict each (params, size_kb, val_score, drop,
      latency_ms_b1, status: kept / rolled back / shipped), else None."""

    student: nn.Module
    served: Served
    metrics: dict[str, Any]
    record: str | None
    target: str | None
    target_met: bool | None
    outcome: Outcome = field(repr=False)
    frontier: list[dict[str, object]] | None = None


def compress(
    teacher: nn.Module | str | Path,
    train: Pair,
    test: Pair,
    val: Pair | None = None,
    target: Mapping[str, Any] | None = None,
    *,
    track: str | None = None,
    experiment: str = "distill",
    seed: int = 0,
    device: str = "cpu",
    orchestrate: bool = False,
    **settings: Any,
) -> Result:
    """Compress `teacher` on the rows given; see the module's docstring.

    `teacher`: an nn.Module (its inputs as given: never standardized), a save_pretrained
    directory or `hf:DIR`, `file:PATH`, or a `models:/NAME@ALIAS` URI. `val`: rows for the
    target's guard and for early stopping (default: carved from `train`, `data.val_size`).
    `target`: e.g. `{"size_kb": 30}`, `{"ratio": 10, "max_accuracy_drop": 0.01}` (the config's
    `target:` section), or `{"max_accuracy_drop": 0.01}` alone: the smallest served file within
    that drop; without one the stages are sized by `reduce.budget` (default: 4x fewer
    parameters). `settings`: config sections as keywords (`finetune={"epochs": 5}`), or dotted
    keys (`**{"compress.prune.amount": 0.5}`), as in a config file. `track`: an MLflow tracking
    URI to record the run in (default: `MLFLOW_TRACKING_URI` if set; else nothing is recorded).
    `orchestrate`: the stages as cached Prefect task runs of a flow run `distill-compress`.
    Bad input raises `distill.UserError` with one line naming the key, array or column."""
    given = teacher if isinstance(teacher, nn.Module) else None
    raw: dict[str, Any] = {"seed": seed, "device": device, "target": dict(target or {}) or None}
    raw = merge(raw, {"teacher": {"source": _teacher_source(teacher)}})
    for key, value in settings.items():
        raw = merge(raw, _nested(key, value))
    if raw["target"] is None and "budget" not in raw.get("reduce", {}):
        raw = merge(raw, {"reduce": {"budget": {"ratio": 4}}})
    with tempfile.TemporaryDirectory(prefix="distill-") as tmp:
        raw = merge(raw, {"data": _write_rows(Path(tmp), train, test, val)})
        cfg = build_config(raw)
        if given is not None:  # finetune keys left out: its family's recipe, recorded as such
            cfg = with_recipe(cfg, recipe_for(given))
        data = load_dataset(cfg.data, cfg.seed)
        steps = _steps(orchestrate)
        if given is not None:
            steps = replace(steps, teacher=_given(given))
        uri = track or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            outcome, run_id = _tracked(cfg, data, steps, uri, experiment, orchestrate)
        else:
            pipeline = partial(run_pipeline, cfg, data, steps, Recorder())
            outcome, run_id = (_in_flow(pipeline) if orchestrate else pipeline()), None
    return _result(outcome, data, run_id)


def run(config: str | Path, overrides: Sequence[str] = (), promote: bool = False) -> Any:
    """`distill run CONFIG --set KEY=VALUE ...`: the config through the Prefect flow (a temporary
    local API unless PREFECT_API_URL is set), recorded in MLflow and registered as configured.
    Returns the run's summary (run id, metrics per stage, registered version)."""
    from distill.flows.distill import distill_flow

    return distill_flow(str(config), list(overrides), promote=promote)


def _steps(orchestrate: bool) -> Steps:
    if not orchestrate:
        return PLAIN_STEPS
    from distill.flows.stages import PREFECT_STEPS

    return PREFECT_STEPS


T = TypeVar("T")


def _in_flow(call: Callable[[], T]) -> T:
    """`call()` as the body of a Prefect flow run `distill-compress`: the stages it calls through
    PREFECT_STEPS are its task runs. Without PREFECT_API_URL, Prefect's temporary server starts
    now (in a thread, while nothing else waits on it) and dies with this process."""
    from prefect import flow

    from distill.flows.process import start_prefect_server_early

    start_prefect_server_early()()

    def distill_compress() -> T:
        return call()

    return flow(name="distill-compress", log_prints=False, validate_parameters=False)(
        distill_compress
    )()


def _given(module: nn.Module) -> Callable[..., tuple[nn.Module, History]]:
    """The teacher step for a module handed over (teacher_with_history's signature)."""

    def teacher_step(cfg: Any, data: Dataset, *_: Any) -> tuple[nn.Module, History]:
        return given_teacher(module, data, cfg.hf_loadable), History()

    return teacher_step


def _teacher_source(teacher: nn.Module | str | Path) -> str:
    if isinstance(teacher, nn.Module):
        return GIVEN + type(teacher).__qualname__
    text = str(teacher)
    if isinstance(teacher, str) and text.startswith(_SCHEMES):
        return text
    path = Path(text)
    if path.is_dir() and (path / "config.json").is_file():
        return f"hf:{path}"
    if path.is_file():
        return f"file:{path}"
    raise UserError(
        f"teacher: expected an nn.Module, a save_pretrained directory, a model file, hf:DIR, "
        f"file:PATH or models:/NAME@ALIAS, got {text!r}"
    )


def _nested(key: str, value: Any) -> dict[str, Any]:
    """`finetune.epochs`, 5 -> {"finetune": {"epochs": 5}}."""
    tree: Any = value.model_dump() if hasattr(value, "model_dump") else value
    for part in reversed(key.split(".")):
        tree = {part: tree}
    return tree


def _array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    if isinstance(values, pd.DataFrame | pd.Series):
        return values.to_numpy()
    return np.asarray(values)


def _write_rows(folder: Path, train: Pair, test: Pair, val: Pair | None) -> dict[str, Any]:
    """The user's rows as a data source: arrays in an npz (X_train, y_train, ...), DataFrames
    (columns kept, text included) in a parquet with a split column."""
    parts = {"train": train, "test": test} | ({"val": val} if val is not None else {})
    for part, pair in parts.items():
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise UserError(f"{part}: expected a pair (X, y), got {type(pair).__name__}")
    if isinstance(train[0], pd.DataFrame):
        frames = []
        for part, (X, y) in parts.items():
            if not isinstance(X, pd.DataFrame):
                raise UserError(f"{part}: X is a {type(X).__name__}; train's X is a DataFrame")
            frame = X.reset_index(drop=True).copy()
            frame[_LABEL] = _array(y)
            frame[_SPLIT] = part
            frames.append(frame)
        path = folder / "rows.parquet"
        pd.concat(frames, ignore_index=True).to_parquet(path)
        return {"source": f"parquet:{path}", "label": _LABEL, "split_column": _SPLIT}
    arrays = {}
    for part, (X, y) in parts.items():
        arrays[f"X_{part}"], arrays[f"y_{part}"] = _array(X), _array(y)
        if len(arrays[f"X_{part}"]) != len(arrays[f"y_{part}"]):
            raise UserError(
                f"{part}: X has {len(arrays[f'X_{part}'])} rows, y {len(arrays[f'y_{part}'])}"
            )
    path = folder / "rows.npz"
    np.savez(path, allow_pickle=False, **arrays)
    return {"source": f"npz:{path}"}


_MLFLOW_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow at `uri` for the block, then back where it was: MLflow's set_tracking_uri
    and set_registry_uri (called by store.configure) change process-wide globals and write
    MLFLOW_*_URI into the environment, so a notebook's own MLflow calls after a tracked
    `compress` would otherwise read and write the store `track=` named."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    environ = {name: os.environ.get(name) for name in _MLFLOW_URI_VARS}
    globals_before = tracking_utils._tracking_uri, registry_utils._registry_uri
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = globals_before
        for name, value in environ.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _tracked(
    cfg: PipelineConfig,
    data: Dataset,
    steps: Steps,
    uri: str,
    experiment: str,
    orchestrate: bool = False,
) -> tuple[Outcome, str]:
    """The pipeline recorded in MLflow as the CLI records it (with `orchestrate`, each stage's
    record a Prefect task run, as `distill run` makes it)."""
    import yaml

    from distill.tasks.platform import store, tracking

    with _tracking_uri(uri):
        settings = store.load_settings()
        settings = settings.model_copy(
            update={"tracking": settings.tracking.model_copy(update={"experiment": experiment})}
        )
        experiment_id = store.configure(settings)
        tags = {
            "distill.config_hash": cfg.digest(),
            "distill.dataset_digest": data.digest,
            "distill.split": "user",
            "distill.entry": "python",
        }
        with tracking.parent_run(experiment_id, cfg.name, cfg.flat(), tags) as run_id:
            tracking.log_run_inputs(
                yaml.safe_dump(cfg.model_dump(), sort_keys=False),
                None,
                data.raw_frame(5),
                data.source,
                data.name,
                data.digest,
                rows=len(data.y_train) + len(data.y_val) + len(data.y_test),
            )
            recorder = _recorder(orchestrate)(run_id, data.X_test[:5])
            outcome = None
            try:
                pipeline = partial(run_pipeline, cfg, data, steps, recorder)
                outcome = _in_flow(pipeline) if orchestrate else pipeline()
            finally:
                tracking.log_metrics(run_id, recorder.metrics)
                tracking.log_metrics(run_id, outcome.summary if outcome is not None else {})
    return outcome, run_id


def _recorder(orchestrate: bool) -> type[TrackingRecorder]:
    from distill.tasks.release.recorder import TrackingRecorder

    if not orchestrate:
        return TrackingRecorder
    from distill.flows.stages import MlflowRecorder

    return MlflowRecorder


def _result(outcome: Outcome, data: Dataset, run_id: str | None) -> Result:
    final = outcome.stages["quantized"]
    metrics: dict[str, Any] = {k: v for k, v in final.items() if k != "seconds"}
    metrics |= {k: v for k, v in outcome.summary.items() if not k.startswith("final/")}
    metrics["stages"] = outcome.stages
    target = outcome.target
    return Result(
        student=outcome.pruned,
        served=Served.of(outcome.quantized.served, data),
        metrics=metrics,
        record=run_id,
        target=target.line if target else None,
        target_met=target.met if target else None,
        outcome=outcome,
        frontier=[c.row() for c in target.fitted.frontier] if target else None,
    )
