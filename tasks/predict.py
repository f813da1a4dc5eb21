"""Batch prediction: a file of raw feature rows through a registered model (`mlflow.pyfunc`).

The registered model carries its standardization (tasks/serving_model.py), so the input
is the raw feature columns the model was trained on, by name (CSV, Parquet) or by
position (NPZ array `X`, one row per sample, any trailing shape that flattens to the
feature count). Columns the model does not take are ignored. Mistakes (missing columns,
wrong feature count, text or empty cells) are one line naming the file and column.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.errors import UserError

INPUT_KINDS = (".csv", ".parquet", ".npz")
OUTPUT_KINDS = (".csv", ".parquet")


@dataclass(frozen=True)
class PredictionReport:
    rows: int
    output: Path
    accuracy: float | None  # when a label column was given


def load_pyfunc(uri: str) -> Any:
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.pyfunc.load_model(uri)
    except MlflowException as err:
        raise UserError(f"cannot load model {uri}: {err.message.splitlines()[0]}") from None
    except OSError as err:
        raise UserError(f"cannot load model {uri}: {err}") from None


def model_features(model: Any) -> list[str] | None:
    """The raw feature columns the model takes, from its signature (None if it has none)."""
    schema = model.metadata.get_input_schema()
    return list(schema.input_names()) if schema is not None and schema.has_input_names() else None


def _short(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def read_rows(path: Path, features: list[str] | None, label: str | None = None) -> tuple[pd.DataFrame, pd.Series | None]:
    """-> (the model's feature columns in its order, the label column if asked for)."""
    if path.suffix.lower() not in INPUT_KINDS:
        raise UserError(f"input {path}: expected a .csv, .parquet or .npz file")
    if not path.is_file():
        raise UserError(f"input file not found: {path}")
    if path.suffix.lower() == ".npz":
        return _read_npz(path, features)
    try:
        frame = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except Exception as err:  # pandas raises many types for unreadable files
        raise UserError(f"input {path} could not be read: {str(err).splitlines()[0]}") from None
    frame.columns = [str(c) for c in frame.columns]
    truth = None
    if label is not None:
        if label not in frame.columns:
            raise UserError(f"input {path}: label column {label!r} not found (option --label)")
        truth = frame[label]
    if features is None:
        return frame.drop(columns=[label] if label else []), truth
    missing = [f for f in features if f not in frame.columns]
    if missing:
        hint = " (does the file have a header row?)" if len(missing) == len(features) else ""
        raise UserError(f"input {path}: missing column(s) {_short(missing)}; the model takes "
                        f"{len(features)} feature columns{hint}")
    rows = frame[features]
    _check_values(path, rows)
    return rows.astype(np.float64), truth


def _check_values(path: Path, rows: pd.DataFrame) -> None:
    for column in rows.columns:
        if not pd.api.types.is_numeric_dtype(rows[column]):
            raise UserError(f"input {path}: column {column!r} is not numeric")
        bad = ~np.isfinite(rows[column].to_numpy(np.float64))
        if bad.any():
            raise UserError(f"input {path}: column {column!r} is empty, NaN or inf in row {int(np.argmax(bad))}")


def _read_npz(path: Path, features: list[str] | None) -> tuple[pd.DataFrame, None]:
    try:
        arrays = np.load(path, allow_pickle=False)
        X = arrays["X"] if "X" in arrays.files else (arrays[arrays.files[0]] if len(arrays.files) == 1 else None)
    except Exception as err:
        raise UserError(f"input {path} could not be read as npz: {str(err).splitlines()[0]}") from None
    if X is None:
        raise UserError(f"input {path}: no array 'X' (arrays: {', '.join(arrays.files)})")
    if X.ndim < 2:
        raise UserError(f"input {path}: X has shape {list(X.shape)}; expected one row per sample, [rows, features]")
    if not np.issubdtype(X.dtype, np.number):
        raise UserError(f"input {path}: X holds {X.dtype}, not numbers")
    shape = list(X.shape)
    X = X.reshape(len(X), -1).astype(np.float64)
    names = features or [f"x{i}" for i in range(X.shape[1])]
    if X.shape[1] != len(names):
        raise UserError(f"input {path}: X has shape {shape}, {X.shape[1]} features per row; "
                        f"the model takes {len(names)}")
    rows = pd.DataFrame(X, columns=names)
    _check_values(path, rows)
    return rows, None


def write_table(frame: pd.DataFrame, path: Path) -> None:
    if path.suffix.lower() not in OUTPUT_KINDS:
        raise UserError(f"output {path}: expected a .csv or .parquet file")
    if not path.parent.is_dir():
        raise UserError(f"output {path}: folder {path.parent} does not exist")
    if path.suffix.lower() == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)


def predict_file(model_uri: str, input_path: Path, output_path: Path, label: str | None = None) -> PredictionReport:
    """Predict every row of `input_path` and write `prediction` and `proba_<class>` columns."""
    if output_path.suffix.lower() not in OUTPUT_KINDS:  # before the (slow) model load
        raise UserError(f"output {output_path}: expected a .csv or .parquet file")
    if output_path.is_dir():
        raise UserError(f"output {output_path} is a directory, not a file")
    model = load_pyfunc(model_uri)
    rows, truth = read_rows(input_path, model_features(model), label)
    if rows.empty:
        raise UserError(f"input {input_path}: no rows")
    out = pd.DataFrame(model.predict(rows))
    write_table(out, output_path)
    accuracy = None
    if truth is not None:
        accuracy = float((out["prediction"].astype(str).to_numpy() == truth.astype(str).to_numpy()).mean())
    return PredictionReport(len(out), output_path, accuracy)
