"""What the registered model takes: the user's own array, or the named columns of their table.

An MLflow `ModelSignature` says it, and `mlflow.pyfunc` enforces it before the model runs:

- **numbers** (every source whose features are all numeric: npz arrays, numeric csv/parquet
  tables, scikit-learn's datasets, a text column tokenized into ids) -> a **tensor**
  signature (`TensorSpec`): the user's own rows in their own shape and dtype. An npz's X gives
  both (`[-1, 2, 20]` float64 signals, `[-1, 1, 28, 28]` float32 images, `[-1, 64]` int64 token
  ids); a table's rows are `[-1, F]` float64 over its F feature columns (a ResNet1d trained on a
  40-column CSV with `data.shape: [1, 40]` takes `[N, 40]`); token ids are `[-1, T]` int64, or
  `[-1, -1]` where the served graph takes any sequence length (tasks/compress/quantize.py
  `export_onnx`). MLflow holds callers to the dtype exactly (float32 rows are refused by a
  float64 signature): it is the user's, not the model's, and the served model casts and
  standardizes inside. A DataFrame still reaches such a model: MLflow reads its columns by
  position, so they must be the feature columns in the training file's order, as float64
  (`df[features].astype(float)`); the names are in the model's metadata (`distill_features`).
- **a table with text columns** (categories: the DataFrame is the natural input) -> a
  **column** signature, as before: every raw column by name, numbers as double, text as
  string; text columns and empty cells are encoded inside the model (tasks/compress/tabular.py).
  Versions registered before tensor signatures keep their column signature and answer as
  they did.

Both answer the same DataFrame: `prediction` and one `proba_<class>` column per class (a
regression model: `prediction` alone). `distill predict` and the promotion gates bring a file's
rows to either form with `model_input` (a tensor model trained on named columns gets them by
name, one trained on an array by position).

Token ids that came with attention masks (an npz's `X_*_mask` arrays, a tokenizer's padding:
tasks/compress/masks.py) give a signature of two named tensors, `input_ids` and
`attention_mask` (the mask in the user's dtype, int64 for a tokenizer's), and the served model
takes a dict of both. Both are required: MLflow 3.17's `TensorSpec` has no optional inputs
(ColSpec's `required` has no tensor counterpart), and the served graph needs the mask as an
input. A file's rows read for such a model (`distill predict`, the gates' held-out rows) are ids
with all-ones masks, or the data's own rows with their masks. Without masks there is one
tensor, and a Hugging Face model's mask comes from `config.pad_token_id` inside the graph
(tasks/compress/hf.py).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from distill.tasks.compress.data import Dataset
from distill.tasks.compress.evaluate import OnnxModel, TorchScriptModel
from distill.tasks.compress.masks import IDS, MASK, unfold
from distill.tasks.compress.quantize import input_axes
from distill.tasks.compress.rows import npy_header
from distill.tasks.platform.errors import UserError

FEATURES = "distill_features"  # model metadata: the raw columns a tensor model's rows hold, by name


@dataclass(frozen=True)
class TensorInput:
    """One row as the user holds it (-1: an axis of any length, token ids' sequence) and its
    dtype; `features`: the table's column names the rows hold, in order (None: an array's rows,
    taken by position)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    features: list[str] | None = None
    mask: np.dtype | None = None  # the attention mask's dtype: the rows are `input_ids` + mask

    @property
    def values_per_row(self) -> int | None:
        return None if -1 in self.shape else int(np.prod(self.shape))

    def schema(self) -> Any:
        from mlflow.types import Schema, TensorSpec

        if self.mask is not None:
            return Schema(
                [
                    TensorSpec(self.dtype, (-1, *self.shape), IDS),
                    TensorSpec(self.mask, (-1, *self.shape), MASK),
                ]
            )
        return Schema([TensorSpec(self.dtype, (-1, *self.shape))])

    def rows(self, X: np.ndarray, where: str) -> Any:
        """Rows of any trailing shape holding the same values per row (a CSV's columns, images
        flattened or not) in this shape and dtype; integers only where the model takes integers.
        One UserError naming `where` otherwise. A model of ids and masks gets the dict of both
        (rows with masks folded in, as the data holds them, give their own; plain ids all
        ones)."""
        X = self._rows(X, where)
        if self.mask is None:
            return X
        ids, mask = unfold(X)
        return {IDS: ids.astype(self.dtype), MASK: mask.astype(self.mask)}

    def _rows(self, X: np.ndarray, where: str) -> np.ndarray:
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
        if self.dtype.kind in "iub" and X.dtype.kind == "f":
            integral = np.isfinite(X).all() and (np.round(X) == X).all()
            if not integral:
                raise UserError(
                    f"{where}: the model takes {self.dtype} values (token ids), and these rows "
                    "hold non-integer numbers"
                )
        shape = (len(X), *self.shape) if need is not None else (len(X), -1)
        return X.reshape(shape).astype(self.dtype, copy=False)


