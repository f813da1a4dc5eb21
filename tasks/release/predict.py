"""Batch prediction: a file of raw rows through a registered model (`mlflow.pyfunc`).

The registered model carries its encoding and standardization (tasks/release/serving_model.py), so
the input is the raw columns the model was trained on, by name (CSV, Parquet; text columns
read as text) or by position (NPZ array `X`, one row per sample, any trailing shape that
flattens to the feature count). Columns the model does not take are ignored. A model that takes
an array (a tensor signature: tasks/release/signature.py) gets them as rows of its shape and
dtype: a table's feature columns by name, or, for a model trained on an array, every column but
the label in the file's order, or the NPZ's X. CSV and Parquet
are read and written in chunks of `CHUNK_ROWS`, so memory stays flat with the file's size;
the output appears only when every row is written (a temporary file, then a rename), and it
may not be the input. Mistakes (missing, repeated or non-numeric columns, an empty cell the
model cannot impute) are one line naming the file, the column and the row.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from distill.tasks.compress import readers
from distill.tasks.platform.errors import UserError
from distill.tasks.release.signature import input_columns, model_input

INPUT_KINDS = (".csv", ".parquet", ".npz")
OUTPUT_KINDS = (".csv", ".parquet")
CHUNK_ROWS = 50_000


@dataclass(frozen=True)
class PredictionReport:
    rows: int
    output: Path
    accuracy: float | None  # on the rows with a label, when a label column was given
    unlabelled: int = 0  # rows whose label cell was empty (not counted in accuracy)
    errors: dict[str, float] | None = (
        None  # a regression model's r2, mae, rmse (in accuracy's place)
    )


class _Errors:
    """R², MAE and RMSE of a regression model's predictions, summed chunk by chunk (memory stays
    flat with the file); the same numbers as scikit-learn's on all rows at once."""

    def __init__(self) -> None:
        self.n, self.sum_y, self.sum_y2, self.sse, self.sae = 0, 0.0, 0.0, 0.0, 0.0

    def add(self, pred: pd.Series, truth: pd.Series) -> int:
        known = truth.notna().to_numpy()
        y = pd.to_numeric(truth[known], errors="coerce").to_numpy(np.float64)
        p = pred.to_numpy(np.float64)[known]
        self.n += len(y)
        self.sum_y, self.sum_y2 = self.sum_y + y.sum(), self.sum_y2 + (y * y).sum()
        self.sse, self.sae = self.sse + ((y - p) ** 2).sum(), self.sae + np.abs(y - p).sum()
        return len(y)

    def result(self) -> dict[str, float] | None:
        if self.n == 0:
            return None
        sst = self.sum_y2 - self.sum_y**2 / self.n
        r2 = 1 - self.sse / sst if sst > 0 else float("nan")
        return {"r2": r2, "mae": self.sae / self.n, "rmse": float(np.sqrt(self.sse / self.n))}


def load_pyfunc(uri: str) -> Any:
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.pyfunc.load_model(uri)
    except MlflowException as err:
        raise UserError(f"cannot load model {uri}: {err.message.splitlines()[0]}") from None
    except OSError as err:
        raise UserError(f"cannot load model {uri}: {err}") from None


def model_columns(model: Any) -> dict[str, str] | None:
    """{raw column: 'double' | 'string' | ...} the model reads a file's rows by (None: every
    column but the label, in order: a model trained on an array, or one without a signature)."""
    return input_columns(model)


