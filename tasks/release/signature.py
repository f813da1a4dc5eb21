"""What the registered model takes: the user's own array, or the named columns of their table.

The signature follows the form the data came in:

- an **array** (`npz:`, whose `X` arrays have no column names) -> a **tensor** signature: the
  user's own rows, in the shape and dtype of the npz's X (`[-1, 40]` float32 rows, `[-1, 1, 28,
  28]` images, `[-1, 64]` int64 token ids). The batch axis is -1, and so is the sequence axis of
  token ids where the served graph takes any length (tasks/compress/quantize.py `export_onnx`).
  MLflow holds callers to that dtype exactly (`float64` rows are refused by a `float32` model),
  so it is the user's, not the model's: the served model casts and standardizes inside.
- a **table** (csv, parquet, and scikit-learn's datasets, whose features are named columns) ->
  a **column** signature: every raw column by name, numbers as double, text as string; text
  columns and empty cells are encoded inside the model (tasks/compress/tabular.py).

Both answer the same DataFrame: `prediction` and one `proba_<class>` column per class (a
regression model: `prediction` alone). `distill predict` and the promotion gates bring a file's
rows to either form with `model_input`.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.compress.data import Dataset
from tasks.compress.evaluate import OnnxModel, TorchScriptModel
from tasks.compress.quantize import input_axes
from tasks.compress.rows import npy_header
from tasks.platform.errors import UserError

ARRAY_SOURCES = ("npz",)  # sources whose rows are an array without column names


@dataclass(frozen=True)
class TensorInput:
    """One row as the user holds it (-1: an axis of any length, token ids' sequence) and its
    dtype."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def values_per_row(self) -> int | None:
        return None if -1 in self.shape else int(np.prod(self.shape))

    def schema(self) -> Any:
        from mlflow.types import Schema, TensorSpec

        return Schema([TensorSpec(self.dtype, (-1, *self.shape))])

    def rows(self, X: np.ndarray, where: str) -> np.ndarray:
        """Rows of any trailing shape holding the same values per row (a CSV's columns, images
        flattened or not) in this shape and dtype; integers only where the model takes integers.
        One UserError naming `where` otherwise."""
        X = np.asarray(X)
        if X.ndim == 0 or not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
            raise UserError(f"{where}: expected rows of numbers, got {X.dtype} {list(X.shape)}")
        width = int(np.prod(X.shape[1:]))
        need = self.values_per_row
        if need is not None and width != need:
            raise UserError(
                f"{where}: rows of shape {list(X.shape[1:])} hold {width} values; the model "
                f"takes rows of shape {list(self.shape)} ({need} values)"
            )
        integral = X.dtype.kind != "f" or (np.isfinite(X).all() and (np.round(X) == X).all())
        if self.dtype.kind in "iub" and not integral:
            raise UserError(
                f"{where}: the model takes {self.dtype} values (token ids), and these rows "
                "hold non-integer numbers"
            )
        shape = (len(X), *self.shape) if need is not None else (len(X), -1)
        return X.reshape(shape).astype(self.dtype, copy=False)


def tensor_input(data: Dataset, served: OnnxModel | TorchScriptModel) -> TensorInput | None:
    """The tensor the registered model takes for this data (None: named columns). The shape and
    dtype are those of the npz's X (or X_train) array, read from its header; a sequence of token
    ids (integer rows of one axis) is of any length when the served graph takes any."""
    kind, _, ref = data.source.partition(":")
    if kind not in ARRAY_SOURCES:
        return None
    shape, dtype = _npz_rows(Path(ref))
    if len(shape) == 1 and dtype.kind in "iu" and input_axes(served)[1:2] == [None]:
        shape = (-1,)
    return TensorInput(shape, dtype)


def _npz_rows(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape of one row, dtype) of an npz's X array (X_train for a split the user made)."""
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        member = next(m for m in ("X.npy", "X_train.npy") if m in names)
        with z.open(member) as f:
            shape, _, dtype = npy_header(f)
    return tuple(shape[1:]), np.dtype(dtype)


def example_rows(data: Dataset, tensor: TensorInput | None, n: int = 5) -> Any:
    """The first test rows as a user gives them: an array of the tensor, or the raw columns."""
    from tasks.compress.tabular import typed

    raw = data.raw_rows("test", n)
    if tensor is None:
        return typed(data.encoding, raw)
    return tensor.rows(raw.to_numpy(), "the input example")


def tensor_input_of(model: Any) -> TensorInput | None:
    """The tensor a loaded pyfunc takes, from its signature (None: named columns, or none)."""
    schema = model.metadata.get_input_schema()
    if schema is None or not schema.is_tensor_spec():
        return None
    (spec,) = schema.inputs
    return TensorInput(tuple(spec.shape[1:]), np.dtype(spec.type))


def model_input(model: Any, rows: pd.DataFrame | np.ndarray, where: str) -> Any:
    """Rows as `model.predict` takes them: a tensor model gets them as its array (a table's
    columns in their order), a column model the DataFrame as it is."""
    tensor = tensor_input_of(model)
    if tensor is None:
        return rows
    return tensor.rows(rows.to_numpy() if isinstance(rows, pd.DataFrame) else rows, where)