def tensor_input(data: Dataset, served: OnnxModel | TorchScriptModel) -> TensorInput | None:
    """The tensor the registered model takes for this data (None: named columns, a table with
    text columns). An npz gives its X's row shape and dtype (read from the array's header); a
    table `[F]` float64, or int64 for token ids; a sequence of token ids is of any length where
    the served graph takes any."""
    columns = data.encoding.get("columns", [])
    if any(c["kind"] != "numeric" for c in columns):
        return None
    kind, _, ref = data.source.partition(":")
    ids = data.X_test.dtype.kind in "iu"
    if kind == "npz":
        shape, dtype = _npz_rows(Path(ref))
        features = None
    else:  # a table: named columns (a tokenized text column: ids t0.., by position)
        shape, dtype = (len(data.feature_names),), np.dtype(np.int64 if ids else np.float64)
        features = None if ids else list(data.feature_names)
    if len(shape) == 1 and ids and input_axes(served)[1:2] == [None]:
        shape = (-1,)
    mask = None
    if data.masked:  # the npz's mask arrays' dtype (bool or an integer); a tokenizer's: int64
        mask = _npz_mask_dtype(Path(ref)) if kind == "npz" else np.dtype(np.int64)
    return TensorInput(shape, dtype, features, mask)


def _npz_rows(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape of one row, dtype) of an npz's X array (X_train for a split the user made)."""
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        member = next(m for m in ("X.npy", "X_train.npy") if m in names)
        with z.open(member) as f:
            shape, _, dtype = npy_header(f)
    return tuple(shape[1:]), np.dtype(dtype)


def _npz_mask_dtype(path: Path) -> np.dtype:
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        member = next(m for m in ("X_mask.npy", "X_train_mask.npy") if m in names)
        with z.open(member) as f:
            return np.dtype(npy_header(f)[2])


def example_rows(data: Dataset, tensor: TensorInput | None, n: int = 5) -> Any:
    """The first test rows as a user gives them: an array of the tensor, or the raw columns."""
    from distill.tasks.compress.tabular import typed

    raw = data.raw_rows("test", n)
    if tensor is None:
        return typed(data.encoding, raw)
    return tensor.rows(raw.to_numpy(), "the input example")


def tensor_input_of(model: Any) -> TensorInput | None:
    """The tensor a loaded pyfunc takes, from its signature and metadata (None: named columns,
    or no signature)."""
    schema = model.metadata.get_input_schema()
    if schema is None or not schema.is_tensor_spec():
        return None
    spec = schema.inputs[0]
    features = (model.metadata.metadata or {}).get(FEATURES)
    mask = np.dtype(schema.inputs[1].type) if len(schema.inputs) == 2 else None
    return TensorInput(tuple(spec.shape[1:]), np.dtype(spec.type), features, mask)


def input_columns(model: Any) -> dict[str, str] | None:
    """{raw column: 'double' | 'string' | ...} a file's rows are read by for this model: its
    column signature, or a tensor model's named features (None: by position, or no signature)."""
    schema = model.metadata.get_input_schema()
    if schema is None:
        return None
    if schema.is_tensor_spec():
        tensor = tensor_input_of(model)
        return None if tensor.features is None else dict.fromkeys(tensor.features, "double")
    if not schema.has_input_names():
        return None
    return {spec.name: spec.type.name for spec in schema.inputs}


def model_input(model: Any, rows: pd.DataFrame | np.ndarray, where: str) -> Any:
    """Rows as `model.predict` takes them: a tensor model gets its array (a table's feature
    columns by name where the model knows them, else every column in order), a column model
    the DataFrame as it is."""
    tensor = tensor_input_of(model)
    if tensor is None:
        return rows
    if isinstance(rows, pd.DataFrame):
        if tensor.features is not None:
            missing = [f for f in tensor.features if f not in rows.columns]
            if missing:
                shown = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
                raise UserError(f"{where}: missing column(s) {shown}")
            rows = rows[tensor.features]
        rows = rows.to_numpy()
    return tensor.rows(rows, where)