def _short(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def check_paths(input_path: Path, output_path: Path) -> None:
    """Before the (slow) model load: kinds, existence, and an output that is not the input."""
    if input_path.suffix.lower() not in INPUT_KINDS:
        raise UserError(f"input {input_path}: expected a .csv, .parquet or .npz file")
    readers.require_file(input_path, "input file")
    if output_path.suffix.lower() not in OUTPUT_KINDS:
        raise UserError(f"output {output_path}: expected a .csv or .parquet file")
    if output_path.is_dir():
        raise UserError(f"output {output_path} is a directory, not a file")
    if output_path.resolve() == input_path.resolve() or (
        output_path.exists() and os.path.samefile(output_path, input_path)
    ):
        raise UserError(
            f"output {output_path} is the input file; write the predictions to another file"
        )
    if not output_path.parent.is_dir():
        raise UserError(f"output {output_path}: folder {output_path.parent} does not exist")


def read_chunks(
    path: Path,
    columns: dict[str, str] | None,
    label: str | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[tuple[pd.DataFrame, pd.Series | None]]:
    """(the model's columns in its order, the label column if asked) per chunk of rows; each
    chunk keeps the file's row numbers as its index."""
    if path.suffix.lower() == ".npz":
        yield _read_npz(path, list(columns) if columns else None)
        return
    kind, where = path.suffix.lower().lstrip("."), f"input {path}"
    names = readers.read_header(path, kind, where)
    if label is not None:
        readers.require_column(names, label, "label", where, "option --label")
    wanted = list(columns) if columns else [n for n in names if n != label]
    missing = [f for f in wanted if f not in names]
    if missing:
        hint = " (does the file have a header row?)" if len(missing) == len(wanted) else ""
        raise UserError(
            f"input {path}: missing column(s) {_short(missing)}; the model takes "
            f"{len(wanted)} feature columns{hint}"
        )
    text = [n for n, t in (columns or {}).items() if t == "string"]
    read = list(dict.fromkeys(wanted + ([label] if label else [])))
    for chunk in readers.read_frames(path, kind, where, read, text, chunk_rows):
        truth = chunk[label] if label is not None else None
        yield _typed(path, chunk[wanted], columns), truth


def _typed(path: Path, rows: pd.DataFrame, columns: dict[str, str] | None) -> pd.DataFrame:
    """Numbers as float64 (the signature's `double`), text as strings; one line per mistake."""
    out = {}
    for name in rows.columns:
        column = rows[name]
        if columns is not None and columns[name] == "string":
            out[name] = column.astype(object).where(column.notna(), None)
            continue
        if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
            numbers = pd.to_numeric(column.astype(object), errors="coerce")
            wrong = (numbers.isna() & column.notna()).to_numpy()
            if pd.api.types.is_bool_dtype(column) or wrong.any():
                row = column.index[int(np.argmax(wrong))]
                raise UserError(
                    f"input {path}: column {name!r} is not numeric (row {row}: {column[row]!r})"
                )
            column = numbers
        values = column.to_numpy(np.float64)
        if np.isinf(values).any():
            raise UserError(
                f"input {path}: column {name!r} holds inf in row "
                f"{column.index[int(np.argmax(np.isinf(values)))]}"
            )
        out[name] = values
    return pd.DataFrame(out, index=rows.index)


def _read_npz(path: Path, features: list[str] | None) -> tuple[pd.DataFrame, None]:
    with readers.open_npz(path, f"input {path}") as arrays:
        files = arrays.files
        X = arrays["X"] if "X" in files else (arrays[files[0]] if len(files) == 1 else None)
    if X is None:
        raise UserError(f"input {path}: no array 'X' (arrays: {', '.join(files)})")
    if X.ndim < 2:
        raise UserError(
            f"input {path}: X has shape {list(X.shape)}; expected one row per sample, "
            f"[rows, features]"
        )
    if not np.issubdtype(X.dtype, np.number):
        raise UserError(f"input {path}: X holds {X.dtype}, not numbers")
    shape = list(X.shape)
    X = X.reshape(len(X), -1).astype(np.float64)
    names = features or [f"x{i}" for i in range(X.shape[1])]
    if X.shape[1] != len(names):
        raise UserError(
            f"input {path}: X has shape {shape}, {X.shape[1]} features per row; "
            f"the model takes {len(names)}"
        )
    return pd.DataFrame(X, columns=names), None


class _Writer:
    """Chunks into a temporary file beside `path`, renamed onto it only when all are written."""

    def __init__(self, path: Path):
        self.path, self.parquet = path, path.suffix.lower() == ".parquet"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        os.close(fd)
        self.tmp, self.writer, self.first = Path(tmp), None, True

    def write(self, frame: pd.DataFrame) -> None:
        if self.parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.tmp, table.schema)
            self.writer.write_table(table)
        else:
            frame.to_csv(self.tmp, index=False, mode="w" if self.first else "a", header=self.first)
        self.first = False

    def commit(self) -> None:
        if self.writer is not None:
            self.writer.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
        self.tmp.unlink(missing_ok=True)


def _predict(model: Any, path: Path, rows: pd.DataFrame) -> pd.DataFrame:
    """The model's answer, or one line: its own refusal (an empty cell it cannot impute)."""
    from mlflow.exceptions import MlflowException

    array = model_input(model, rows, f"input {path}")
    try:
        out = pd.DataFrame(model.predict(array))
    except (ValueError, MlflowException) as err:
        message = (err.message if isinstance(err, MlflowException) else str(err)).splitlines()[0]
        if array is not rows:  # an array's rows are numbered from 0: the file's numbers instead
            message = re.sub(r"in row (\d+)", lambda m: f"in row {rows.index[int(m[1])]}", message)
        raise UserError(f"input {path}: {message}") from None
    out.index = rows.index
    return out


def _hits(pred: pd.Series, truth: pd.Series) -> tuple[int, int]:
    """(correct, labelled): empty label cells are not counted; numbers compare as numbers (a
    label `0.0` read as a float is class 0), anything else as text."""
    known = truth.notna().to_numpy()
    pred, truth = pred.to_numpy()[known], truth.to_numpy()[known]
    if pd.api.types.is_numeric_dtype(pred) and pd.api.types.is_numeric_dtype(truth):
        return int((pred.astype(np.float64) == truth.astype(np.float64)).sum()), int(known.sum())
    return int((pred.astype(str) == truth.astype(str)).sum()), int(known.sum())


def predict_file(
    model_uri: str,
    input_path: Path,
    output_path: Path,
    label: str | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> PredictionReport:
    """Predict every row of `input_path` and write `prediction` and `proba_<class>` columns
    (`prediction` alone for a regression model, scored by R², MAE and RMSE with a label)."""
    check_paths(input_path, output_path)
    model = load_pyfunc(model_uri)
    columns = model_columns(model)
    writer, rows, correct, labelled, errors = None, 0, 0, 0, _Errors()
    regression = False
    try:
        for chunk, truth in read_chunks(input_path, columns, label, chunk_rows):
            if chunk.empty:
                continue
            out = _predict(model, input_path, chunk)
            if writer is None:
                writer = _Writer(output_path)
            writer.write(out)
            rows += len(out)
            regression = not any(str(c).startswith("proba_") for c in out.columns)
            if truth is not None and regression:
                labelled += errors.add(out["prediction"], truth)
            elif truth is not None:
                hit, known = _hits(out["prediction"], truth)
                correct, labelled = correct + hit, labelled + known
        if rows == 0:
            raise UserError(f"input {input_path}: no rows")
        writer.commit()
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    if regression:
        scores = errors.result() if label is not None else None
        return PredictionReport(rows, output_path, None, (rows - labelled) if label else 0, scores)
    accuracy = correct / labelled if label is not None and labelled else None
    return PredictionReport(rows, output_path, accuracy, (rows - labelled) if label else 0)
