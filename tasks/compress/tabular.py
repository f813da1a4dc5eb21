"""Raw table columns -> the model's numeric features, with scikit-learn's `ColumnTransformer`.

Numeric columns pass through; those with missing values in the training rows get a median
`SimpleImputer` plus a missing-indicator column. Text (and boolean) columns are categories:
one-hot up to `ONEHOT_MAX_CATEGORIES` values, ordinal codes beyond; a missing cell is the
category `MISSING`, and a value never seen in training encodes as unknown (all zeros / -1).

The encoding is fitted on the training rows only and written down as a JSON-able *spec*
(column kinds, medians, categories), never as a pickle: `build(spec)` rebuilds the same
transformer from that data alone, so the registered model carries it safely. This module is
copied into the registered model (`code_paths`), so it imports only numpy, pandas and sklearn.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

ONEHOT_MAX_CATEGORIES = 16  # more distinct values: ordinal codes (one-hot would widen the input)
MISSING = "<missing>"  # the category of an empty cell in a text column


def column_kind(column: pd.Series) -> str:
    """`numeric` for numbers, `category` for text, booleans and anything else."""
    if pd.api.types.is_bool_dtype(column) or not pd.api.types.is_numeric_dtype(column):
        return "category"
    return "numeric"


def as_text(column: pd.Series) -> pd.Series:
    """A category column as strings, empty cells as `MISSING` (one form at fit and at serve)."""
    out = column.astype(object).where(column.notna(), MISSING)
    return out.map(str).astype(object)


def typed(spec: dict[str, Any], frame: pd.DataFrame) -> pd.DataFrame:
    """The spec's columns as the served model's signature types them: numbers as float64, text
    as strings (empty cells stay empty)."""
    out = {}
    for c in spec["columns"]:
        column = frame[c["name"]]
        if c["kind"] == "numeric":
            out[c["name"]] = column.astype(np.float64)
        else:
            out[c["name"]] = (
                column.astype(object)
                .where(column.notna(), None)
                .map(lambda v: v if v is None else str(v))
                .astype(object)
            )
    return pd.DataFrame(out, index=frame.index)


def fit_spec(train: pd.DataFrame, gaps: set[str] | None = None) -> dict[str, Any]:
    """Fit the encoding on the training rows with sklearn; -> its parameters as JSON-able data.

    `gaps`: numeric columns with empty cells in any row (train, val or test): they get an
    imputer (median of the training rows) and an indicator; others pass through as they are.
    """
    from sklearn.impute import SimpleImputer
    from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder

    columns = []
    for name in train.columns:
        column = train[name]
        if column_kind(column) == "numeric":
            values = column.to_numpy(np.float64).reshape(-1, 1)
            if name not in (gaps if gaps is not None else set(train.columns[train.isna().any()])):
                columns.append({"name": name, "kind": "numeric", "fill": None})
                continue
            if np.isnan(values).all():
                raise ValueError(f"column {name!r} is empty in every training row")
            imputer = SimpleImputer(strategy="median").fit(values)
            columns.append({"name": name, "kind": "numeric", "fill": float(imputer.statistics_[0])})
            continue
        text = as_text(column).to_numpy().reshape(-1, 1)
        n = len(pd.unique(text.ravel()))
        encoder = OneHotEncoder() if n <= ONEHOT_MAX_CATEGORIES else OrdinalEncoder()
        encoder.fit(text)
        columns.append(
            {
                "name": name,
                "kind": "onehot" if n <= ONEHOT_MAX_CATEGORIES else "ordinal",
                "categories": [str(c) for c in encoder.categories_[0]],
            }
        )
    return {"columns": columns}


def needs_sklearn(spec: dict[str, Any]) -> bool:
    """False for numeric columns without imputation: the rows are the features as they are."""
    return any(c["kind"] != "numeric" or c["fill"] is not None for c in spec["columns"])


def build(spec: dict[str, Any]) -> Any:
    """The fitted `ColumnTransformer` of a spec, rebuilt from its data alone (no pickle)."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, OrdinalEncoder

    parts, sample = [], {}
    for c in spec["columns"]:
        name = c["name"]
        if c["kind"] == "numeric":
            if c["fill"] is None:
                parts.append((name, "passthrough", [name]))
                sample[name] = [0.0, 0.0]
            else:
                parts.append(
                    (
                        name,
                        SimpleImputer(
                            strategy="constant", fill_value=c["fill"], add_indicator=True
                        ),
                        [name],
                    )
                )
                sample[name] = [0.0, np.nan]  # a missing cell at fit: the indicator is kept
            continue
        cats = [np.array(c["categories"], dtype=object)]
        encoder = (
            OneHotEncoder(categories=cats, handle_unknown="ignore", sparse_output=False)
            if c["kind"] == "onehot"
            else OrdinalEncoder(
                categories=cats, handle_unknown="use_encoded_value", unknown_value=-1
            )
        )
        text = FunctionTransformer(_as_text_block, feature_names_out="one-to-one")
        parts.append((name, make_pipeline(text, encoder), [name]))
        sample[name] = [c["categories"][0]] * 2
    transformer = ColumnTransformer(parts, sparse_threshold=0.0)
    # with every parameter given, fitting on two sample rows only records the columns
    return transformer.fit(pd.DataFrame(sample, columns=[c["name"] for c in spec["columns"]]))


def _as_text_block(block: pd.DataFrame | np.ndarray) -> np.ndarray:
    frame = pd.DataFrame(block)
    return np.column_stack([as_text(frame[c]).to_numpy() for c in frame.columns])


def encode(spec: dict[str, Any], frame: pd.DataFrame, transformer: Any = None) -> np.ndarray:
    """Raw rows (the spec's columns, any order) -> float64 features."""
    names = [c["name"] for c in spec["columns"]]
    if not needs_sklearn(spec):
        return frame[names].to_numpy(np.float64)
    transformer = transformer if transformer is not None else build(spec)
    return np.asarray(transformer.transform(frame[names]), dtype=np.float64)


def feature_names(spec: dict[str, Any]) -> list[str]:
    """The encoded columns' names: `age`, `age=missing`, `color=red`, `city#` (ordinal)."""
    out = []
    for c in spec["columns"]:
        if c["kind"] == "numeric":
            out += [c["name"]] + ([f"{c['name']}=missing"] if c["fill"] is not None else [])
        elif c["kind"] == "onehot":
            out += [f"{c['name']}={v}" for v in c["categories"]]
        else:
            out.append(f"{c['name']}#")
    return out


def first_bad_cell(spec: dict[str, Any], frame: pd.DataFrame) -> str | None:
    """One line on the first cell the model cannot take: inf anywhere, or an empty (NaN) cell
    in a numeric column that had no empty cells in training (no imputer for it)."""
    for c in spec["columns"]:
        if c["kind"] != "numeric":
            continue
        values = pd.to_numeric(frame[c["name"]], errors="coerce").to_numpy(np.float64)
        bad = np.isinf(values) | (np.isnan(values) if c["fill"] is None else False)
        if bad.any():
            at = int(np.argmax(bad))
            row = frame.index[at]  # the caller's row number (a chunk of a file keeps the file's)
            if np.isinf(values[at]):
                return f"column {c['name']!r} holds inf in row {row}"
            return (
                f"column {c['name']!r} is empty (NaN) in row {row}: the model has no imputer "
                f"for it (the column had no empty cells in training)"
            )
    return None
